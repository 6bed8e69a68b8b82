"""Cut a user's labelled point cloud into KITTI360Pose-style map cells.

Input: one point cloud in world metres with a colour, a semantic label and an instance id per
point, read from

- ``.npz``: arrays ``xyz`` (N, 3), ``rgb`` (N, 3; [0, 1] or 0..255), ``label`` (N,; class names
  such as ``"building"`` or KITTI-360 label ids such as 11), ``instance`` (N,; ints);
- ``.ply`` / ``.pcd`` through Open3D's tensor reader (imported only then), with per-point
  attributes ``label`` or ``semantic`` (KITTI-360 ids or class indices) and ``instance``
  (or ``instance_id``); colours from the usual red/green/blue properties.

Cutting follows the published data set: square cells of ``cell_size`` metres on a grid of
``cell_stride`` metres, a cell kept only with at least ``min_objects`` objects. Thing classes
(building, pole, ...) stay whole instances, assigned to every cell that holds their x-y centroid
(their normalised points may then stick out of [0, 1], as in the release); stuff classes (road,
vegetation, ...) are split into connected pieces (``stuff_eps`` metres, a voxel approximation of
the release's DBSCAN) and clipped to each cell. Points of classes outside the 21 are dropped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL, STUFF_CLASSES
from spatialoc_ros.data.kitti360pose import Cell, Object3d
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
    stuff_eps: float = 0.75  # neighbourhood radius splitting stuff classes into pieces
    min_points_per_object: int = 10  # smaller pieces are dropped
    max_points_per_object: int = 2048  # larger objects are subsampled (fixed seed)
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.cell_size > 0 and self.cell_stride > 0):
            raise ValueError(f"cell_size ({self.cell_size}) and cell_stride ({self.cell_stride}) must be > 0")
        if self.min_objects < 1:
            raise ValueError(f"min_objects must be >= 1, got {self.min_objects}")
        if self.stuff_eps <= 0:
            raise ValueError(f"stuff_eps must be > 0, got {self.stuff_eps}")
        if self.min_points_per_object < 1 or self.max_points_per_object < self.min_points_per_object:
            raise ValueError("need 1 <= min_points_per_object <= max_points_per_object")


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
    rgb = np.asarray(rgb).reshape(n, -1) if np.size(rgb) == 3 * n else None
    if rgb is None or rgb.shape[1] != 3:
        raise DataFormatError(f"rgb must be (N, 3) with N = {n}, got {np.shape(rgb)}")
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
        raise DataFormatError(f"cannot read {path}: {e}") from e
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


def _pieces(xyz: np.ndarray, eps: float) -> np.ndarray:
    """Connected-piece index per point: points whose eps-voxels touch (26-neighbourhood) share a
    piece. (N,) int64."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    voxels, inverse = np.unique(np.floor(xyz / eps).astype(np.int64), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(voxels) == 1:
        return np.zeros(len(xyz), dtype=np.int64)
    pairs = cKDTree(voxels.astype(np.float64)).query_pairs(r=np.sqrt(3.0) + 1e-6, output_type="ndarray")
    graph = coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(len(voxels), len(voxels))
    )
    _, comp = connected_components(graph, directed=False)
    return comp[inverse].astype(np.int64)


@dataclass
class _WorldObject:
    label: str
    instance_id: int
    xyz: np.ndarray  # (n, 3) world metres
    rgb: np.ndarray
    is_stuff: bool


def _world_objects(cloud: LabelledCloud, cfg: CellCutConfig) -> list[_WorldObject]:
    objects = []
    keep = cloud.label != ""
    xyz, rgb, label, inst = cloud.xyz[keep], cloud.rgb[keep], cloud.label[keep], cloud.instance[keep]
    for name in np.unique(label):
        in_class = label == name
        stuff = str(name) in STUFF_CLASSES
        for instance_id in np.unique(inst[in_class]):
            members = np.flatnonzero(in_class & (inst == instance_id))
            if stuff:
                piece = _pieces(xyz[members], cfg.stuff_eps)
                groups = [members[piece == p] for p in np.unique(piece)]
            else:
                groups = [members]
            for g in groups:
                if len(g) >= cfg.min_points_per_object:
                    objects.append(_WorldObject(str(name), int(instance_id), xyz[g], rgb[g], stuff))
    return objects


def _grid_origins(lo: float, hi: float, size: float, stride: float) -> np.ndarray:
    count = max(0, int(np.ceil((hi - lo - size) / stride))) + 1
    return lo + stride * np.arange(count)


def cut_cloud_into_cells(cloud: LabelledCloud, scene: str, cfg: CellCutConfig = CellCutConfig()) -> list[Cell]:
    """Cells (ids ``f"{scene}_{i:05d}"``) of a labelled cloud, following the rules of the module
    docstring. An empty list when no cell reaches ``min_objects``."""
    if len(cloud.xyz) == 0:
        return []
    rng = np.random.default_rng(cfg.seed)
    objects = _world_objects(cloud, cfg)
    if not objects:
        return []
    lo = cloud.xyz.min(axis=0)
    hi = cloud.xyz.max(axis=0)
    centroids = np.array([o.xyz[:, 0:2].mean(axis=0) for o in objects])
    cells: list[Cell] = []
    for y0 in _grid_origins(lo[1], hi[1], cfg.cell_size, cfg.cell_stride):
        for x0 in _grid_origins(lo[0], hi[0], cfg.cell_size, cfg.cell_stride):
            x1, y1 = x0 + cfg.cell_size, y0 + cfg.cell_size
            origin = np.array([x0, y0, lo[2]])
            cell_objects: list[Object3d] = []
            for k, obj in enumerate(objects):
                if obj.is_stuff:
                    inside = (
                        (obj.xyz[:, 0] >= x0) & (obj.xyz[:, 0] < x1) & (obj.xyz[:, 1] >= y0) & (obj.xyz[:, 1] < y1)
                    )
                    if inside.sum() < cfg.min_points_per_object:
                        continue
                    pts, cols = obj.xyz[inside], obj.rgb[inside]
                else:
                    cx, cy = centroids[k]
                    if not (x0 <= cx < x1 and y0 <= cy < y1):
                        continue
                    pts, cols = obj.xyz, obj.rgb
                if len(pts) > cfg.max_points_per_object:
                    pick = np.sort(rng.choice(len(pts), cfg.max_points_per_object, replace=False))
                    pts, cols = pts[pick], cols[pick]
                cell_objects.append(
                    Object3d(
                        id=len(cell_objects),
                        instance_id=obj.instance_id,
                        xyz=((pts - origin) / cfg.cell_size).astype(np.float32),
                        rgb=cols.astype(np.float32),
                        label=obj.label,
                    )
                )
            if len(cell_objects) < cfg.min_objects:
                continue
            bbox = np.array([x0, y0, lo[2], x1, y1, lo[2] + cfg.cell_size], dtype=np.float64)
            cells.append(
                Cell(
                    id=f"{scene}_{len(cells):05d}",
                    scene_name=scene,
                    objects=cell_objects,
                    cell_size=float(cfg.cell_size),
                    bbox_w=bbox,
                )
            )
    return cells


def cells_from_cloud_file(path: str, scene: Optional[str] = None, cfg: CellCutConfig = CellCutConfig()) -> list[Cell]:
    """Read ``path`` and cut it into cells; ``scene`` defaults to the file name without extension."""
    cloud = read_labelled_cloud(path)
    if scene is None:
        scene = os.path.splitext(os.path.basename(path))[0] or "cloud"
    return cut_cloud_into_cells(cloud, scene, cfg)
