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
CACHE_VERSION = 4
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
    (their bytes, with the arrays' dtypes and lengths). The cells are validated maps' cells (every
    point array an (N, 3) ndarray, see :func:`spatialoc_ros.data.validation.validate_cells`), so the
    lengths N give the shapes. One pass over the objects: a city map has millions of them."""
    try:
        return _map_digest(cells, contiguous=False)
    except (BufferError, TypeError, ValueError):  # an array that is not C-contiguous: hash a copy
        return _map_digest(cells, contiguous=True)


def _map_digest(cells: Sequence, contiguous: bool) -> str:
    points = hashlib.sha256()
    update = points.update
    header, labels, lengths, dtypes = [], [], [], []
    for c in cells:
        header.append(f"{c.id}|{c.scene_name}|{float(c.cell_size)!r}|{len(c.objects)}")
        for o in c.objects:
            xyz, rgb = o.xyz, o.rgb
            if contiguous:
                xyz, rgb = np.ascontiguousarray(xyz), np.ascontiguousarray(rgb)
            update(xyz)  # the array's bytes
            update(rgb)
            labels.append(o.label)
            lengths.append(len(xyz))
            dtypes.append(xyz.dtype)
            dtypes.append(rgb.dtype)
    kinds = set(dtypes)
    header.append("|".join(labels))
    # one dtype for all arrays (the usual case), else each array's
    header.append(next(iter(kinds)).str if len(kinds) == 1 else "".join(d.str for d in dtypes))
    h = hashlib.sha256("\n".join(header).encode())
    h.update(np.asarray(lengths, dtype=np.int64).tobytes())
    h.update(np.stack([np.asarray(c.bbox_w, dtype=np.float64) for c in cells]).tobytes())
    h.update(points.digest())
    return h.hexdigest()


def cache_key(model_hash: str, map_hash: str, with_relations: bool) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}|{model_hash}|{map_hash}|{int(with_relations)}".encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"{_PREFIX}_{key[:32]}.npz")


#: Per-object index fields, stored as the rows of the real slots of ``index.mask`` only
#: (``index.<name>@packed``, (real objects, D)), as the Localizer keeps them
#: (:class:`~spatialoc_ros.models.coarse.PackedCellEmbedding`).
PACKED_FIELDS = ("objects", "relations")
_PACKED = "@packed"


def save(path: str, ids: Sequence[str], index: dict, relations: Optional[dict]) -> None:
    """Write ``ids`` (the kept cells), the index arrays (``PACKED_FIELDS`` as their rows, see
    :attr:`PackedCellEmbedding.tensors`) and the relations arrays atomically."""
    arrays = {"ids": np.asarray(list(ids), dtype=np.str_)}
    for k, v in index.items():
        if v is not None:
            arrays[f"index.{k}{_PACKED if k in PACKED_FIELDS else ''}"] = v.detach().cpu().numpy()
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


#: Arrays of at least this many bytes are mapped from the file (copy-on-write) rather than read
#: into fresh memory: first touching fresh memory costs more than the file's bytes here (1.8 GB:
#: 2.5-4.5 s read into fresh memory, 0.6 s mapped and checked).
_MAP_BYTES = 1 << 24


def read_npz(path: str) -> dict:
    """{name: array} of an uncompressed ``.npz`` as :func:`numpy.load` (``allow_pickle=False``)
    reads it, each member's CRC-32 checked, but every array read in one piece straight into its
    memory (numpy reads zip members in 256 KB chunks through two copies: 2.5x slower on a 3 GB map
    cache), arrays of ``_MAP_BYTES`` or more mapped copy-on-write from the file instead. Raises
    ValueError for a member that is compressed, holds Python objects, is truncated or does not
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
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if header_len + size != info.file_size:
                raise ValueError(f"member {info.filename!r} is truncated")
            if size >= _MAP_BYTES:
                # private pages of the file: written pages become the process's own copies; the
                # file is only ever replaced (renamed over), never rewritten in place
                array = np.memmap(raw, dtype=dtype, mode="c", offset=start + header_len, shape=shape,
                                  order="F" if fortran else "C")
                data = memoryview(array.reshape(-1, order="A").view(np.uint8))
            else:
                array = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
                data = memoryview(array.reshape(-1, order="A").view(np.uint8))  # its bytes, in memory order
                if raw.readinto(data) != len(data):
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


def load(path: str, cell_ids: Sequence[str], index_fields: dict, relation_fields: Optional[dict]):
    """(kept ids, index tensors, relations tensors or None), or None when the file is absent or fails
    a check (logged: the caller rebuilds it).

    ``index_fields`` / ``relation_fields``: name -> (dtype kind 'f' | 'b' | 'i', trailing shape or
    None for any) of the arrays the map needs, a name of ``PACKED_FIELDS`` with the trailing shape
    of one row (one row per True slot of ``index.mask``, which the index fields must include);
    ``cell_ids``: the map's cells, of which the kept ids must be a subsequence (cells dropped for
    non-finite embeddings are not in the file).
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
                rows = len(ids)
                if group == "index" and name in PACKED_FIELDS:
                    if "mask" not in part:
                        raise ValueError(f"{key} is packed but the index has no mask")
                    key += _PACKED
                    rows = int(part["mask"].sum())
                if key not in files:
                    raise ValueError(f"{key} missing")
                arr = files[key]
                _check(f"{key} (for {rows} rows)", arr, kind, rows, tail)
                part[name] = torch.from_numpy(np.ascontiguousarray(arr))
            out[group] = part
        return ids, out["index"], (out["relations"] if relation_fields else None)
    except Exception as e:  # noqa: BLE001 - any damage means: rebuild, and say so
        _log.warning("embedding cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
