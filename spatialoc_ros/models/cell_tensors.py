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

    def trimmed(self) -> "CellBatch":
        """The same cells with the object slots past the batch's largest real-object count cut
        off (real objects fill the first slots). The models are mask-correct, so a trimmed batch
        gives the same outputs for the remaining slots, for less work."""
        keep = max(int(self.mask.sum(dim=1).max()), 1) if self.mask.numel() else 1
        if keep >= self.mask.shape[1]:
            return self
        return CellBatch(**{f.name: getattr(self, f.name)[:, :keep] for f in fields(self)})


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


def _sample_indices(counts: np.ndarray, num_points: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """(M, num_points) indices into each object's own points (see :func:`_point_indices`); the
    deterministic case is computed for all objects at once (the same numbers as ``np.linspace``:
    ``arange * step`` with the last one set to ``n - 1``)."""
    if rng is not None:
        return np.stack([_point_indices(int(n), num_points, rng) for n in counts])
    last = (counts - 1).astype(np.float64)
    if num_points == 1:
        return np.zeros((len(counts), 1), dtype=np.int64)
    grid = np.arange(num_points, dtype=np.float64)[None, :] * (last / (num_points - 1))[:, None]
    grid[:, -1] = last
    return np.round(grid).astype(np.int64)


def cells_to_batch(
    cells: Sequence[Cell],
    max_objects: int = 28,
    num_points: int = 64,
    rng: Optional[np.random.Generator] = None,
    flip: Optional[Sequence[Optional[str]]] = None,
) -> CellBatch:
    """Pad / truncate ``cells`` into a :class:`CellBatch` on the CPU (see the module docstring).

    The per-object work is one pass that collects arrays; sampling, means and flips run on all
    objects of the batch at once. Raises ValueError for an unknown class label, an object without
    points or a bad flip.
    """
    if len(cells) == 0:
        raise ValueError("cells_to_batch needs at least one cell")
    if flip is not None and len(flip) != len(cells):
        raise ValueError(f"flip has {len(flip)} entries for {len(cells)} cells")
    B, O, P = len(cells), max_objects, num_points
    slot_b: list[int] = []
    slot_o: list[int] = []
    slot_flip: list[int] = []  # 0 none, 1 x, 2 y, 3 xy (bit 0: x, bit 1: y)
    labels: list[int] = []
    points_list: list[np.ndarray] = []
    colours_list: list[np.ndarray] = []
    for b, cell in enumerate(cells):
        cell_flip = None if flip is None else flip[b]
        if cell_flip not in FLIPS:
            raise ValueError(f"flip {cell_flip!r} of cell {cell.id} is not one of {FLIPS}")
        flip_code = 0 if cell_flip is None else ("x" in cell_flip) + 2 * ("y" in cell_flip)
        for o, obj in enumerate(_kept_objects([x for x in cell.objects if x.label != PAD_LABEL], O)):
            points, colors = obj.xyz, obj.rgb
            if not isinstance(points, np.ndarray) or not isinstance(colors, np.ndarray):
                points, colors = np.asarray(points, dtype=np.float64), np.asarray(colors, dtype=np.float64)
            if points.ndim != 2 or len(points) == 0 or points.shape != colors.shape or points.shape[1] != 3:
                raise ValueError(
                    f"object {obj.id} ({obj.label!r}) of cell {cell.id} needs matching (N>0, 3) "
                    f"xyz and rgb arrays, got {points.shape} and {colors.shape}"
                )
            index = CLASS_TO_INDEX.get(obj.label)
            if index is None:
                raise ValueError(f"object {obj.id} of cell {cell.id} has unknown class {obj.label!r}")
            slot_b.append(b)
            slot_o.append(o)
            slot_flip.append(flip_code)
            labels.append(index)
            points_list.append(points)
            colours_list.append(colors)
    xyz = np.zeros((B, O, P, 3), dtype=np.float32)
    rgb = np.zeros((B, O, P, 3), dtype=np.float32)
    class_idx = np.full((B, O), PAD_INDEX, dtype=np.int64)
    color = np.zeros((B, O, 3), dtype=np.float32)
    center = np.zeros((B, O, 3), dtype=np.float32)
    count = np.zeros((B, O), dtype=np.float32)
    mask = np.zeros((B, O), dtype=bool)
    if points_list:
        bi, oi = np.asarray(slot_b), np.asarray(slot_o)
        counts = np.array([len(p) for p in points_list], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # Gathered in the points' own dtype (float32 values stay exact through the flips below:
        # 1 - x rounds the same in float32 as in float64); means are summed in float64.
        all_points = np.concatenate(points_list)
        all_colours = np.concatenate(colours_list)
        idx = _sample_indices(counts, P, rng) + starts[:, None]  # (M, P) into the concatenation
        sampled = all_points[idx]  # (M, P, 3)
        if sampled.dtype != np.float32:
            sampled = sampled.astype(np.float64)
        means = np.add.reduceat(all_points, starts, axis=0, dtype=np.float64) / counts[:, None]
        codes = np.asarray(slot_flip)
        for axis, bit in ((0, 1), (1, 2)):
            hit = (codes & bit) != 0
            if hit.any():
                sampled[hit, :, axis] = 1.0 - sampled[hit, :, axis]
                means[hit, axis] = 1.0 - means[hit, axis]
        xyz[bi, oi] = sampled
        rgb[bi, oi] = all_colours[idx]
        class_idx[bi, oi] = labels
        color[bi, oi] = np.add.reduceat(all_colours, starts, axis=0, dtype=np.float64) / counts[:, None]
        center[bi, oi] = means
        count[bi, oi] = counts
        mask[bi, oi] = True
    return CellBatch(
        xyz=torch.from_numpy(xyz),
        rgb=torch.from_numpy(rgb),
        class_idx=torch.from_numpy(class_idx),
        color=torch.from_numpy(color),
        center=torch.from_numpy(center),
        num_points=torch.from_numpy(count),
        mask=torch.from_numpy(mask),
    )
