"""Checkpoints that hold only primitives and tensors, loaded with ``weights_only=True``.

Layout: {'model': state_dict, 'config': asdict(config), 'kind': 'coarse' | 'fine',
'version': CHECKPOINT_VERSION, 'extra': dict of primitives}. Loading rebuilds the model from the
stored config with :mod:`spatialoc_ros.models.builder` and loads the weights with ``strict=True``.
"""
from __future__ import annotations

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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        torch.save(payload, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str) -> dict:
    """Load and validate the raw checkpoint dict (CPU tensors) without building a model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise CheckpointError(
            f"{path!r} is not a spatialoc_ros checkpoint that loads with weights_only=True ({err}). "
            "Whole pickled models (as in the public SpatiaLoc release) are refused on purpose; "
            "retrain or convert the weights with spatialoc_ros' save_checkpoint."
        ) from err
    if not isinstance(payload, dict) or not {"model", "config", "kind", "version"} <= set(payload):
        raise CheckpointError(f"{path!r} lacks the keys model/config/kind/version of a spatialoc_ros checkpoint")
    if payload["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint version {payload['version']!r}; this code reads version {CHECKPOINT_VERSION}"
        )
    if payload["kind"] not in KINDS:
        raise CheckpointError(f"{path!r} has unknown kind {payload['kind']!r}")
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
    return model, config, dict(payload.get("extra", {}))
