"""Cut a user's labelled point cloud into KITTI360Pose-style map cells.

Input: one point cloud in world metres with a colour, a semantic label and an instance id per
point, read from

- ``.npz``: arrays ``xyz`` (N, 3), ``rgb`` (N, 3; [0, 1] or 0..255), ``label`` (N,; class names
  such as ``"building"`` or KITTI-360 label ids such as 11), ``instance`` (N,; ints);
- ``.ply`` / ``.pcd`` through Open3D's tensor reader (imported only then), with per-point
  attributes ``label`` or ``semantic`` (KITTI-360 ids or class indices) and ``instance``
  (or ``instance_id``); colours from the usual red/green/blue properties.

Cutting follows the published data set with the very code the synthetic generator uses
(:mod:`spatialoc_ros.data.cell_cutting`): one world object per (class, instance id); square cells
of ``cell_size`` metres on a grid of ``cell_stride`` metres starting at the cloud's lowest x-y; an
instance (building, pole, ...) is kept whole in every cell holding at least a third of its points
(its normalised points may then stick out of [0, 1], as in the release); stuff (road, vegetation,
...) is clipped to each cell and split into pieces there; a cell is kept only with at least
``min_objects`` objects. A cell's box reaches ``cell_size`` up from the lowest point of its x-y
square. Points of classes outside the 21 are dropped.

The work is bounded: points farther than ``max_outlier_distance`` metres (x-y) from the cloud's
median are dropped with a warning before anything else, and only grid cells that overlap
occupied tiles are visited, so one stray point at 10 km or 1e12 m costs nothing.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from spatialoc_ros.data.cell_cutting import TILE, WorldIndex
from spatialoc_ros.data.constants import CLASS_TO_INDEX, CLASSES, PAD_LABEL
from spatialoc_ros.data.kitti360pose import Cell
from spatialoc_ros.data.loading import DataFormatError

#: KITTI-360 semantic label ids of the 21 KITTI360Pose classes (ids of the public label table).
KITTI360_LABEL_IDS: dict[int, str] = {
    7: "road",
    8: "sidewalk",
    9: "parking",
    11: "building",
    12: "wall",
    13: "fence",
    14: "guard rail",
    15: "bridge",
    16: "tunnel",
    17: "pole",
    19: "traffic light",
    20: "traffic sign",
    21: "vegetation",
    22: "terrain",
    34: "garage",
    36: "stop",
    37: "smallpole",
    38: "lamp",
    39: "trash bin",
    40: "vending machine",
    41: "box",
}
_REAL_CLASSES = tuple(c for c in CLASSES if c != PAD_LABEL)
CLOUD_EXTENSIONS = (".npz", ".ply", ".pcd")


@dataclass(frozen=True)
class CellCutConfig:
    """How a cloud is cut into cells. Lengths in metres."""

    cell_size: float = 30.0  # edge of a square cell
    cell_stride: float = 10.0  # grid step between cell origins
    min_objects: int = 6  # cells with fewer objects are dropped
    max_points_per_object: int = 2048  # larger objects of a cell are subsampled (fixed seed)
    max_outlier_distance: float = 20000.0  # x-y distance from the median beyond which points are dropped
    seed: int = 0

    def __post_init__(self) -> None:
        finite = all(np.isfinite([self.cell_size, self.cell_stride, self.max_outlier_distance]))
        if not (finite and self.cell_size > 0 and self.cell_stride > 0):
            raise ValueError(f"cell_size ({self.cell_size}) and cell_stride ({self.cell_stride}) must be finite and > 0")
        if self.cell_size / self.cell_stride > 100:
            raise ValueError(f"cell_size / cell_stride must be <= 100, got {self.cell_size / self.cell_stride:g}")
        if self.min_objects < 1:
            raise ValueError(f"min_objects must be >= 1, got {self.min_objects}")
        if self.max_points_per_object < 1:
            raise ValueError("max_points_per_object must be >= 1")
        if not self.max_outlier_distance > 0:
            raise ValueError(f"max_outlier_distance must be > 0, got {self.max_outlier_distance}")


@dataclass
class LabelledCloud:
    """A labelled cloud: xyz (N, 3) world metres, rgb (N, 3) in [0, 1], label (N,) class names
    ('' = not one of the 21 classes), instance (N,) int64."""

    xyz: np.ndarray
    rgb: np.ndarray
    label: np.ndarray
    instance: np.ndarray


def class_names_of(labels: np.ndarray) -> np.ndarray:
    """Class names for an array of labels given as names (any case, '_' for spaces) or as
    KITTI-360 label ids; labels outside the 21 classes become ''."""
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind in "iu" or (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        ids = labels.astype(np.int64)
        table = np.array([KITTI360_LABEL_IDS.get(int(i), "") for i in np.unique(ids)], dtype=object)
        _, inverse = np.unique(ids, return_inverse=True)
        return table[inverse].astype(str)
    if labels.dtype.kind in "US" or labels.dtype == object:
        names = np.char.replace(np.char.lower(labels.astype(str)), "_", " ")
        known = np.isin(names, np.array(_REAL_CLASSES))
        return np.where(known, names, "")
    raise DataFormatError(f"labels must be class names or integer KITTI-360 ids, got dtype {labels.dtype}")


def _as_rgb01(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype.kind in "iu" or (rgb.size and float(np.nanmax(rgb)) > 1.0):
        return rgb.astype(np.float64) / 255.0
    return rgb.astype(np.float64)


def make_cloud(xyz, rgb, label, instance) -> LabelledCloud:
    """Check shapes and normalise a cloud given as arrays (see module docstring)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise DataFormatError(f"xyz must be (N, 3), got {xyz.shape}")
    n = len(xyz)
    if n == 0:
        raise DataFormatError("the cloud holds no points")
    given = np.shape(rgb)
    if np.size(rgb) != 3 * n:
        raise DataFormatError(f"rgb must be (N, 3) with N = {n}, got {given}")
    rgb = np.asarray(rgb).reshape(n, 3)
    label = np.asarray(label).reshape(-1)
    instance = np.asarray(instance).reshape(-1)
    if len(label) != n or len(instance) != n:
        raise DataFormatError(f"label ({len(label)}) and instance ({len(instance)}) must have N = {n} entries")
    if not np.isfinite(xyz).all():
        raise DataFormatError("xyz holds NaN or infinite coordinates")
    return LabelledCloud(xyz, np.clip(_as_rgb01(rgb), 0.0, 1.0), class_names_of(label), instance.astype(np.int64))


