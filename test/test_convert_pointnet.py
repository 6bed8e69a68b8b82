"""The released PointNet++ backbone, safely: conversion, refusals, and the seed README's layout.

The fixtures are whole-model checkpoints pickled here from stand-in classes placed under the
release's module paths (``models.pointcloud.pointnet2``) with torch_geometric's point layer in
its 1.x layout (``PointConv``, an ``Inspector`` holding ``inspect.Parameter`` objects) and its 2.x
layout (``PointNetConv`` with ``MaxAggregation`` and ``Signature`` records), storages tagged
``cuda:0``. Neither torch_geometric nor the release is needed.
"""
import inspect
import os
import pickle
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Optional

import pytest
import torch
import torch.nn as nn

from spatialoc_ros.models import convert_pointnet as cp
from spatialoc_ros.models.object_encoder import ObjectEncoder, PointNet, PointNet2

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)
NUM_CLASSES, NUM_COLORS = 22, 8
RELEASE_WIDTHS = {"sa": ([6, 32, 64], [67, 128, 128], [131, 256, 256]), "ga": [259, 512, 1024], "lin": (1024, 512, 256)}
# the "slightly better but larger" variant left commented out in the release: another architecture
LARGER_WIDTHS = {"sa": ([6, 32, 64], [67, 128, 256], [259, 512, 512]), "ga": [515, 1024, 2048],
                 "lin": (2048, 1024, 512)}


# ------------------------------------------------------------------ release-like classes


