"""Read the released PointNet++ object backbone without running it, and convert it.

    python -m spatialoc_ros.models.convert_pointnet IN.pth OUT.pth

The SpatiaLoc README (like Text2Loc's, MNCL's and CMMLoc's) has its users download
``pointnet_acc0.86_lr1_p256_model.pth``: a PointNet++ pretrained on KITTI360Pose objects, saved as
a whole pickled module (``torch.save(model)``), which the release loads with a plain
``torch.load``. A plain ``torch.load`` runs whatever callable the file names. Here the file goes
through torch's weights-only unpickler instead, with an allow-list:

* the release's classes (``models.pointcloud.pointnet2.PointNet2``, ``SetAbstractionLayer``,
  ``GlobalAbstractionLayer``), torch_geometric's point layer (``PointConv`` in 1.x, Text2Loc's pin;
  ``PointNetConv`` in 2.x, SpatiaLoc's 2.5.0 pin, with its ``MaxAggregation``), the introspection
  records that torch_geometric pickles inside the layer (its ``Inspector`` with ``inspect.Parameter``
  objects and the type annotations they hold), and the plain torch layers of the MLPs
  (``Sequential``, ``Linear``, ``BatchNorm1d``, ``ReLU``);
* every allow-listed name resolves to an inert stand-in defined here: nothing the file names is
  imported, constructed or called; the only code that runs is torch's own tensor rebuilding;
* any other global is refused before unpickling starts, with a one-line error naming it.

Storages tagged ``cuda:0`` are mapped to the CPU. The tensors are then taken from the module tree
(``_parameters`` / ``_buffers`` of every ``_modules`` entry) and mapped by name onto
:class:`~spatialoc_ros.models.object_encoder.PointNet2` (the release's shape, ``pointnet_arch
'pointnet2'``), whose output width is read from the file's ``lin2``. The report lists every tensor
mapped, reshaped or left out (the class and colour heads of the pretraining); a missing, unexpected
or differently shaped tensor refuses the file with the mismatching names.

The output is this project's PointNet file: ``{'model': state_dict, 'config': {'arch', 'out_dim'},
'kind': 'pointnet', 'version': 1, 'extra': {'source', 'layout', 'report'}}``, which loads with
``weights_only=True`` and ``strict=True`` (``ObjectEncoder.load_pointnet``, ``--pointnet_path``).
The same reader sits behind ``--pointnet_path``, so the release file also works there directly.
It also accepts the release's state_dict (Text2Pos' ``pointnet_acc0.86_lr1_p256.pth``) and a
state_dict of this project's 'mlp' PointNet.
"""
from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
import struct
import sys
import types
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: File name of the release's backbone; the seed expects it in ./checkpoints/.
SEED_POINTNET_NAME = "pointnet_acc0.86_lr1_p256_model.pth"
#: ``kind`` and ``version`` of the files this module writes.
POINTNET_FILE_KIND = "pointnet"
POINTNET_FILE_VERSION = 1
#: The release's root class.
RELEASE_ROOT = "models.pointcloud.pointnet2.PointNet2"
#: How many names an error message lists per category before "...".
_MAX_NAMES = 8