def _read_npz(path: str) -> LabelledCloud:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"cannot read {path}: not an .npz archive of plain arrays "
                              f"({type(e).__name__}; pickled objects are refused)") from e
    with data:
        missing = [k for k in ("xyz", "rgb", "label", "instance") if k not in data.files]
        if missing:
            raise DataFormatError(f"{path} lacks array(s) {missing}; it needs xyz, rgb, label, instance")
        return make_cloud(data["xyz"], data["rgb"], data["label"], data["instance"])


def _read_open3d(path: str) -> LabelledCloud:
    try:
        import open3d as o3d  # heavy and optional: only for PLY / PCD input
    except ImportError as e:
        raise DataFormatError(
            f"reading {os.path.basename(path)} needs open3d ({e}); install it with "
            "`pip install open3d-cpu` (and `apt-get install libusb-1.0-0`), or save the cloud as "
            ".npz with arrays xyz, rgb, label, instance"
        ) from e
    cloud = o3d.t.io.read_point_cloud(path)
    attrs = set(cloud.point)
    if "positions" not in attrs or cloud.point.positions.shape[0] == 0:
        raise DataFormatError(f"open3d read no points from {path} (missing, empty or not a point cloud file)")
    label_key = next((k for k in ("label", "semantic", "class") if k in attrs), None)
    instance_key = next((k for k in ("instance", "instance_id") if k in attrs), None)
    if label_key is None or instance_key is None or "colors" not in attrs:
        raise DataFormatError(
            f"{path} needs per-point colours, a label (or semantic) and an instance attribute; "
            f"it has {sorted(attrs)}"
        )
    return make_cloud(
        cloud.point.positions.numpy(),
        cloud.point.colors.numpy(),
        cloud.point[label_key].numpy().reshape(-1),
        cloud.point[instance_key].numpy().reshape(-1),
    )