def _place(mp: pytest.MonkeyPatch, cls: type, module: str, name: str) -> type:
    """Make ``cls`` importable as ``module.name`` (fake modules in sys.modules, undone by ``mp``)."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        full = ".".join(parts[:i])
        if not getattr(sys.modules.get(full), "_fake_for_test", False):
            fake = types.ModuleType(full)
            fake._fake_for_test = True
            mp.setitem(sys.modules, full, fake)
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    setattr(sys.modules[module], name, cls)
    return cls


def _release_classes(mp: pytest.MonkeyPatch, pyg: int) -> types.SimpleNamespace:
    """Classes with the release's module paths and attribute layout (pyg: torch_geometric 1 or 2)."""
    ns = types.SimpleNamespace()
    sparse = _place(mp, type("SparseTensor", (), {}), "torch_sparse.tensor" if pyg == 1 else "torch_geometric.typing",
                    "SparseTensor")

    def message(x_j: Optional[torch.Tensor], pos_i: torch.Tensor, pos_j: torch.Tensor) -> torch.Tensor: ...

    def aggregate(inputs: torch.Tensor, index: torch.Tensor, ptr: Optional[torch.Tensor] = None,
                  dim_size: Optional[int] = None) -> torch.Tensor: ...

    def message_and_aggregate(adj_t: sparse) -> torch.Tensor: ...

    def update(inputs: torch.Tensor) -> torch.Tensor: ...

    signatures = {f.__name__: inspect.signature(f) for f in (message, aggregate, message_and_aggregate, update)}

    if pyg == 1:
        class Inspector:  # torch_geometric.nn.conv.utils.inspector.Inspector (1.7)
            def __init__(self, base_class):
                self.base_class = base_class  # the layer itself: a reference cycle in the pickle
                self.params = {name: OrderedDict(sig.parameters) for name, sig in signatures.items()}

        _place(mp, Inspector, "torch_geometric.nn.conv.utils.inspector", "Inspector")

        class PointConv(nn.Module):
            def __init__(self, local_nn):
                super().__init__()
                self.aggr, self.flow, self.node_dim = "max", "source_to_target", -2
                self.inspector = Inspector(self)
                self.__user_args__ = {"x_j", "pos_i", "pos_j"}
                self.__fused_user_args__ = set()
                self.fuse, self.__explain__, self.__edge_mask__ = False, False, None
                self.local_nn, self.global_nn, self.add_self_loops = local_nn, None, True

        ns.conv = _place(mp, PointConv, "torch_geometric.nn.conv.point_conv", "PointConv")
    else:
        class Parameter(NamedTuple):  # torch_geometric.inspector.Parameter (2.5)
            name: str
            type: Any
            type_repr: str
            default: Any

        class Signature(NamedTuple):
            param_dict: dict
            return_type: Any
            return_type_repr: str

        _place(mp, Parameter, "torch_geometric.inspector", "Parameter")
        _place(mp, Signature, "torch_geometric.inspector", "Signature")

        class Inspector:
            def __init__(self, cls):
                self._cls = cls
                self._signature_dict = {
                    name: Signature({p.name: Parameter(p.name, p.annotation, str(p.annotation), p.default)
                                     for p in sig.parameters.values()}, sig.return_annotation, "Tensor")
                    for name, sig in signatures.items()}
                self._source_dict = {}

        _place(mp, Inspector, "torch_geometric.inspector", "Inspector")
        aggregation = _place(mp, type("MaxAggregation", (nn.Module,), {}), "torch_geometric.nn.aggr.basic",
                             "MaxAggregation")

        class PointNetConv(nn.Module):
            def __init__(self, local_nn):
                super().__init__()
                self.aggr, self.flow, self.node_dim = "max", "source_to_target", -2
                self.aggr_module = aggregation()
                self.inspector = Inspector(type(self))
                self._user_args, self._fused_user_args, self._edge_user_args = ["x_j", "pos_i", "pos_j"], [], []
                self.fuse = False
                self._propagate_forward_pre_hooks = OrderedDict()
                self._explain, self._edge_mask, self._loop_mask, self._apply_sigmoid = None, None, None, True
                self._decomposed_layers = 1
                self.local_nn, self.global_nn, self.add_self_loops = local_nn, None, True

        ns.conv = _place(mp, PointNetConv, "torch_geometric.nn.conv.point_conv", "PointNetConv")

    class SetAbstractionLayer(nn.Module):
        def __init__(self, ratio, radius, mlp):
            super().__init__()
            self.ratio, self.radius = ratio, radius
            self.point_conv = ns.conv(local_nn=mlp)

    class GlobalAbstractionLayer(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

    class PointNet2Release(nn.Module):
        def __init__(self, widths):
            super().__init__()
            self.sa1 = ns.sa(0.5, 0.2, _get_mlp(widths["sa"][0]))
            self.sa2 = ns.sa(0.5, 0.3, _get_mlp(widths["sa"][1]))
            self.sa3 = ns.sa(0.5, 0.4, _get_mlp(widths["sa"][2]))
            self.ga = ns.ga(_get_mlp(widths["ga"]))
            d0, d1, d2 = widths["lin"]
            self.lin1, self.lin2 = nn.Linear(d0, d1), nn.Linear(d1, d2)
            self.class_classifier, self.color_classifier = nn.Linear(d2, NUM_CLASSES), nn.Linear(d2, NUM_COLORS)
            self.dim0, self.dim1, self.dim2 = d0, d1, d2

    ns.sa = _place(mp, SetAbstractionLayer, "models.pointcloud.pointnet2", "SetAbstractionLayer")
    ns.ga = _place(mp, GlobalAbstractionLayer, "models.pointcloud.pointnet2", "GlobalAbstractionLayer")
    ns.model = _place(mp, PointNet2Release, "models.pointcloud.pointnet2", "PointNet2")
    return ns


def _get_mlp(widths):
    """The release's get_mlp: blocks of Linear + BatchNorm1d + ReLU."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(widths[i - 1], widths[i]), nn.BatchNorm1d(widths[i]), nn.ReLU())
                           for i in range(1, len(widths))])


def _release_model(ns, widths, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ns.model(widths)
    with torch.no_grad():  # trained-looking BatchNorm statistics, so they are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(1234)
    return model


def _save_cuda_tagged(obj, path: Path, mp: pytest.MonkeyPatch) -> None:
    """torch.save with every storage tagged cuda:0, as the release (saved on a GPU) has them."""
    with mp.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


class Payload:
    """Runs a shell command when unpickled (a __reduce__ payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Files: the release in both layouts, a malicious twin, the larger variant; plus the tensors."""
    out = tmp_path_factory.mktemp("release")
    files = {"dir": out}
    with pytest.MonkeyPatch.context() as mp:
        for pyg in (1, 2):
            ns = _release_classes(mp, pyg)
            model = _release_model(ns, RELEASE_WIDTHS, seed=pyg)
            files[f"pyg{pyg}"] = out / f"pyg{pyg}_{cp.SEED_POINTNET_NAME}"
            _save_cuda_tagged(model, files[f"pyg{pyg}"], mp)
            files[f"pyg{pyg}_tensors"] = {k: v.clone() for k, v in model.state_dict().items()}
            if pyg == 1:
                files["state_dict"] = out / "pointnet_acc0.86_lr1_p256.pth"  # Text2Pos' state_dict variant
                torch.save(model.state_dict(), files["state_dict"])
                model.lin1.payload = Payload(out / "executed.marker")  # the malicious twin
                files["evil"] = out / "evil.pth"
                torch.save(model, files["evil"])
                files["larger"] = out / "larger.pth"
                torch.save(_release_model(ns, LARGER_WIDTHS, seed=3), files["larger"])
        # the payload is live: an unrestricted load (what the release does) runs it
        proof = out / "proof.marker"
        evil_twin = _release_classes(mp, 1).model(RELEASE_WIDTHS)
        evil_twin.lin1.payload = Payload(proof)
        torch.save(evil_twin, out / "proof.pth")
        torch.load(out / "proof.pth", weights_only=False)  # on purpose: the release's way of loading
        files["payload_is_live"] = proof.is_file()
    return files


# ------------------------------------------------------------------ conversion


@pytest.mark.parametrize("layout", ["pyg1", "pyg2"])
def test_whole_model_converts_and_loads_strictly(release, layout, tmp_path, capsys):
    src, dst = release[layout], tmp_path / "converted.pth"
    with zipfile.ZipFile(src) as z:  # the fixture really is a whole model with cuda:0 storages
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pkl and b"models.pointcloud.pointnet2" in pkl and b"Inspector" in pkl
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        torch.load(src, weights_only=True)  # plain weights-only loading cannot read it

    assert cp.main([str(src), str(dst)]) == 0
    printed = capsys.readouterr().out
    assert ("1.x layout (PointConv)" if layout == "pyg1" else "2.x layout (PointNetConv)") in printed
    originals = release[f"{layout}_tensors"]
    for name in originals:  # every tensor of the file is reported exactly once
        assert sum(f" {name} (" in line for line in printed.splitlines()) == 1, name
    assert "left out class_classifier.weight (22, 256)" in printed

    payload = torch.load(dst, map_location="cpu", weights_only=True)  # no allow-list needed any more
    assert payload["kind"] == "pointnet" and payload["config"] == {"arch": "pointnet2", "out_dim": 256}
    net = PointNet2(out_dim=payload["config"]["out_dim"])
    net.load_state_dict(payload["model"], strict=True)
    for ours, tensor in net.state_dict().items():
        assert torch.equal(tensor, originals[cp.release_name(ours)]), ours
    assert len(net.state_dict()) == len(originals) - 4  # everything but the two classifier heads
    report = payload["extra"]["report"]
    assert sum(line.startswith("mapped") for line in report) == len(net.state_dict())
    assert sum(line.startswith("left out") for line in report) == 4
    # the forward pass runs on the CPU
    net.eval()
    g = torch.Generator().manual_seed(0)
    xyz, rgb = torch.rand(5, 32, 3, generator=g), torch.rand(5, 32, 3, generator=g)
    features = net(xyz, rgb, xyz.mean(dim=1))
    assert features.shape == (5, 256) and torch.isfinite(features).all() and (features >= 0).all()


def test_release_file_and_state_dict_load_directly(release, tmp_path):
    """--pointnet_path given the release file itself: the same safe reader converts it in memory."""
    originals = release["pyg1_tensors"]
    for path in (release["pyg1"], release["state_dict"]):
        enc = ObjectEncoder(embed_dim=16, pointnet_dim=256, use_features=["class"], pointnet_arch="pointnet2",
                            pointnet_path=str(path))
        for ours in ("fc2.weight", "set_abstractions.0.mlp.0.linear.weight",
                     "global_abstraction.mlp.1.norm.running_var"):
            assert torch.equal(enc.pointnet.state_dict()[ours], originals[cp.release_name(ours)])
    # the feature width comes from the file's lin2
    narrow = {k: (v[:96] if k.startswith("lin2.") else v[:, :96] if k.endswith("classifier.weight") else v)
              for k, v in originals.items()}
    torch.save(narrow, tmp_path / "narrow.pth")
    weights = cp.read_pointnet_file(str(tmp_path / "narrow.pth"))
    assert weights.out_dim == 96 and cp.describe_pointnet_file(str(tmp_path / "narrow.pth")).out_dim == 96
    PointNet2(out_dim=96).load_state_dict(weights.state, strict=True)
    with pytest.raises(ValueError, match="pointnet_arch='pointnet2'"):
        ObjectEncoder(embed_dim=16, pointnet_dim=256, use_features=[], pointnet_path=str(release["pyg1"]))
    with pytest.raises(ValueError, match="does not match.*pointnet_dim=256"):
        ObjectEncoder(embed_dim=16, pointnet_dim=128, use_features=[], pointnet_arch="pointnet2",
                      pointnet_path=str(release["pyg1"]))


def test_conv1d_shaped_weights_are_reshaped_and_reported(release, tmp_path):
    state = dict(release["pyg1_tensors"])
    state["lin1.weight"] = state["lin1.weight"].unsqueeze(-1)  # (512, 1024, 1), as a 1x1 Conv1d keeps it
    state["lin2.bias"] = state["lin2.bias"].double()
    torch.save(state, tmp_path / "conv_shaped.pth")
    weights = cp.read_pointnet_file(str(tmp_path / "conv_shaped.pth"))
    assert "reshaped lin1.weight (512, 1024, 1) -> fc1.weight" in weights.report
    assert "mapped   lin2.bias (256) -> fc2.bias (cast from float64)" in weights.report
    assert torch.equal(weights.state["fc1.weight"], release["pyg1_tensors"]["lin1.weight"])
    assert cp.summary(weights).startswith("59 tensors mapped, 1 reshaped, 4 left out")


def test_config_takes_the_arch_from_the_file_and_checkpoints_keep_it(release, tmp_path):
    from spatialoc_ros.models import CoarseConfig, build_coarse_model
    from spatialoc_ros.models.checkpoint import load_checkpoint, save_checkpoint

    converted = tmp_path / "pn.pth"
    cp.convert(str(release["pyg2"]), str(converted))
    cfg = CoarseConfig(text_dim=8, embed_dim=16, num_points=8, max_objects=4, pointnet_dim=256,
                       pointnet_path=str(converted), num_hidden_layers=1, num_heads=2, beose_dim=4)
    assert cfg.pointnet_arch == "pointnet2"
    assert CoarseConfig(text_dim=8, embed_dim=16, num_heads=2).pointnet_arch == "mlp"
    model = build_coarse_model(cfg)
    original = release["pyg2_tensors"]["lin2.weight"]
    assert torch.equal(model.object_encoder.pointnet.fc2.weight, original)
    save_checkpoint(str(tmp_path / "c.pth"), model, cfg, "coarse")
    converted.unlink()  # a checkpoint rebuilds from its config alone
    again, cfg2, _ = load_checkpoint(str(tmp_path / "c.pth"), "coarse")
    assert cfg2.pointnet_arch == "pointnet2" and torch.equal(again.object_encoder.pointnet.fc2.weight, original)


def test_pointnet2_encoder_trains_and_ignores_padding():
    from models_testing_utils import assert_all_params_get_grads, perturb_padding
    from spatialoc_ros.models.random_inputs import random_cell_batch

    cells = random_cell_batch(3, max_objects=5, num_points=8, min_objects=1, generator=torch.Generator().manual_seed(0))
    cells.mask[0, 1:] = False  # one cell with a single object
    enc = ObjectEncoder(embed_dim=16, pointnet_dim=24, use_features=["class", "position"], pointnet_arch="pointnet2")
    out = enc(cells)
    assert out.shape == (3, 5, 16) and out[~cells.mask].abs().sum() == 0
    assert_all_params_get_grads(enc, (out ** 2).sum())
    other = enc(perturb_padding(cells, torch.Generator().manual_seed(1)))
    assert torch.allclose(out, other, atol=1e-5)
    one = cells.index(slice(0, 1))  # a training batch of one object: BatchNorm falls back to running stats
    assert torch.isfinite(enc(one)).all()


# ------------------------------------------------------------------ refusals


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_malicious_twin_is_refused_and_nothing_runs(release, tmp_path, capsys):
    assert release["payload_is_live"], "the fixture's payload must run under a plain torch.load"
    marker, out = release["dir"] / "executed.marker", tmp_path / "out.pth"
    assert cp.main([str(release["evil"]), str(out)]) == 2
    err = _one_line_error(capsys)
    assert "refused" in err and "posix.system" in err and "nothing in it was run" in err
    with pytest.raises(cp.UnsafePointNetFileError, match="posix.system"):
        ObjectEncoder(embed_dim=16, pointnet_dim=256, use_features=[], pointnet_arch="pointnet2",
                      pointnet_path=str(release["evil"]))
    from spatialoc_ros.models import CoarseConfig

    with pytest.raises(cp.UnsafePointNetFileError):
        CoarseConfig(pointnet_path=str(release["evil"]))
    # the CLI in its own process too (a payload could only run there unnoticed)
    cli = [sys.executable, "-m", "spatialoc_ros.models.convert_pointnet", str(release["evil"]), str(out)]
    proc = subprocess.run(cli, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "posix.system" in proc.stderr
    assert not marker.exists() and not out.exists()


def test_a_call_under_an_allowed_name_runs_nothing(tmp_path):
    """An allow-listed name reached by REDUCE gets an inert stand-in, whatever the arguments."""
    marker = tmp_path / "called.marker"
    with pytest.MonkeyPatch.context() as mp:
        fake = _place(mp, type("PointNet2", (), {}), "models.pointcloud.pointnet2", "PointNet2")
        fake.__reduce__ = lambda self: (type(self), (f"touch {marker}",))
        torch.save(fake(), tmp_path / "reduce.pth")
    with pytest.raises(cp.PointNetFileError, match="lin2.weight"):
        cp.read_pointnet_file(str(tmp_path / "reduce.pth"))
    assert not marker.exists()


def test_truncated_and_damaged_files_are_refused(release, tmp_path, capsys):
    data = release["pyg1"].read_bytes()
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert cp.main([str(cut), str(tmp_path / "o.pth")]) == 2
    assert "not a complete torch checkpoint" in _one_line_error(capsys)
    # a complete zip whose pickle stops half way
    with zipfile.ZipFile(release["pyg1"]) as z_in, zipfile.ZipFile(tmp_path / "half.pth", "w") as z_out:
        for info in z_in.infolist():
            body = z_in.read(info)
            z_out.writestr(info, body[: len(body) // 2] if info.filename.endswith("data.pkl") else body)
    with pytest.raises(cp.PointNetFileError, match="truncated"):
        cp.read_pointnet_file(str(tmp_path / "half.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(cp.PointNetFileError, match="not a complete torch checkpoint"):
        cp.read_pointnet_file(str(tmp_path / "text.pth"))
    with pytest.raises(FileNotFoundError):
        cp.read_pointnet_file(str(tmp_path / "missing.pth"))


def test_other_architectures_are_refused_with_the_mismatching_names(release, tmp_path, capsys):
    assert cp.main([str(release["larger"]), str(tmp_path / "o.pth")]) == 2
    err = _one_line_error(capsys)
    assert "not the release's PointNet2 layout" in err
    assert "a 512-d lin2" in err and "shapes differ: sa2.point_conv.local_nn.1.0.weight: file (256, 128), " \
        "expected (128, 128), sa2.point_conv.local_nn.1.0.bias: file (256), expected (128)" in err
    assert "(33 in all)" in err  # every tensor after sa2's first block differs
    # this project's own PointNet pickled whole: its class is not on the allow-list
    torch.save(PointNet(out_dim=8), tmp_path / "whole.pth")
    with pytest.raises(cp.UnsafePointNetFileError, match="spatialoc_ros.models.object_encoder.PointNet"):
        cp.read_pointnet_file(str(tmp_path / "whole.pth"))
    # a state_dict of something else
    torch.save(nn.Conv1d(3, 4, 1).state_dict(), tmp_path / "conv.pth")
    with pytest.raises(cp.PointNetFileError, match=r"another architecture \(tensors bias, weight\)"):
        cp.read_pointnet_file(str(tmp_path / "conv.pth"))
    # the release's names with one set-abstraction block missing and one extra
    state = dict(release["pyg1_tensors"])
    state["sa4.point_conv.local_nn.0.0.weight"] = state.pop("sa3.point_conv.local_nn.1.0.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(cp.PointNetFileError) as info:
        cp.read_pointnet_file(str(tmp_path / "renamed.pth"))
    assert "missing: sa3.point_conv.local_nn.1.0.weight" in str(info.value)
    assert "unexpected: sa4.point_conv.local_nn.0.0.weight (256, 256)" in str(info.value)


# ------------------------------------------------------------------ the seed README's layout


def _tiny_t5(folder: Path) -> None:
    """A random 2-layer T5 encoder and a word-level tokenizer, saved like a downloaded Flan-T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ("The pose is north south east west on-top of a an the building pole vegetation terrain road "
             "sidewalk parking wall fence car traffic light sign lamp trash bin box stop gray black white green "
             "dark-green red blue yellow beige brown bright-gray dark-gray")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([words, "."], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(folder))
    torch.manual_seed(0)
    config = T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def seed_layout(release, small_city, tmp_path_factory):
    """A working directory laid out as the seed README says: t5-large/, checkpoints/<backbone>, data/."""
    work = tmp_path_factory.mktemp("seed_layout")
    _tiny_t5(work / "t5-large")
    cp.convert(str(release["pyg1"]), str(work / "checkpoints" / cp.SEED_POINTNET_NAME))
    data = work / "data" / "KITTI360Pose" / "k360_30-10_scG_pd10_pc4_spY_all"
    _short_city(small_city, data)
    return work


def _short_city(src, dst, poses_per_scene: int = 13) -> None:
    """The small city with a few poses per scene, so that one whole epoch of the seed's commands
    (no --max_batches) takes seconds: 5 train scenes x 13 = 65 queries."""
    import pickle
    import shutil

    from spatialoc_ros.data.safe_pickle import safe_load_pickle

    shutil.copytree(src, dst)
    for path in (dst / "poses").glob("*.pkl"):
        poses = safe_load_pickle(str(path))
        with open(path, "wb") as f:
            pickle.dump(poses[:poses_per_scene], f, protocol=4)


def test_hungging_model_t5_large_finds_the_local_folder(seed_layout, monkeypatch, tmp_path):
    from spatialoc_ros.models.text_encoder import resolve_text_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.chdir(seed_layout)
    assert resolve_text_model("t5-large") == str(seed_layout / "t5-large")
    monkeypatch.chdir(seed_layout / "data")
    with pytest.raises(ValueError, match=r"\./t5-large"):  # elsewhere: a hint at the seed's layout
        resolve_text_model("t5-large")


def test_pointnet_path_defaults_to_the_seed_place(seed_layout, monkeypatch, capsys):
    from spatialoc_ros.training import args as targs
    from spatialoc_ros.training.coarse import build_parser

    monkeypatch.chdir(seed_layout)

    def parsed(*argv):
        parser = build_parser()
        args = parser.parse_args(list(argv))
        targs.check_common(args, parser)
        return args

    args = parsed()
    assert args.pointnet_path == os.path.join("./checkpoints", cp.SEED_POINTNET_NAME) and args.pointnet_dim == 256
    assert "PointNet backbone" in capsys.readouterr().out
    args = parsed("--pointnet_path", "none")
    assert args.pointnet_path is None and args.pointnet_dim == 128
    with pytest.raises(SystemExit):
        parsed("--pointnet_dim", "64")
    assert "--pointnet_dim 64 does not fit" in capsys.readouterr().err
    monkeypatch.chdir(seed_layout / "data")  # no checkpoints/ here: nothing is loaded
    assert parsed().pointnet_path is None


# The seed README's coarse command, word for word, apart from --epochs.
SEED_COARSE = ("--batch_size 64 --coarse_embed_dim 256 --shuffle "
               "--base_path ./data/KITTI360Pose/k360_30-10_scG_pd10_pc4_spY_all/ "
               "--use_features class color position num --no_pc_augment --fixed_embedding "
               "--epochs 1 --learning_rate 0.0001 --lr_scheduler step --lr_step 5 --lr_gamma 0.5 "
               "--temperature 0.05 --ranking_loss CCL --num_of_hidden_layer 3 --alpha 2 "
               "--hungging_model t5-large --folder_name PATH_TO_COARSE").split()


# ... and its fine command (with --fixed_embedding twice, as there)
SEED_FINE = ("--batch_size 32 --fine_embed_dim 128 --shuffle "
             "--base_path ./data/KITTI360Pose/k360_30-10_scG_pd10_pc4_spY_all/ "
             "--use_features class color position num --no_pc_augment --fixed_embedding "
             "--epochs 1 --learning_rate 0.0003 --fixed_embedding --hungging_model t5-large "
             "--regressor_cell all --pmc_prob 0.5 --folder_name PATH_TO_FINE").split()


@pytest.mark.parametrize("stage, argv", [("coarse", SEED_COARSE), ("fine", SEED_FINE)])
def test_seed_training_command_starts_from_the_backbone(seed_layout, release, stage, argv):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", f"spatialoc_ros.training.{stage}", *argv], cwd=seed_layout,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"checkpoints/{cp.SEED_POINTNET_NAME}" in proc.stdout and "pointnet_dim 256" in proc.stdout

    from spatialoc_ros.models.checkpoint import load_checkpoint

    best = seed_layout / "checkpoints" / f"PATH_TO_{stage.upper()}" / "best.pth"
    model, cfg, _ = load_checkpoint(str(best), stage)
    assert cfg.text_model == "t5-large" and cfg.text_dim == 32
    assert cfg.pointnet_arch == "pointnet2" and cfg.pointnet_dim == 256
    assert cfg.pointnet_path == os.path.join("./checkpoints", cp.SEED_POINTNET_NAME)
    trained = model.object_encoder.pointnet.state_dict()
    torch.manual_seed(0)
    fresh = PointNet2(out_dim=256).state_dict()
    for ours in ("fc2.weight", "fc1.bias", "set_abstractions.0.mlp.0.linear.weight",
                 "set_abstractions.2.mlp.1.norm.weight", "global_abstraction.mlp.1.linear.weight"):
        start = release["pyg1_tensors"][cp.release_name(ours)]
        # each Adam step moves a weight by at most about the learning rate, and one epoch of 65
        # queries is a handful of steps (batches hold distinct cells): the trained weights stay
        # within 0.01 of the release's, while a fresh init is more than 0.05 away
        assert (trained[ours] - start).abs().max() <= 0.01, ours
        assert (fresh[ours] - start).abs().max() > 0.05, ours


def test_pointnet_arch_flag_trains_the_release_shape_from_scratch(small_city, tmp_path):
    from spatialoc_ros.models.builder import build_coarse_model
    from spatialoc_ros.models.object_encoder import PointNet2
    from spatialoc_ros.training import args as targs
    from spatialoc_ros.training.coarse import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(["--base_path", small_city, "--pointnet_arch", "pointnet2", "--pointnet_path", "none",
                              "--checkpoint_root", str(tmp_path)])
    targs.check_common(args, parser)
    cfg = config_from_args(args, 384)
    assert cfg.pointnet_arch == "pointnet2" and cfg.pointnet_path is None
    assert isinstance(build_coarse_model(cfg, 384).object_encoder.pointnet, PointNet2)
