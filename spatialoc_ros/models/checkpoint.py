"""Checkpoints that hold only primitives and tensors, loaded with ``weights_only=True``.

Layout: {'model': state_dict, 'config': asdict(config), 'kind': 'coarse' | 'fine',
'version': CHECKPOINT_VERSION, 'extra': dict of primitives}. Loading rebuilds the model from the
stored config with :mod:`spatialoc_ros.models.builder` and loads the weights with ``strict=True``.
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
from dataclasses import asdict, fields
from typing import Optional

import torch
import torch.nn as nn

from spatialoc_ros.models.builder import build_coarse_model, build_fine_model
from spatialoc_ros.models.config import CoarseConfig, FineConfig

CHECKPOINT_VERSION = 1
KINDS = {"coarse": (CoarseConfig, build_coarse_model), "fine": (FineConfig, build_fine_model)}
_PRIMITIVES = (str, int, float, bool, type(None))
#: Accepted ranges of the calibration values kept in ``extra`` (inclusive): a value outside is a
#: damaged or hand-edited checkpoint, refused at load instead of publishing 1 cm or 1 km sigmas.
EXTRA_RANGES: dict[str, tuple[type, float, float]] = {
    "sigma_scale": (float, 1e-2, 1e2),
    "max_tokens": (int, 1, 512),
    "relation_weight": (float, 0.0, 1e2),
    "selection_weight": (float, 0.0, 1e4),
    "temperature": (float, 1e-3, 1e3),
    "mixture_within_scale": (float, 1e-2, 1e2),
    "mixture_spread_scale": (float, 1e-2, 1e2),
}


#: Hint counts the retrieval calibration is fitted for (one value per count in the ``*_by_hints``
#: lists below; a query with more hints uses the last, with fewer the first).
CALIBRATED_HINT_COUNTS: tuple[int, ...] = (2, 3, 4, 5, 6)
#: Calibration lists kept in ``extra``: one value per CALIBRATED_HINT_COUNTS entry, each checked
#: against the range of the scalar of the same name.
EXTRA_LISTS: dict[str, str] = {
    "temperature_by_hints": "temperature",
    "mixture_within_scale_by_hints": "mixture_within_scale",
    "mixture_spread_scale_by_hints": "mixture_spread_scale",
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (wrong kind / version, foreign format, mismatch)."""


