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
import struct
import tempfile
import zipfile
import zlib
from typing import Optional, Sequence

import numpy as np
import torch

_log = logging.getLogger(__name__)

#: Bumped whenever what is cached, or how it is computed, changes.
CACHE_VERSION = 3
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
    """SHA-256 of the cells: ids, scenes, sizes, boxes and every object's label, points and colours
    (their values, with the arrays' dtypes and lengths in a header). The cells are validated maps'
    cells (every point array (N, 3), see :func:`spatialoc_ros.data.validation.validate_cells`), so
    the lengths N give the shapes."""
    objects = [o for cell in cells for o in cell.objects]
    arrays = [np.asarray(a) for o in objects for a in (o.xyz, o.rgb)]
    dtypes = {d.str for d in {a.dtype for a in arrays}}
    header = [f"{c.id}|{c.scene_name}|{float(c.cell_size)!r}|{len(c.objects)}" for c in cells]
    header.append("|".join(o.label for o in objects))
    header.append(",".join(sorted(dtypes)) if len(dtypes) <= 1 else "".join(a.dtype.str for a in arrays))
    h = hashlib.sha256("\n".join(header).encode())
    h.update(np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays)).tobytes())
    h.update(np.stack([np.asarray(c.bbox_w, dtype=np.float64) for c in cells]).tobytes())
    if not arrays:
        return h.hexdigest()
    if len(dtypes) == 1:
        # the bytes of the arrays one after the other: those of their concatenation, without
        # building it (3.6x faster on a 30,000-cell map)
        for a in arrays:
            h.update(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    else:  # one common dtype holds every value exactly (float32 -> float64 is exact)
        h.update(np.concatenate([a.reshape(-1) for a in arrays]).tobytes())
    return h.hexdigest()


def cache_key(model_hash: str, map_hash: str, with_relations: bool) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}|{model_hash}|{map_hash}|{int(with_relations)}".encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_PREFIX}_{key[:32]}.npz")


#: Per-object index fields (N, O, D) whose padded slots (``mask`` False) are zero vectors: stored as
#: the rows of the real slots only (``<name>@packed``, (real objects, D)), about half the file of a
#: city map, and padded back with zeros on load. A field with anything but zeros at a padded slot
#: is stored whole.
PACKED_FIELDS = ("objects", "relations")
_PACKED = "@packed"


def save(path: str, ids: Sequence[str], index: dict, relations: Optional[dict]) -> None:
    """Write ``ids`` (the kept cells), the index arrays and the relations arrays atomically."""
    arrays = {"ids": np.asarray(list(ids), dtype=np.str_)}
    mask = None if index.get("mask") is None else index["mask"].detach().cpu()
    for k, v in index.items():
        if v is None:
            continue
        v = v.detach().cpu()
        if k in PACKED_FIELDS and mask is not None and v.shape[:2] == mask.shape and not bool(v[~mask].any()):
            arrays[f"index.{k}{_PACKED}"] = v[mask].numpy()
        else:
            arrays[f"index.{k}"] = v.numpy()
    if relations is not None:
        arrays.update({f"relations.{k}": v.detach().cpu().numpy() for k, v in relations.items()})
    _write_npz(path, arrays)


def centroids_path(path: str, nlist: int) -> str:
    """The file next to a map cache that keeps the FAISS coarse quantiser's ``nlist`` centroids."""
    return f"{path[:-len('.npz')]}_ivf{int(nlist)}.npz"


def save_centroids(path: str, centroids: np.ndarray) -> None:
    _write_npz(path, {"centroids": np.asarray(centroids, dtype=np.float32)})


