"""Turn :class:`~spatialoc_ros.data.kitti360pose.Cell` objects into padded tensors.

Layout: every cell becomes exactly ``max_objects`` object slots (real objects first, in the cell's
order, then padding; objects labelled 'pad' in the cell are skipped), each with ``num_points``
sampled points. Padding slots have zero points, class ``PAD_INDEX``, zero colour / centre / count
and ``mask`` False.

Truncation: a cell with more than ``max_objects`` objects keeps the ``max_objects`` objects with
the most points (large objects are the ones descriptions tend to name, and the rule does not depend
on list order); ties keep the earlier object; the kept objects stay in their original order.

Flips (training augmentation) mirror a whole cell: ``'x'`` maps x -> 1 - x, ``'y'`` maps
y -> 1 - y, ``'xy'`` both; they apply to the points and to the centres. Colours and counts do not
change. (Whoever flips a cell must also swap the east/west or north/south words of its hints.)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch

from spatialoc_ros.data.constants import CLASS_TO_INDEX, PAD_INDEX, PAD_LABEL
from spatialoc_ros.data.kitti360pose import Cell

FLIPS: tuple[Optional[str], ...] = (None, "x", "y", "xy")


@dataclass
class CellBatch:
    """Padded tensors of B cells, O object slots, P points per object (cell-normalised units)."""

    xyz: torch.Tensor  # (B, O, P, 3) float32, cell-normalised coordinates
    rgb: torch.Tensor  # (B, O, P, 3) float32 in [0, 1]
    class_idx: torch.Tensor  # (B, O) long, PAD_INDEX for padding
    color: torch.Tensor  # (B, O, 3) mean rgb of all the object's points
    center: torch.Tensor  # (B, O, 3) mean xyz of all the object's points
    num_points: torch.Tensor  # (B, O) float, raw point count of the object (0 for padding)
    mask: torch.Tensor  # (B, O) bool, True = real object

    def to(self, device) -> "CellBatch":
        return CellBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def index(self, idx) -> "CellBatch":
        """The sub-batch ``idx`` (slice, index tensor or list) along B."""
        return CellBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def _point_indices(n: int, num_points: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Indices of ``num_points`` points out of ``n``: random (with replacement only when n is too
    small) when ``rng`` is given, else evenly spaced (deterministic)."""
    if rng is None:
        return np.round(np.linspace(0, n - 1, num_points)).astype(np.int64)
    return rng.choice(n, size=num_points, replace=n < num_points)


def _kept_objects(objects: list, max_objects: int) -> list:
    if len(objects) <= max_objects:
        return list(objects)
    sizes = np.array([len(o.xyz) for o in objects])
    order = np.argsort(-sizes, kind="stable")[:max_objects]
    return [objects[i] for i in sorted(order)]


def _mirror(values: np.ndarray, flip: Optional[str]) -> np.ndarray:
    """Apply a flip to the last axis (x, y, z) of cell-normalised coordinates."""
    if flip is None:
        return values
    values = values.copy()
    if "x" in flip:
        values[..., 0] = 1.0 - values[..., 0]
    if "y" in flip:
        values[..., 1] = 1.0 - values[..., 1]
    return values


def cells_to_batch(
    cells: Sequence[Cell],
    max_objects: int = 28,
    num_points: int = 64,
    rng: Optional[np.random.Generator] = None,
    flip: Optional[Sequence[Optional[str]]] = None,
) -> CellBatch:
    """Pad / truncate ``cells`` into a :class:`CellBatch` on the CPU (see the module docstring).

    Raises ValueError for an unknown class label, an object without points or a bad flip.
    """
    if len(cells) == 0:
        raise ValueError("cells_to_batch needs at least one cell")
    if flip is not None and len(flip) != len(cells):
        raise ValueError(f"flip has {len(flip)} entries for {len(cells)} cells")
    B, O, P = len(cells), max_objects, num_points
    xyz = np.zeros((B, O, P, 3), dtype=np.float32)
    rgb = np.zeros((B, O, P, 3), dtype=np.float32)
    class_idx = np.full((B, O), PAD_INDEX, dtype=np.int64)
    color = np.zeros((B, O, 3), dtype=np.float32)
    center = np.zeros((B, O, 3), dtype=np.float32)
    count = np.zeros((B, O), dtype=np.float32)
    mask = np.zeros((B, O), dtype=bool)
    for b, cell in enumerate(cells):
        cell_flip = None if flip is None else flip[b]
        if cell_flip not in FLIPS:
            raise ValueError(f"flip {cell_flip!r} of cell {cell.id} is not one of {FLIPS}")
        for o, obj in enumerate(_kept_objects([x for x in cell.objects if x.label != PAD_LABEL], O)):
            points = np.asarray(obj.xyz, dtype=np.float64)
            colors = np.asarray(obj.rgb, dtype=np.float64)
            if len(points) == 0 or points.shape != colors.shape or points.shape[1] != 3:
                raise ValueError(
                    f"object {obj.id} ({obj.label!r}) of cell {cell.id} needs matching (N>0, 3) "
                    f"xyz and rgb arrays, got {points.shape} and {colors.shape}"
                )
            if obj.label not in CLASS_TO_INDEX:
                raise ValueError(f"object {obj.id} of cell {cell.id} has unknown class {obj.label!r}")
            idx = _point_indices(len(points), P, rng)
            xyz[b, o] = _mirror(points[idx], cell_flip)
            rgb[b, o] = colors[idx]
            class_idx[b, o] = CLASS_TO_INDEX[obj.label]
            color[b, o] = colors.mean(axis=0)
            center[b, o] = _mirror(points.mean(axis=0), cell_flip)
            count[b, o] = len(points)
            mask[b, o] = True
    return CellBatch(
        xyz=torch.from_numpy(xyz),
        rgb=torch.from_numpy(rgb),
        class_idx=torch.from_numpy(class_idx),
        color=torch.from_numpy(color),
        center=torch.from_numpy(center),
        num_points=torch.from_numpy(count),
        mask=torch.from_numpy(mask),
    )