class PointNetFileError(ValueError):
    """A PointNet file that cannot be used; the message is one line and says why."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class UnsafePointNetFileError(PointNetFileError):
    """A file naming a global outside the allow-list. Nothing in it was run."""


# --------------------------------------------------------------------------------------------
# Inert stand-ins for everything the allow-list admits
# --------------------------------------------------------------------------------------------


class _StandIn:
    """Takes the place of an allow-listed class of the release's pickle. Creating one (NEWOBJ or
    a call from REDUCE) ignores the arguments; BUILD keeps the state dict and nothing else."""

    released_as = "?"
    is_module = False
    _state = types.MappingProxyType({})  # replaced by BUILD

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"the state of a {self.released_as} is a {type(state).__name__}, not a dict")
        self._state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.released_as}>"


class _StandInModule(_StandIn):
    """Stand-in for an ``nn.Module`` class: its state holds ``_parameters``, ``_buffers``, ``_modules``."""

    is_module = True


class _Inert(_StandIn):
    """What a stand-in function returns (e.g. for ``typing.Optional[Tensor]`` rebuilt by
    ``operator.getitem``)."""

    released_as = "the result of an allow-listed call"


def _inert_call(*args, **kwargs) -> _Inert:
    """Stand-in for the functions a pickle uses to rebuild type annotations; calls nothing."""
    return _Inert()


def _stand_in_class(base: type, qualified: str) -> type:
    name = qualified.rpartition(".")[2]
    return type(f"StandIn_{name}", (base,), {"released_as": qualified, "__module__": __name__})


#: Module classes: the release's, torch_geometric's point layer, the torch layers of its MLPs.
_MODULE_CLASSES: tuple[str, ...] = (
    RELEASE_ROOT,
    "models.pointcloud.pointnet2.SetAbstractionLayer",
    "models.pointcloud.pointnet2.GlobalAbstractionLayer",
    "torch_geometric.nn.conv.point_conv.PointConv",  # torch_geometric 1.x
    "torch_geometric.nn.conv.point_conv.PointNetConv",  # torch_geometric 2.x
    "torch_geometric.nn.aggr.basic.MaxAggregation",  # 2.x: the layer's aggr_module
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.batchnorm.BatchNorm1d",
    "torch.nn.modules.activation.ReLU",
)
#: Other objects pickled inside torch_geometric's layer: its method-signature records and the
#: annotations they hold (never used here).
_OBJECT_CLASSES: tuple[str, ...] = (
    "torch_geometric.nn.conv.utils.inspector.Inspector",  # 1.x
    "torch_geometric.inspector.Inspector",  # 2.x
    "torch_geometric.inspector.Signature",
    "torch_geometric.inspector.Parameter",
    "inspect.Parameter",
    "inspect._ParameterKind",
    "inspect._empty",
    "torch_sparse.tensor.SparseTensor",
    "torch_geometric.typing.SparseTensor",
    "typing.Union",
    "typing.Optional",
    "typing.Tuple",
    "typing.List",
    "typing.Dict",
    "typing.Any",
    "typing.Callable",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
)
#: Functions a pickle applies to rebuild annotations: typing's ``__reduce__`` (operator.getitem,
#: pickled as _operator.getitem), ``type(None)`` (builtins.type) and by-name enums (builtins.getattr).
_CALLABLES: tuple[str, ...] = ("_operator.getitem", "operator.getitem", "builtins.type", "builtins.getattr")


def _build_allow_list() -> dict[str, object]:
    allowed: dict[str, object] = {}
    for name in _MODULE_CLASSES:
        allowed[name] = _stand_in_class(_StandInModule, name)
    for name in _OBJECT_CLASSES:
        allowed[name] = _stand_in_class(_StandIn, name)
    for name in _CALLABLES:
        allowed[name] = _inert_call
    return allowed


#: name in the pickle -> the stand-in it resolves to.
ALLOW_LIST: dict[str, object] = _build_allow_list()


# --------------------------------------------------------------------------------------------
# Reading a file
# --------------------------------------------------------------------------------------------

#: What torch.load and its zip reader raise on truncated, corrupt or refused input.
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, OSError, zipfile.BadZipFile, struct.error, UnicodeDecodeError, OverflowError)


def _first_line(err: BaseException) -> str:
    """The informative line of an error (torch's weights-only errors put it after some advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()[:300]
    return (lines[0] if lines else type(err).__name__)[:300]


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_NAMES else "")