def read_labelled_cloud(path: str) -> LabelledCloud:
    """Read a labelled cloud from .npz, .ply or .pcd; DataFormatError with the reason otherwise."""
    if not os.path.isfile(path):
        raise DataFormatError(f"point cloud file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return _read_npz(path)
    if ext in (".ply", ".pcd"):
        return _read_open3d(path)
    raise DataFormatError(f"unsupported point cloud file {path}: use one of {', '.join(CLOUD_EXTENSIONS)}")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def drop_far_outliers(cloud: LabelledCloud, max_distance: float, log: Callable[[str], None] = _warn) -> LabelledCloud:
    """The cloud without points farther than ``max_distance`` (x-y, metres) from its median."""
    if len(cloud.xyz) == 0:
        return cloud
    median = np.median(cloud.xyz[:, 0:2], axis=0)
    far = np.abs(cloud.xyz[:, 0:2] - median).max(axis=1) > max_distance
    if not far.any():
        return cloud
    worst = float(np.abs(cloud.xyz[far, 0:2] - median).max())
    log(f"ignoring {int(far.sum())} of {len(far)} point(s) farther than {max_distance:g} m from the cloud's "
        f"median x-y (the farthest at {worst:.3g} m): outliers, not map")
    keep = ~far
    return LabelledCloud(cloud.xyz[keep], cloud.rgb[keep], cloud.label[keep], cloud.instance[keep])


def world_index(cloud: LabelledCloud) -> Optional[WorldIndex]:
    """One world object per (class, instance id), ordered by class then instance id as the
    generator orders its objects; None when no point has one of the 21 classes."""
    keep = cloud.label != ""
    if not keep.any():
        return None
    xyz, rgb, label, inst = cloud.xyz[keep], cloud.rgb[keep], cloud.label[keep], cloud.instance[keep]
    class_idx = np.array([CLASS_TO_INDEX[name] for name in label], dtype=np.int64)
    order = np.lexsort((inst, class_idx))
    keys = np.column_stack([class_idx[order], inst[order]])
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    groups = np.split(order, bounds)
    return WorldIndex(
        [str(label[g[0]]) for g in groups],
        [int(inst[g[0]]) for g in groups],
        [xyz[g] for g in groups],
        [rgb[g].astype(np.float32) for g in groups],
    )


#: More grid cells to visit than this and cutting is refused: the cells a grid of cell_stride lays
#: over the occupied 10 m tiles, counted before any work (a fully occupied 10 km x 10 km city at the
#: data set's 30 m cells every 10 m visits about 1e6).
MAX_CANDIDATE_CELLS = 2_000_000


def _candidate_origins(index: WorldIndex, cfg: CellCutConfig) -> np.ndarray:
    """(C, 2) x-y origins (grid of cell_stride from the lowest x-y) of the cells overlapping an
    occupied tile, sorted by y then x. ValueError when that would be more than
    :data:`MAX_CANDIDATE_CELLS` (a cell_size far larger than cell_stride over a sparse, wide cloud
    would otherwise mean millions of cells and hours of work)."""
    tiles = index.occupied_tiles()
    lo_xy = index.min_xy + tiles * TILE  # (T, 2) tile lower corners
    hi_xy = lo_xy + TILE
    # grid origins k * stride with [o, o + size) overlapping [lo, hi): k in (lo - size, hi) / stride
    k_lo = np.maximum(np.floor((lo_xy - index.min_xy - cfg.cell_size) / cfg.cell_stride).astype(np.int64) + 1, 0)
    k_hi = np.floor((hi_xy - index.min_xy) / cfg.cell_stride).astype(np.int64)
    span = int((k_hi - k_lo).max()) + 1
    if len(tiles) * span * span > MAX_CANDIDATE_CELLS:
        raise ValueError(
            f"cell_size {cfg.cell_size:g} m every {cfg.cell_stride:g} m over {len(tiles)} occupied {TILE:g} m tiles "
            f"would visit up to {len(tiles) * span * span} cells (at most {MAX_CANDIDATE_CELLS}): raise "
            "cell_stride or lower cell_size (the data set uses 30 m cells every 10 m)"
        )
    offsets = np.stack(np.meshgrid(np.arange(span), np.arange(span), indexing="ij"), axis=-1).reshape(-1, 2)
    ks = (k_lo[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    ks = ks[np.all(ks <= np.repeat(k_hi, len(offsets), axis=0), axis=1)]
    ks = np.unique(ks, axis=0)
    ks = ks[np.lexsort((ks[:, 0], ks[:, 1]))]
    return index.min_xy + ks * cfg.cell_stride


def cut_cloud_into_cells(cloud: LabelledCloud, scene: str, cfg: CellCutConfig = CellCutConfig(),
                         log: Callable[[str], None] = _warn) -> list[Cell]:
    """Cells (ids ``f"{scene}_{i:05d}"``) of a labelled cloud, following the rules of the module
    docstring. An empty list when no cell reaches ``min_objects``."""
    cloud = drop_far_outliers(cloud, cfg.max_outlier_distance, log)
    index = world_index(cloud)
    if index is None:
        return []
    rng = np.random.default_rng(cfg.seed)
    cells: list[Cell] = []
    for x0, y0 in _candidate_origins(index, cfg):
        column = index.points_in(np.array([x0, y0, -np.inf, x0 + cfg.cell_size, y0 + cfg.cell_size, np.inf]))
        if len(column) == 0:
            continue
        z0 = float(index.xyz[column, 2].min())
        bbox = np.array([x0, y0, z0, x0 + cfg.cell_size, y0 + cfg.cell_size, z0 + cfg.cell_size], dtype=np.float64)
        objects = index.crop(bbox, cfg.cell_size)
        if len(objects) < cfg.min_objects:
            continue
        for obj in objects:
            if len(obj.xyz) > cfg.max_points_per_object:
                pick = np.sort(rng.choice(len(obj.xyz), cfg.max_points_per_object, replace=False))
                obj.xyz, obj.rgb = obj.xyz[pick], obj.rgb[pick]
        cells.append(Cell(id=f"{scene}_{len(cells):05d}", scene_name=scene, objects=objects,
                          cell_size=float(cfg.cell_size), bbox_w=bbox))
    return cells


def cells_from_cloud_file(path: str, scene: Optional[str] = None, cfg: CellCutConfig = CellCutConfig(),
                          log: Callable[[str], None] = _warn) -> list[Cell]:
    """Read ``path`` and cut it into cells; ``scene`` defaults to the file name without extension."""
    cloud = read_labelled_cloud(path)
    if scene is None:
        scene = os.path.splitext(os.path.basename(path))[0] or "cloud"
    return cut_cloud_into_cells(cloud, scene, cfg, log=log)
