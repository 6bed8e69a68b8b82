"""Loading a KITTI360Pose folder (the release layout, or a synthetic city written the same way).

Layout::

    BASE/cells/<scene>.pkl       list[Cell]
    BASE/poses/<scene>.pkl       list[Pose]
    BASE/direction/<scene>.json  optional: cell id -> {direction: neighbouring cell id or null}
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from spatialoc_ros.data.constants import SPLITS
from spatialoc_ros.data.kitti360pose import Cell, DescriptionBestCell, Pose
from spatialoc_ros.data.safe_pickle import UnsafePickleError, safe_load_pickle
from spatialoc_ros.data.validation import validate_cells

Log = Callable[[str], None]


def warn_to_stderr(message: str) -> None:
    """The default ``log`` of the loaders: one ``warning:`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


class DataFormatError(ValueError):
    """A file is missing, unreadable, or does not hold what KITTI360Pose files hold."""


@dataclass
class SceneData:
    """Cells and poses of one or more scenes. ``cells_dict`` maps cell id -> Cell."""

    scenes: list[str]
    cells: list[Cell]
    poses: list[Pose]
    direction_map: Optional[dict] = None
    cells_dict: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cells_dict = {c.id: c for c in self.cells}
        if len(self.cells_dict) != len(self.cells):
            raise DataFormatError("cell ids are not unique across the loaded scenes")


def hint_texts(pose: Pose) -> list[str]:
    """The hint sentences of a query, built as the release builds them."""
    return [
        f"The pose is {d.direction} of a {d.object_color_text} {d.object_label}."
        for d in pose.descriptions
    ]


def query_text(pose: Pose) -> str:
    """The whole query: its hints joined by single spaces."""
    return " ".join(hint_texts(pose))


def _load_list(path: str, kind: Optional[type], what: str) -> list:
    if not os.path.isfile(path):
        raise DataFormatError(f"missing {what} file {path}")
    try:
        items = safe_load_pickle(path)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            OverflowError, MemoryError, RecursionError) as e:
        # garbage input: a corrupt length prefix raises OverflowError / MemoryError, a bad memo
        # reference KeyError, deeply nested junk RecursionError
        raise DataFormatError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(items, list):
        raise DataFormatError(f"{path} does not hold a list of {what} (it holds a {type(items).__name__})")
    if kind is not None and not all(isinstance(x, kind) for x in items):
        raise DataFormatError(f"{path} does not hold a list of {kind.__name__} objects")
    return items


def _check_pose(pose: Pose, path: str) -> None:
    if not pose.descriptions or not all(isinstance(d, DescriptionBestCell) for d in pose.descriptions):
        raise DataFormatError(f"{path}: a pose has no DescriptionBestCell hints")


def load_direction_map(base_path: str, scene: str) -> Optional[dict]:
    """The optional ``direction/<scene>.json``; None when the file is absent."""
    path = os.path.join(base_path, "direction", f"{scene}.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataFormatError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise DataFormatError(f"{path} must hold a JSON object: cell id -> {{direction: cell id or null}}")
    return data


def load_scene(base_path: str, scene: str, with_direction: bool = True, log: Log = warn_to_stderr) -> SceneData:
    """Load one scene's cells and poses (and its direction map when present).

    Cells go through :func:`spatialoc_ros.data.validation.validate_cells`: a bad cell is dropped
    (one ``log`` line with the reasons), and so are the poses whose best cell it was. A file
    without a single good cell is a DataFormatError.
    """
    cells_path = os.path.join(base_path, "cells", f"{scene}.pkl")
    poses_path = os.path.join(base_path, "poses", f"{scene}.pkl")
    raw_cells = _load_list(cells_path, None, "cells")
    poses = _load_list(poses_path, Pose, "poses")
    for pose in poses:
        _check_pose(pose, poses_path)
    checked = validate_cells(raw_cells, log=log, what=f"cells of {cells_path}")
    if raw_cells and not checked.good:
        raise DataFormatError(f"{cells_path} holds no usable cell ({checked.summary()})")
    direction = load_direction_map(base_path, scene) if with_direction else None
    dropped_ids = {cid for cid, _ in checked.dropped}
    kept_poses = [p for p in poses if p.cell_id not in dropped_ids]
    if len(kept_poses) < len(poses):
        log(f"dropped {len(poses) - len(kept_poses)} of {len(poses)} poses of {poses_path}: their best cell was dropped")
    data = SceneData([scene], checked.good, kept_poses, direction)
    missing = {p.cell_id for p in kept_poses} - set(data.cells_dict)
    if missing:
        raise DataFormatError(
            f"{poses_path}: {len(missing)} poses name cells absent from {cells_path}, e.g. {sorted(missing)[0]}"
        )
    return data


def available_scenes(base_path: str) -> list[str]:
    """Scene names that have a cells file under ``base_path``."""
    folder = os.path.join(base_path, "cells")
    if not os.path.isdir(folder):
        raise DataFormatError(
            f"{base_path} is not a KITTI360Pose folder (no cells/ inside); point --base_path at the "
            "folder holding cells/ and poses/, or generate one with python -m spatialoc_ros.data.synthetic"
        )
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".pkl"))


def scenes_of_split(base_path: str, split: str) -> list[str]:
    """The published scene list of a split, restricted to the scenes present in ``base_path``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    present = set(available_scenes(base_path))
    scenes = [s for s in SPLITS[split] if s in present]
    if not scenes:
        raise DataFormatError(
            f"{base_path} has none of the {split} scenes ({', '.join(SPLITS[split])})"
        )
    return scenes


def load_scenes(base_path: str, scenes: Iterable[str], with_direction: bool = True,
                log: Log = warn_to_stderr) -> SceneData:
    """Load and concatenate several scenes."""
    parts = [load_scene(base_path, s, with_direction, log=log) for s in scenes]
    direction: Optional[dict] = None
    if with_direction and any(p.direction_map is not None for p in parts):
        direction = {}
        for p in parts:
            direction.update(p.direction_map or {})
    return SceneData(
        [s for p in parts for s in p.scenes],
        [c for p in parts for c in p.cells],
        [q for p in parts for q in p.poses],
        direction,
    )


def load_split(base_path: str, split: str, with_direction: bool = True, log: Log = warn_to_stderr) -> SceneData:
    """Load the scenes of ``split`` (train / val / test / all) present in ``base_path``."""
    return load_scenes(base_path, scenes_of_split(base_path, split), with_direction, log=log)


def cell_world_position(cell: Cell, pos_in_cell: np.ndarray) -> np.ndarray:
    """World x-y of a position normalised in ``cell``: bbox_w[0:2] + pos * cell_size."""
    bbox = np.asarray(cell.bbox_w, dtype=np.float64)
    return bbox[0:2] + np.asarray(pos_in_cell, dtype=np.float64)[..., 0:2] * float(cell.cell_size)