def _load_safely(path: str):
    """torch.load with weights_only=True, the stand-ins of :data:`ALLOW_LIST` and map_location='cpu'."""
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise RuntimeError(f"reading PointNet files needs torch >= 2.5 (this is {torch.__version__}); "
                           "install the project's pinned torch (scripts/setup.sh)")
    if not zipfile.is_zipfile(path):
        raise PointNetFileError(
            f"{path!r} is not a complete torch checkpoint (no zip directory: truncated, not written by "
            "torch.save, or in the pre-1.6 format); download it again"
        )
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except _READ_ERRORS as err:
        raise PointNetFileError(f"{path!r} is not a readable torch checkpoint ({type(err).__name__}: "
                                f"{_first_line(err)}); is it truncated?") from err
    refused = sorted(name for name in unsafe if name not in ALLOW_LIST)
    if refused:
        raise UnsafePointNetFileError(
            f"refused {path!r}: it names {_names(refused)}, outside the allow-list (weights-only tensors "
            "plus the released PointNet's classes); nothing in it was run"
        )
    with torch.serialization.safe_globals([(obj, name) for name, obj in ALLOW_LIST.items()]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except _READ_ERRORS as err:
            raise PointNetFileError(f"could not read {path!r} ({type(err).__name__}: {_first_line(err)}); "
                                    "is it truncated or damaged?") from err


def _module_tensors(root: _StandInModule, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Walk the ``_modules`` tree of stand-ins -> ({dotted name: tensor}, {module path: class})."""
    tensors: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    stack: list[tuple[str, _StandIn]] = [("", root)]
    seen: set[int] = set()
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            raise PointNetFileError(f"{source!r}: the module {prefix.rstrip('.') or 'root'} appears twice in the tree")
        seen.add(id(module))
        classes[prefix.rstrip(".")] = module.released_as
        state = module._state
        if not isinstance(state, (dict, types.MappingProxyType)):
            raise PointNetFileError(f"{source!r}: the state of {prefix.rstrip('.') or 'the root'} is not a dict")
        for group in ("_parameters", "_buffers"):
            entries = state.get(group, {})
            if not isinstance(entries, dict):
                raise PointNetFileError(f"{source!r}: {prefix}{group} is a {type(entries).__name__}, not a dict")
            for name, value in entries.items():
                if value is None:
                    continue
                if not isinstance(value, torch.Tensor):
                    raise PointNetFileError(f"{source!r}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                tensors[f"{prefix}{name}"] = value
        children = state.get("_modules", {})
        if not isinstance(children, dict):
            raise PointNetFileError(f"{source!r}: {prefix}_modules is a {type(children).__name__}, not a dict")
        for name, child in reversed(list(children.items())):  # reversed: popped in module order
            if child is None:
                continue
            if not (isinstance(child, _StandIn) and child.is_module):
                raise PointNetFileError(f"{source!r}: {prefix}{name} is not a module ({child!r})")
            stack.append((f"{prefix}{name}.", child))
    return tensors, classes


def _layout(classes: dict[str, str]) -> str:
    kinds = set(classes.values())
    if "torch_geometric.nn.conv.point_conv.PointConv" in kinds:
        return "whole pickled model, torch_geometric 1.x layout (PointConv)"
    if "torch_geometric.nn.conv.point_conv.PointNetConv" in kinds:
        return "whole pickled model, torch_geometric 2.x layout (PointNetConv)"
    return "whole pickled model"


# --------------------------------------------------------------------------------------------
# Name mapping: release -> this project's PointNet2
# --------------------------------------------------------------------------------------------

_NORM_PARAMS = "weight|bias|running_mean|running_var|num_batches_tracked"
#: (pattern on this project's PointNet2 names, replacement giving the release's name)
_TO_RELEASE: tuple[tuple[re.Pattern, object], ...] = (
    (re.compile(r"set_abstractions\.(\d+)\.mlp\.(\d+)\.linear\.(weight|bias)"),
     lambda m: f"sa{int(m[1]) + 1}.point_conv.local_nn.{m[2]}.0.{m[3]}"),
    (re.compile(rf"set_abstractions\.(\d+)\.mlp\.(\d+)\.norm\.({_NORM_PARAMS})"),
     lambda m: f"sa{int(m[1]) + 1}.point_conv.local_nn.{m[2]}.1.{m[3]}"),
    (re.compile(r"global_abstraction\.mlp\.(\d+)\.linear\.(weight|bias)"), lambda m: f"ga.mlp.{m[1]}.0.{m[2]}"),
    (re.compile(rf"global_abstraction\.mlp\.(\d+)\.norm\.({_NORM_PARAMS})"), lambda m: f"ga.mlp.{m[1]}.1.{m[2]}"),
    (re.compile(r"fc1\.(weight|bias)"), lambda m: f"lin1.{m[1]}"),
    (re.compile(r"fc2\.(weight|bias)"), lambda m: f"lin2.{m[1]}"),
)
#: Release tensors that have no place in the object encoder: the pretraining's classifier heads.
_LEFT_OUT = re.compile(r"(class|color)_classifier\.(weight|bias)")


def release_name(name: str) -> str:
    """This project's PointNet2 state_dict name -> the release's name of the same tensor."""
    for pattern, replace in _TO_RELEASE:
        m = pattern.fullmatch(name)
        if m:
            return replace(m)
    raise KeyError(f"no release name for {name!r}")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _trim_trailing_ones(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def convert_release_tensors(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Release tensors by name -> (state_dict of PointNet2, its out_dim, report lines).

    Raises PointNetFileError naming every unexpected, missing or mismatching tensor.
    """
    from spatialoc_ros.models.object_encoder import PointNet2

    if "lin2.weight" not in tensors or tensors["lin2.weight"].dim() != 2:
        raise PointNetFileError(
            f"{source!r} has no 2-d lin2.weight, so it is not the release's PointNet2 (its tensors: "
            f"{_names(sorted(tensors))})"
        )
    out_dim = int(tensors["lin2.weight"].shape[0])
    expected = PointNet2(out_dim=out_dim).state_dict()
    wanted = {release_name(ours): ours for ours in expected}  # release name -> ours
    state: dict[str, torch.Tensor] = {}
    report: list[str] = []
    unexpected, mismatched = [], []
    for name in tensors:  # in the file's (module) order, so the first mismatch comes first
        value = tensors[name].detach()
        if _LEFT_OUT.fullmatch(name):
            report.append(f"left out {name} {_shape(value)}: a head of the pretraining classifier, not "
                          "part of the object encoder")
            continue
        ours = wanted.get(name)
        if ours is None:
            unexpected.append(f"{name} {_shape(value)}")
            continue
        want = expected[ours]
        action = "mapped   "
        if value.shape != want.shape:
            if value.numel() == want.numel() and _trim_trailing_ones(value.shape) == tuple(want.shape):
                value = value.reshape(want.shape)
                action = "reshaped "
            else:
                mismatched.append(f"{name}: file {_shape(value)}, expected {_shape(want)}")
                continue
        note = ""
        if value.dtype != want.dtype:
            if value.is_floating_point() and want.is_floating_point():
                note = f" (cast from {str(value.dtype).replace('torch.', '')})"
                value = value.to(want.dtype)
            else:
                mismatched.append(f"{name}: file dtype {value.dtype}, expected {want.dtype}")
                continue
        state[ours] = value.to("cpu").clone().contiguous()
        report.append(f"{action}{name} {_shape(tensors[name])} -> {ours}{note}")
    missing = [name for name, ours in wanted.items() if ours not in state and name not in tensors]
    if unexpected or missing or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shapes differ: {_names(mismatched)}")
        if missing:
            parts.append(f"missing: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected: {_names(unexpected)}")
        raise PointNetFileError(
            f"{source!r} is not the release's PointNet2 layout (a {out_dim}-d lin2; set-abstraction MLPs "
            f"6-32-64, 67-128-128, 131-256-256, global 259-512-1024, lin1 1024-512): " + "; ".join(parts)
        )
    return state, out_dim, report


# --------------------------------------------------------------------------------------------
# The public readers and writer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointNetWeights:
    """Weights ready for ``build_pointnet(arch, out_dim).load_state_dict(state, strict=True)``."""

    arch: str  # 'mlp' or 'pointnet2'
    out_dim: int  # the PointNet's output width (pointnet_dim)
    state: dict  # name -> CPU tensor
    layout: str  # what the file was
    report: tuple[str, ...]  # one line per tensor: mapped / reshaped / left out


@dataclass(frozen=True)
class PointNetInfo:
    arch: str
    out_dim: int


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _from_converted(obj: dict, path: str) -> PointNetWeights:
    from spatialoc_ros.models.config import POINTNET_ARCHS

    if obj.get("version") != POINTNET_FILE_VERSION:
        raise PointNetFileError(f"{path!r} is a PointNet file of version {obj.get('version')!r}; this code "
                                f"reads version {POINTNET_FILE_VERSION}")
    config, model = obj.get("config"), obj.get("model")
    if not (isinstance(config, dict) and config.get("arch") in POINTNET_ARCHS
            and isinstance(config.get("out_dim"), int) and _is_tensor_dict(model)):
        raise PointNetFileError(f"{path!r} is a damaged PointNet file (config {config!r}); convert the "
                                "release file again")
    extra = obj.get("extra") if isinstance(obj.get("extra"), dict) else {}
    report = tuple(str(line) for line in extra.get("report", ()))
    layout = f"converted PointNet file (from {extra.get('source', '?')})"
    return PointNetWeights(config["arch"], config["out_dim"], dict(model), layout, report)


def _from_mlp_state(state: dict, path: str) -> PointNetWeights:
    linears = sorted((int(m[1]), k) for k in state if (m := re.fullmatch(r"point_mlp\.(\d+)\.weight", k)))
    if not linears or state[linears[-1][1]].dim() != 2:
        raise PointNetFileError(f"{path!r} has point_mlp.* tensors but no Linear weights")
    out_dim = int(state[linears[-1][1]].shape[0])
    report = tuple(f"mapped    {k} {_shape(v)} -> {k}" for k, v in sorted(state.items()))
    return PointNetWeights("mlp", out_dim, dict(state), "state_dict of this project's 'mlp' PointNet", report)


def read_pointnet_file(path: str) -> PointNetWeights:
    """Read any accepted PointNet file (module docstring) safely -> :class:`PointNetWeights`.

    Raises FileNotFoundError, :class:`UnsafePointNetFileError` (a global outside the allow-list)
    or :class:`PointNetFileError` (truncated, damaged, another architecture), each with one line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PointNet weights {path!r} do not exist")
    obj = _load_safely(path)
    if isinstance(obj, dict) and "kind" in obj and "model" in obj:
        if obj["kind"] != POINTNET_FILE_KIND:
            raise PointNetFileError(f"{path!r} is a spatialoc_ros {obj['kind']!r} checkpoint, not PointNet weights")
        return _from_converted(obj, path)
    if _is_tensor_dict(obj):
        keys = sorted(obj)
        if all(k.startswith("point_mlp.") for k in keys):
            return _from_mlp_state(obj, path)
        if any(k.startswith(("sa1.", "ga.", "lin1.", "lin2.")) for k in keys):
            state, out_dim, report = convert_release_tensors(obj, path)
            return PointNetWeights("pointnet2", out_dim, state, "state_dict of the release's PointNet2", tuple(report))
        raise PointNetFileError(
            f"{path!r} holds a state_dict of another architecture (tensors {_names(keys)}); expected the "
            "release's PointNet2 (sa1.point_conv.local_nn..., lin2.weight) or this project's PointNet (point_mlp.*)"
        )
    if isinstance(obj, _StandInModule):
        if obj.released_as != RELEASE_ROOT:
            raise PointNetFileError(f"{path!r} holds a pickled {obj.released_as}, not the release's {RELEASE_ROOT}")
        tensors, classes = _module_tensors(obj, path)
        state, out_dim, report = convert_release_tensors(tensors, path)
        return PointNetWeights("pointnet2", out_dim, state, _layout(classes), tuple(report))
    raise PointNetFileError(f"{path!r} holds a {type(obj).__name__}, not PointNet weights")


@functools.lru_cache(maxsize=8)
def _describe(path: str, mtime_ns: int, size: int) -> PointNetInfo:
    weights = read_pointnet_file(path)
    return PointNetInfo(weights.arch, weights.out_dim)


def describe_pointnet_file(path: str) -> PointNetInfo:
    """(arch, out_dim) of a PointNet file, read once per file version (cached on mtime and size)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PointNet weights {path!r} do not exist")
    st = os.stat(path)
    return _describe(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def save_pointnet_file(path: str, weights: PointNetWeights, source: str) -> None:
    """Write ``weights`` in this project's PointNet format (atomically: temp file + rename)."""
    payload = {
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.state.items()},
        "config": {"arch": weights.arch, "out_dim": int(weights.out_dim)},
        "kind": POINTNET_FILE_KIND,
        "version": POINTNET_FILE_VERSION,
        "extra": {"source": source, "layout": weights.layout, "report": list(weights.report)},
    }
    from spatialoc_ros.models.checkpoint import save_atomically

    save_atomically(payload, path)


def summary(weights: PointNetWeights) -> str:
    """One line: counts of the report and the settings the weights need."""
    counts = {kind: sum(line.startswith(kind) for line in weights.report)
              for kind in ("mapped", "reshaped", "left out")}
    return (f"{counts['mapped']} tensors mapped, {counts['reshaped']} reshaped, {counts['left out']} left out; "
            f"pointnet_arch={weights.arch!r}, pointnet_dim={weights.out_dim}")


def convert(src: str, dst: str) -> PointNetWeights:
    """Read ``src`` safely, write ``dst`` in this project's format, and check that it loads strictly."""
    from spatialoc_ros.models.object_encoder import build_pointnet

    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise PointNetFileError(f"OUT {dst!r} is IN; write the converted file elsewhere")
    weights = read_pointnet_file(src)
    save_pointnet_file(dst, weights, source=os.path.basename(src))
    again = read_pointnet_file(dst)
    build_pointnet(again.arch, again.out_dim).load_state_dict(again.state, strict=True)
    return weights


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.models.convert_pointnet",
        description="Convert the released PointNet++ object backbone (a whole pickled model, read "
        "without running anything it names) into this project's weights-only PointNet file.",
    )
    parser.add_argument("input", metavar="IN.pth", help=f"the release's file (e.g. {SEED_POINTNET_NAME}), its "
                        "state_dict variant, or a PointNet file of this project")
    parser.add_argument("output", metavar="OUT.pth", help="where to write the converted file (e.g. "
                        f"checkpoints/{SEED_POINTNET_NAME}, where the seed's training command finds it)")
    parser.add_argument("--quiet", action="store_true", help="print the summary line only, not one line per tensor")
    args = parser.parse_args(argv)
    try:
        weights = convert(args.input, args.output)
    except (PointNetFileError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[convert] {args.input}: {weights.layout}")
    if not args.quiet:
        for line in weights.report:
            print(f"  {line}")
    print(f"[convert] wrote {args.output}: {summary(weights)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
