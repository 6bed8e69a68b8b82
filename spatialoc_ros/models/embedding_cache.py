"""On-disk cache of a map's embedding, so a restart on the same map and model skips the work.

What a :class:`~spatialoc_ros.inference.Localizer` computes in ``set_map`` (the coarse model's
cell embeddings and, when the geometric level is on, the map's hint geometry) depends only on the
coarse model's weights and configuration and on the cells. The cache file is named by a SHA-256 of
both (:func:`cache_key`), so any change to either selects another file; a stale file is simply
never read again.

Format: one ``.npz`` of plain arrays (``numpy.load(allow_pickle=False)``: nothing in the file can
run code), written to a temporary name and renamed. Loading checks every array against what the
map needs (names, shapes, dtypes, finite values, the cell ids); a file that fails any check is
reported in one log line and rebuilt, never half-used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch

_log = logging.getLogger(__name__)

#: Bumped whenever what is cached, or how it is computed, changes.
CACHE_VERSION = 1
_PREFIX = "map_embedding"


def model_digest(model: torch.nn.Module, cfg) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes) and configuration."""
    h = hashlib.sha256()
    cfg_dict = cfg.__dict__ if hasattr(cfg, "__dict__") else dict(cfg)
    h.update(json.dumps(cfg_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def map_digest(cells: Sequence) -> str:
    """SHA-256 of the cells: ids, scenes, sizes, boxes and every object's label, points and colours."""
    h = hashlib.sha256()
    for cell in cells:
        h.update(f"{cell.id}|{cell.scene_name}|{float(cell.cell_size)!r}".encode())
        h.update(np.ascontiguousarray(np.asarray(cell.bbox_w, dtype=np.float64)).tobytes())
        for obj in cell.objects:
            h.update(f"|{obj.label}|{len(obj.xyz)}".encode())
            h.update(np.ascontiguousarray(np.asarray(obj.xyz, dtype=np.float64)).tobytes())
            h.update(np.ascontiguousarray(np.asarray(obj.rgb, dtype=np.float64)).tobytes())
    return h.hexdigest()


def cache_key(model_hash: str, map_hash: str, with_relations: bool) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}|{model_hash}|{map_hash}|{int(with_relations)}".encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_PREFIX}_{key[:32]}.npz")


def save(path: str, ids: Sequence[str], index: dict, relations: Optional[dict]) -> None:
    """Write ``ids`` (the kept cells), the index arrays and the relations arrays atomically."""
    arrays = {"ids": np.asarray(list(ids), dtype=np.str_)}
    arrays.update({f"index.{k}": v.detach().cpu().numpy() for k, v in index.items() if v is not None})
    if relations is not None:
        arrays.update({f"relations.{k}": v.detach().cpu().numpy() for k, v in relations.items()})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str, cell_ids: Sequence[str], index_fields: dict, relation_fields: Optional[dict]):
    """(kept ids, index tensors, relations tensors or None), or None when the file is absent or fails
    a check (logged: the caller rebuilds it).

    ``index_fields`` / ``relation_fields``: name -> (dtype kind 'f' | 'b' | 'i', trailing shape or
    None for any) of the arrays the map needs; ``cell_ids``: the map's cells, of which the kept ids
    must be a subsequence (cells dropped for non-finite embeddings are not in the file).
    """
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            files = {name: data[name] for name in data.files}
        ids = [str(x) for x in files.pop("ids")]
        wanted = set(cell_ids)
        if not ids or any(i not in wanted for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("cell ids differ from the map's")
        order = {cid: k for k, cid in enumerate(cell_ids)}
        if [order[i] for i in ids] != sorted(order[i] for i in ids):
            raise ValueError("cell ids are out of the map's order")
        out = {}
        for group, fields in (("index", index_fields), ("relations", relation_fields or {})):
            part = {}
            for name, (kind, tail) in fields.items():
                key = f"{group}.{name}"
                if key not in files:
                    raise ValueError(f"{key} missing")
                arr = files[key]
                if arr.dtype.kind != kind or arr.shape[0] != len(ids) or (tail is not None and arr.shape[1:] != tail):
                    raise ValueError(f"{key} has dtype {arr.dtype} and shape {arr.shape}")
                if kind == "f" and not np.all(np.isfinite(arr)):
                    raise ValueError(f"{key} has non-finite values")
                part[name] = torch.from_numpy(np.ascontiguousarray(arr))
            out[group] = part
        return ids, out["index"], (out["relations"] if relation_fields else None)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild, and say so
        _log.warning("embedding cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