def load_centroids(path: str, nlist: int, dim: int) -> Optional[np.ndarray]:
    """(nlist, dim) float32 centroids from ``path``, or None when absent or damaged (logged)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arr = data["centroids"]
        if arr.dtype != np.float32 or arr.shape != (nlist, dim) or not np.all(np.isfinite(arr)):
            raise ValueError(f"centroids have dtype {arr.dtype} and shape {arr.shape}, want float32 {(nlist, dim)}")
        return arr
    except Exception as e:  # noqa: BLE001 - any damage means: retrain, and say so
        _log.warning("index cache %s is unusable (%s: %s); training the index again", path, type(e).__name__, e)
        return None


def _write_npz(path: str, arrays: dict) -> None:
    """``arrays`` into ``path`` (.npz) through a temporary file and a rename."""
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


def read_npz(path: str) -> dict:
    """{name: array} of an uncompressed ``.npz`` as :func:`numpy.load` (``allow_pickle=False``)
    reads it, each member's CRC-32 checked, but every array read in one piece straight into its
    memory (numpy reads zip members in 256 KB chunks through two copies: 2.5x slower on a 3 GB map
    cache). Raises ValueError for a member that is compressed, holds Python objects or does not
    match its CRC."""
    out = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {info.filename!r} is not a stored .npy array")
            raw.seek(info.header_offset)
            local = raw.read(30)  # the local file header; its name and extra field come next
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename!r} has no local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            raw.seek(start)
            version = np.lib.format.read_magic(raw)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(raw) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(raw))
            if dtype.hasobject:
                raise ValueError(f"member {info.filename!r} holds Python objects")
            header_len = raw.tell() - start
            raw.seek(start)
            crc = zlib.crc32(raw.read(header_len))
            array = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
            data = memoryview(array.reshape(-1, order="A").view(np.uint8))  # its bytes, in memory order
            if header_len + len(data) != info.file_size or raw.readinto(data) != len(data):
                raise ValueError(f"member {info.filename!r} is truncated")
            if zlib.crc32(data, crc) != info.CRC:
                raise ValueError(f"member {info.filename!r} fails its CRC check")
            out[info.filename[:-len(".npy")]] = array
    return out


def _check(key: str, arr: np.ndarray, kind: str, rows: int, tail: Optional[tuple]) -> None:
    """Raise ValueError unless ``arr`` has dtype kind ``kind``, ``rows`` rows, the trailing shape
    ``tail`` (None: any) and, for floats, only finite values."""
    if arr.dtype.kind != kind or arr.ndim < 1 or arr.shape[0] != rows or (tail is not None and arr.shape[1:] != tail):
        raise ValueError(f"{key} has dtype {arr.dtype} and shape {arr.shape}")
    if kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{key} has non-finite values")


def _unpack(rows: np.ndarray, mask: Optional[torch.Tensor], kind: str, tail: Optional[tuple], key: str) -> torch.Tensor:
    """(real slots, D) rows of a packed field, checked -> (N, O, D) with zeros at the padded slots
    of ``mask``."""
    if mask is None:
        raise ValueError(f"{key} is packed but the index has no mask")
    real = int(mask.sum())
    _check(f"{key}{_PACKED} (for a mask of {real} real slots)", rows, kind, real, None if tail is None else tail[1:])
    if tail is not None and tuple(mask.shape[1:]) != tail[:1]:
        raise ValueError(f"{key}{_PACKED} is for {tail[0]} slots per cell, the mask has {tuple(mask.shape[1:])}")
    full = torch.zeros(tuple(mask.shape) + tuple(rows.shape[1:]), dtype=torch.from_numpy(rows[:0]).dtype)
    full[mask] = torch.from_numpy(rows)
    return full


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
        files = read_npz(path)
        ids = files.pop("ids").tolist()
        wanted = set(cell_ids)
        if not ids or any(i not in wanted for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("cell ids differ from the map's")
        order = {cid: k for k, cid in enumerate(cell_ids)}
        if [order[i] for i in ids] != sorted(order[i] for i in ids):
            raise ValueError("cell ids are out of the map's order")
        out = {}
        for group, fields in (("index", index_fields), ("relations", relation_fields or {})):
            part = {}
            for name, (kind, tail) in sorted(fields.items(), key=lambda kv: kv[0] in PACKED_FIELDS):
                key = f"{group}.{name}"
                if group == "index" and name in PACKED_FIELDS and key + _PACKED in files:
                    part[name] = _unpack(files[key + _PACKED], part.get("mask"), kind, tail, key)
                    continue
                if key not in files:
                    raise ValueError(f"{key} missing")
                arr = files[key]
                _check(key, arr, kind, len(ids), tail)
                part[name] = torch.from_numpy(np.ascontiguousarray(arr))
            out[group] = part
        return ids, out["index"], (out["relations"] if relation_fields else None)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild, and say so
        _log.warning("embedding cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