def _check_primitive(value, where: str) -> None:
    if isinstance(value, _PRIMITIVES):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_primitive(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-str key {k!r}")
            _check_primitive(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; checkpoints keep only str/int/float/bool/None/list/dict")


def save_checkpoint(path: str, model: nn.Module, config, kind: str, extra: Optional[dict] = None) -> None:
    """Write ``model``'s weights with its config (atomically: temp file + rename)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    config_type = KINDS[kind][0]
    if not isinstance(config, config_type):
        raise TypeError(f"a {kind!r} checkpoint needs a {config_type.__name__}, got {type(config).__name__}")
    extra = {} if extra is None else dict(extra)
    config_dict = asdict(config)
    _check_primitive(config_dict, "config")
    _check_primitive(extra, "extra")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"model": state, "config": config_dict, "kind": kind, "version": CHECKPOINT_VERSION, "extra": extra}
    save_atomically(payload, path)


def save_atomically(payload: dict, path: str) -> None:
    """torch.save ``payload`` to ``path`` through a temp file + rename, world-readable as an
    ordinary file (mkstemp makes it 0600), so a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The informative line of an error: torch's weights-only errors put the cause after a
    paragraph of advice (the line after 'WeightsUnpickler error:')."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Please file an issue") or "WeightsUnpickler error" in line:
            tail = line.split("WeightsUnpickler error:", 1)[-1].strip()
            cause = tail or (lines[i + 1] if i + 1 < len(lines) else "")
            if cause:
                return cause[:limit]
    return (lines[0] if lines else type(err).__name__)[:limit]


def _extra_items(extra: dict, where: str):
    """(key, value, (kind, lo, hi)) of every calibration value of ``extra``, list entries included."""
    for key, spec in EXTRA_RANGES.items():
        if key in extra:
            yield key, extra[key], spec
    for key, scalar in EXTRA_LISTS.items():
        if key not in extra:
            continue
        values = extra[key]
        if not isinstance(values, (list, tuple)) or len(values) != len(CALIBRATED_HINT_COUNTS):
            raise CheckpointError(f"{where}: extra[{key!r}] must be a list of {len(CALIBRATED_HINT_COUNTS)} "
                                  f"numbers (hint counts {CALIBRATED_HINT_COUNTS}), got {values!r}")
        for i, v in enumerate(values):
            yield f"{key}[{i}]", v, EXTRA_RANGES[scalar]


def check_extra(extra: dict, where: str) -> None:
    """Refuse calibration values outside :data:`EXTRA_RANGES` (types included; NaN is outside),
    also inside the per-hint-count lists of :data:`EXTRA_LISTS`."""
    for key, value, (kind, lo, hi) in _extra_items(extra, where):
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok_type = ok_type and float(value).is_integer()
        if not (ok_type and math.isfinite(float(value)) and lo <= float(value) <= hi):
            raise CheckpointError(f"{where}: extra[{key!r}] = {value!r} is outside the accepted range {lo:g}..{hi:g}")


def read_checkpoint(path: str) -> dict:
    """Load and validate the raw checkpoint dict (CPU tensors) without building a model.

    Every failure is a :class:`CheckpointError` (or FileNotFoundError) with one readable line:
    unreadable or foreign files, whole pickled models, missing or mistyped keys, non-finite
    weights, calibration values out of range.
    """
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise CheckpointError(f"checkpoint {path!r} is not a regular file")
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a refused class: a damaged or foreign file
            raise CheckpointError(
                f"{path!r} cannot be read as a checkpoint (UnpicklingError: {_first_line(err)}); "
                "is it a truncated or foreign file?"
            ) from err
        raise CheckpointError(
            f"{path!r} is not a spatialoc_ros checkpoint that loads with weights_only=True "
            f"({_first_line(err)}). Whole pickled models (as in the public SpatiaLoc release) are refused "
            "on purpose; retrain, or convert a released PointNet with python -m spatialoc_ros.models.convert_pointnet"
        ) from err
    except Exception as err:  # noqa: BLE001 - torch.load of a damaged file raises many types; all mean "unreadable"
        raise CheckpointError(
            f"{path!r} cannot be read as a checkpoint ({type(err).__name__}: {_first_line(err)}); "
            "is it a truncated or foreign file?"
        ) from err
    if not isinstance(payload, dict) or not {"model", "config", "kind", "version"} <= set(payload):
        raise CheckpointError(f"{path!r} lacks the keys model/config/kind/version of a spatialoc_ros checkpoint")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint version {payload['version']!r}; this code reads version {CHECKPOINT_VERSION}"
        )
    if not isinstance(payload["kind"], str) or payload["kind"] not in KINDS:
        raise CheckpointError(f"{path!r} has unknown kind {payload['kind']!r}")
    if not isinstance(payload["config"], dict):
        raise CheckpointError(f"{path!r}: 'config' is a {type(payload['config']).__name__}, not a dict")
    extra = payload.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path!r}: 'extra' is a {type(extra).__name__}, not a dict")
    payload["extra"] = extra
    state = payload["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path!r}: 'model' is not a state_dict (names -> tensors)")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"{path!r} holds non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]!r}; the training "
            "diverged or the file was damaged: use another checkpoint"
        )
    check_extra(extra, repr(path))
    return payload


def load_checkpoint(path: str, expected_kind: str, device="cpu"):
    """-> (model in eval mode on ``device``, config dataclass, extra dict)."""
    if expected_kind not in KINDS:
        raise ValueError(f"expected_kind must be one of {sorted(KINDS)}, got {expected_kind!r}")
    payload = read_checkpoint(path)
    if payload["kind"] != expected_kind:
        raise CheckpointError(
            f"{path!r} is a {payload['kind']!r} checkpoint, but a {expected_kind!r} one was expected "
            "(coarse and fine checkpoints swapped?)"
        )
    config_type, build = KINDS[expected_kind]
    known = {f.name for f in fields(config_type)}
    unknown = sorted(set(payload["config"]) - known)
    if unknown:
        raise CheckpointError(f"{path!r} config has fields this code does not know: {unknown}")
    try:
        config = config_type(**payload["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path!r} holds an invalid {config_type.__name__}: {err}") from err
    model = build(config, load_pointnet=False)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path!r} do not match the model its config describes "
            f"(edited or mixed-up checkpoint): {err}"
        ) from err
    model.to(torch.device(device)).eval()
    return model, config, dict(payload["extra"])
