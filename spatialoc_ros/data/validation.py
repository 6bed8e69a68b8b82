"""The one validation boundary for map cells.

Every path by which cells enter the project goes through :func:`validate_cells`: the map server
(after reading a KITTI360Pose folder or cutting a cloud), the localizer (after fetching cells over
ROS), and the CLIs (through :mod:`spatialoc_ros.data.loading`). A bad cell is dropped with a
reason; the good ones are kept; a map with no good cell is refused by the caller.

A cell is bad when any of these holds:

- it is not a :class:`~spatialoc_ros.data.kitti360pose.Cell`, or its fields have the wrong type
  (pickles can hold anything: ``objects=7``, a list as ``id``);
- ``id`` is empty or repeats an earlier cell's id (the first one is kept);
- ``cell_size`` is not a finite number > 0, or ``bbox_w`` is not 6 finite numbers with
  x1 > x0 and y1 > y0, or its coordinates exceed :data:`MAX_WORLD_COORD_M`, or ``cell_size`` is not
  the longest x-y edge of ``bbox_w`` (within :data:`CELL_SIZE_TOLERANCE`): points are normalised by
  it, so a wrong one puts every answer elsewhere;
- it holds no object, or one of its objects is bad: unknown or empty label, no points, xyz / rgb
  not (N, 3) finite numbers, points farther than :data:`MAX_NORMALISED_COORD` cell sizes from the
  cell (instances may stick out of [0, 1], but not by kilometres), colours outside [0, 1].
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL
from spatialoc_ros.data.kitti360pose import Cell, Object3d

#: Object points may stick out of their cell (instances kept whole), but not beyond this many
#: cell sizes: |xyz| <= MAX_NORMALISED_COORD in cell units.
MAX_NORMALISED_COORD = 10.0
#: World coordinates of a cell's bbox beyond this (metres) are refused (UTM-sized maps fit).
MAX_WORLD_COORD_M = 1.0e8
#: Relative tolerance between ``cell_size`` and the longest x-y edge of ``bbox_w``.
CELL_SIZE_TOLERANCE = 0.01
#: Colours are in [0, 1]; this much rounding slack is allowed.
RGB_SLACK = 1e-3
#: How many drop reasons a summary quotes.
QUOTED_REASONS = 3

_REAL_LABELS = frozenset(c for c in CLASSES if c != PAD_LABEL)


@dataclass
class CellValidation:
    """The outcome of :func:`validate_cells`: the good cells (input order) and, for every dropped
    cell, ``(cell id or '#index', reason)``."""

    good: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def summary(self, what: str = "cells") -> str:
        """One line: how many were dropped and the first reasons."""
        total = len(self.good) + len(self.dropped)
        quoted = "; ".join(f"{cid}: {why}" for cid, why in self.dropped[:QUOTED_REASONS])
        more = f" (+{len(self.dropped) - QUOTED_REASONS} more)" if len(self.dropped) > QUOTED_REASONS else ""
        return f"dropped {len(self.dropped)} of {total} {what}: {quoted}{more}"


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _points_problem(values, name: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        return None, f"{name} is not an array ({type(e).__name__})"
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != 3:
        return None, f"{name} must be an (N, 3) array of numbers, got shape {arr.shape} dtype {arr.dtype}"
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        return None, f"{name} holds {bad} non-finite point(s)"
    return arr, None


def object_problem(obj) -> Optional[str]:
    """Why ``obj`` cannot be a map object, or None."""
    if not isinstance(obj, Object3d):
        return f"an object is a {type(obj).__name__}, not an Object3d"
    if not isinstance(obj.label, str) or obj.label not in _REAL_LABELS:
        return f"object label {obj.label!r} is not one of the 21 classes"
    if not (isinstance(obj.id, numbers.Integral) and isinstance(obj.instance_id, numbers.Integral)):
        return f"{obj.label} object has a non-integer id or instance_id"
    xyz, why = _points_problem(obj.xyz, f"{obj.label} xyz")
    if why:
        return why
    if len(xyz) == 0:
        return f"{obj.label} object has no points"
    rgb, why = _points_problem(obj.rgb, f"{obj.label} rgb")
    if why:
        return why
    if len(rgb) != len(xyz):
        return f"{obj.label} object has {len(xyz)} points but {len(rgb)} colours"
    if float(rgb.min()) < -RGB_SLACK or float(rgb.max()) > 1.0 + RGB_SLACK:
        return f"{obj.label} colours reach {float(rgb.min()):.3g}..{float(rgb.max()):.3g}, outside [0, 1]"
    extent = float(np.abs(xyz).max())
    if extent > MAX_NORMALISED_COORD:
        return (f"{obj.label} object reaches {extent:.3g} cell sizes from its cell "
                f"(more than {MAX_NORMALISED_COORD:g})")
    return None


def cell_problem(cell) -> Optional[str]:
    """Why ``cell`` cannot be a map cell (duplicates aside), or None."""
    if not isinstance(cell, Cell):
        return f"a {type(cell).__name__}, not a Cell"
    if not isinstance(cell.id, str) or not cell.id.strip():
        return f"cell id {cell.id!r} is not a non-empty string"
    if not isinstance(cell.scene_name, str):
        return f"scene_name {cell.scene_name!r} is not a string"
    if not (_is_number(cell.cell_size) and math.isfinite(float(cell.cell_size)) and float(cell.cell_size) > 0):
        return f"cell_size {cell.cell_size!r} is not a finite number > 0"
    try:
        bbox = np.asarray(cell.bbox_w, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return f"bbox_w {cell.bbox_w!r} is not 6 numbers"
    if bbox.shape != (6,) or not np.isfinite(bbox).all():
        return f"bbox_w {np.asarray(cell.bbox_w).tolist()!r} is not 6 finite numbers"
    if not (bbox[3] > bbox[0] and bbox[4] > bbox[1]):
        return f"bbox_w {bbox.tolist()} has x1 <= x0 or y1 <= y0"
    if float(np.abs(bbox).max()) > MAX_WORLD_COORD_M:
        return f"bbox_w {bbox.tolist()} lies beyond {MAX_WORLD_COORD_M:g} m"
    edge = float(max(bbox[3] - bbox[0], bbox[4] - bbox[1]))
    if abs(float(cell.cell_size) - edge) > CELL_SIZE_TOLERANCE * edge:
        return f"cell_size {float(cell.cell_size):g} is not the longest edge of bbox_w ({edge:g} m)"
    if not isinstance(cell.objects, (list, tuple)):
        return f"objects is a {type(cell.objects).__name__}, not a list"
    if not cell.objects:
        return "no objects (it cannot match any description)"
    for obj in cell.objects:
        why = object_problem(obj)
        if why:
            return why
    return None


def validate_cells(cells: Iterable, log: Optional[Callable[[str], None]] = None,
                   what: str = "cells") -> CellValidation:
    """Split ``cells`` into good ones and dropped ones (with reasons); see the module docstring.

    ``log`` (e.g. a logger's warning) gets one summary line when anything was dropped.
    """
    out = CellValidation()
    seen: set[str] = set()
    for i, cell in enumerate(cells):
        why = cell_problem(cell)
        named = isinstance(cell, Cell) and isinstance(cell.id, str) and bool(cell.id.strip())
        name = cell.id if named else f"#{i}"
        if why is None and cell.id in seen:
            why = "duplicate id (the first cell with it is kept)"
        if why is not None:
            out.dropped.append((str(name), why))
            continue
        seen.add(cell.id)
        out.good.append(cell)
    if out.dropped and log is not None:
        log(out.summary(what))
    return out
