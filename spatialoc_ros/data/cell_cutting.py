"""Cutting world objects into KITTI360Pose cells: the one implementation shared by the synthetic
generator (:mod:`spatialoc_ros.data.synthetic`) and the user point-cloud path
(:mod:`spatialoc_ros.data.cloud_cells`).

The rule is the release's ``create_cell``: for a cell's 3-D box,

- an instance ("thing") object is kept whole when at least :data:`INSIDE_FRACTION` of its points
  lie in the box (its normalised points may then stick out of [0, 1]);
- a "stuff" object (road, vegetation, ...) is clipped to the box and split into connected pieces
  on a :data:`STUFF_VOXEL` x-y grid (8-neighbourhood; a voxel stand-in for the release's DBSCAN);
  pieces under :data:`STUFF_MIN_POINTS` points are dropped.

Objects come out ordered by world-object index, then piece; points normalised to the box
(``(world - bbox[0:3]) / cell_size``, float32).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from spatialoc_ros.data.constants import STUFF_CLASSES
from spatialoc_ros.data.kitti360pose import Object3d

#: An instance object belongs to a cell when at least this share of its points is inside.
INSIDE_FRACTION = 1.0 / 3.0
#: Grid (metres) on which stuff classes are split into connected pieces inside a cell.
STUFF_VOXEL = 2.0
#: Stuff pieces with fewer points are dropped.
STUFF_MIN_POINTS = 10
#: Edge (metres) of the x-y tiles that bucket the points for cropping.
TILE = 10.0
#: The tile grid is dense (8 bytes a tile): a world of more tiles than this (50 km x 50 km at 10 m,
#: 200 MB) is refused instead of allocating gigabytes (a far outlier point is the usual cause).
MAX_TILES = 25_000_000


class WorldIndex:
    """All points of a world's objects, bucketed in :data:`TILE` m tiles, for fast cropping.

    ``labels`` (K,), ``instance_ids`` (K,), ``xyz`` K arrays (n_k, 3) of world metres,
    ``rgb`` K arrays (n_k, 3) in [0, 1].
    """

    def __init__(self, labels: Sequence[str], instance_ids: Sequence[int],
                 xyz: Sequence[np.ndarray], rgb: Sequence[np.ndarray]) -> None:
        if not (len(labels) == len(instance_ids) == len(xyz) == len(rgb)) or not labels:
            raise ValueError("a world needs one label, instance id, xyz and rgb array per object, and >= 1 object")
        lens = np.array([len(x) for x in xyz])
        self.labels = list(labels)
        self.instance_ids = np.array(instance_ids, dtype=np.int64)
        self.xyz = np.concatenate(xyz)
        self.rgb = np.concatenate(rgb)
        self.start = np.concatenate([[0], np.cumsum(lens)[:-1]])
        self.length = lens
        self.obj = np.repeat(np.arange(len(lens)), lens)
        self.is_stuff = np.array([lbl in STUFF_CLASSES for lbl in self.labels])
        self.min_xy = self.xyz[:, :2].min(axis=0)
        span = (self.xyz[:, :2].max(axis=0) - self.min_xy) / TILE
        if float(np.prod(np.floor(span) + 1)) > MAX_TILES:
            raise ValueError(
                f"the points span {span[0] * TILE / 1e3:.3g} km x {span[1] * TILE / 1e3:.3g} km, more than one "
                f"world index holds ({MAX_TILES} tiles of {TILE:g} m); split the map or remove far outliers"
            )
        t = np.floor((self.xyz[:, :2] - self.min_xy) / TILE).astype(np.int64)
        self.nx, self.ny = int(t[:, 0].max()) + 1, int(t[:, 1].max()) + 1
        key = t[:, 0] * self.ny + t[:, 1]
        self.order = np.argsort(key, kind="stable")
        self.tile_start = np.searchsorted(key[self.order], np.arange(self.nx * self.ny + 1))

    def points_in(self, bbox: np.ndarray) -> np.ndarray:
        """Sorted indices of the points inside ``bbox`` (x0, y0, z0, x1, y1, z1; bounds included)."""
        lo = np.floor((bbox[0:2] - self.min_xy) / TILE).astype(int)
        hi = np.floor((bbox[3:5] - self.min_xy) / TILE).astype(int)
        tx0, ty0 = max(lo[0], 0), max(lo[1], 0)
        tx1, ty1 = min(hi[0], self.nx - 1), min(hi[1], self.ny - 1)
        if tx0 > tx1 or ty0 > ty1:
            return np.zeros(0, dtype=np.int64)
        idx = np.concatenate([
            self.order[self.tile_start[tx * self.ny + ty0]: self.tile_start[tx * self.ny + ty1 + 1]]
            for tx in range(tx0, tx1 + 1)
        ])
        p = self.xyz[idx]
        m = ((p[:, 0] >= bbox[0]) & (p[:, 1] >= bbox[1]) & (p[:, 2] >= bbox[2])
             & (p[:, 0] <= bbox[3]) & (p[:, 1] <= bbox[4]) & (p[:, 2] <= bbox[5]))
        return np.sort(idx[m])

    def occupied_tiles(self) -> np.ndarray:
        """(T, 2) integer x-y indices of the tiles that hold points (tile (0, 0) starts at min_xy)."""
        counts = np.diff(self.tile_start)
        flat = np.flatnonzero(counts)
        return np.column_stack([flat // self.ny, flat % self.ny])

    def crop(self, bbox: np.ndarray, cell_size: float) -> list[Object3d]:
        """The objects of the cell ``bbox`` by the rule of the module docstring."""
        idx = self.points_in(bbox)
        if len(idx) == 0:
            return []
        obj = self.obj[idx]
        pieces: list[tuple[int, int, np.ndarray]] = []  # (object, piece, point indices)
        uobj, counts = np.unique(obj, return_counts=True)
        inst = ~self.is_stuff[uobj]
        keep = uobj[inst][counts[inst] >= INSIDE_FRACTION * self.length[uobj[inst]]]
        for o in keep:
            pieces.append((int(o), 0, np.arange(self.start[o], self.start[o] + self.length[o])))
        smask = self.is_stuff[obj]
        if smask.any():
            sidx, sobj = idx[smask], obj[smask]
            su = np.unique(sobj)
            local = np.searchsorted(su, sobj)
            g = int(np.ceil(cell_size / STUFF_VOXEL))
            gxy = np.clip(((self.xyz[sidx, 0:2] - bbox[0:2]) / STUFF_VOXEL).astype(np.int64), 0, g - 1)
            grid = np.zeros((len(su), g, g), dtype=bool)
            grid[local, gxy[:, 0], gxy[:, 1]] = True
            structure = np.zeros((3, 3, 3), dtype=bool)
            structure[1] = True
            labels, _ = ndimage.label(grid, structure=structure)
            comp = labels[local, gxy[:, 0], gxy[:, 1]]
            order = np.argsort(comp, kind="stable")
            comp_sorted = comp[order]
            bounds = np.flatnonzero(np.diff(comp_sorted)) + 1
            for grp in np.split(order, bounds):
                if len(grp) >= STUFF_MIN_POINTS:
                    pieces.append((int(su[local[grp[0]]]), int(comp[grp[0]]), sidx[grp]))
        pieces.sort(key=lambda p: (p[0], p[1]))
        origin = bbox[0:3]
        objects = []
        for i, (o, _, pidx) in enumerate(pieces):
            xyz = ((self.xyz[pidx] - origin) / cell_size).astype(np.float32)
            objects.append(Object3d(i, int(self.instance_ids[o]), xyz, self.rgb[pidx].copy(), self.labels[o]))
        return objects
