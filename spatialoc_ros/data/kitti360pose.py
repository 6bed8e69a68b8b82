"""The project's own KITTI360Pose classes.

Field names are those of the published pickles, so a release file unpickles straight into these
classes (see :mod:`spatialoc_ros.data.safe_pickle`). Coordinates follow the release:
object points and ``Pose.pose`` are normalised to their cell, ``(world - bbox_w[0:3]) / cell_size``;
``bbox_w`` and ``pose_w`` are world metres.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from spatialoc_ros.data.constants import ON_TOP_DISTANCE, PAD_LABEL, color_name


@dataclass(eq=False)
class Object3d:
    """One object of a cell: a labelled point set.

    ``id`` is unique only inside its cell (-1 for padding); ``instance_id`` is the KITTI-360 instance
    (stuff classes share it between pieces). ``xyz``: (N, 3) cell-normalised, ``rgb``: (N, 3) in [0, 1].
    """

    id: int
    instance_id: int
    xyz: np.ndarray
    rgb: np.ndarray
    label: str

    def get_center(self) -> np.ndarray:
        return np.mean(self.xyz, axis=0)

    def get_color_rgb(self) -> np.ndarray:
        return np.mean(self.rgb, axis=0)

    def get_color_text(self) -> str:
        return color_name(self.get_color_rgb())

    def get_closest_point(self, anchor: np.ndarray) -> np.ndarray:
        dists = np.linalg.norm(self.xyz - np.asarray(anchor)[None, :], axis=1)
        return self.xyz[int(np.argmin(dists))]

    @property
    def is_padding(self) -> bool:
        return self.label == PAD_LABEL

    def __repr__(self) -> str:
        return f"Object3d({self.id}, {self.label!r}, {len(self.xyz)} points)"


@dataclass(eq=False)
class Cell:
    """A square map cell. ``id`` is ``f"{short_scene}_{idx:05d}"``; ``bbox_w`` = x0,y0,z0,x1,y1,z1."""

    id: str
    scene_name: str
    objects: list
    cell_size: float
    bbox_w: np.ndarray

    def get_center(self) -> np.ndarray:
        bbox = np.asarray(self.bbox_w, dtype=np.float64)
        return 0.5 * (bbox[0:3] + bbox[3:6])

    def __repr__(self) -> str:
        return f"Cell({self.id!r}, {len(self.objects)} objects)"


@dataclass(eq=False)
class DescriptionPoseCell:
    """A hint as described in the query's own ("pose") cell, before grounding to the best cell."""

    object_id: int
    object_instance_id: int
    object_label: str
    object_color_rgb: np.ndarray
    object_color_text: str
    direction: str
    offset_center: np.ndarray
    offset_closest: np.ndarray
    closest_point: np.ndarray


@dataclass(eq=False)
class DescriptionBestCell:
    """A hint grounded in the best (database) cell. When ``is_matched`` is False, the described
    object is not in the best cell and the ``best_*`` fields are absent (None here)."""

    object_id: Optional[int] = None
    object_instance_id: int = -1
    object_label: str = ""
    object_color_rgb: Optional[np.ndarray] = None
    object_color_text: str = ""
    direction: str = ""
    offset_center: Optional[np.ndarray] = None
    offset_closest: Optional[np.ndarray] = None
    closest_point: Optional[np.ndarray] = None
    best_offset_center: Optional[np.ndarray] = None
    best_offset_closest: Optional[np.ndarray] = None
    is_matched: bool = False

    def hint(self) -> str:
        """The hint sentence exactly as the release builds it."""
        return f"The pose is {self.direction} of a {self.object_color_text} {self.object_label}."


@dataclass(eq=False)
class Pose:
    """A query position: ``pose`` normalised in its best cell, ``pose_w`` world xyz."""

    pose: np.ndarray
    pose_w: np.ndarray
    cell_id: str
    scene_name: str
    descriptions: list = field(default_factory=list)
    described_by: Optional[str] = None

    def __repr__(self) -> str:
        return f"Pose({self.cell_id!r}, {len(self.descriptions)} hints, by {self.described_by})"


def direction_of(closest_point: np.ndarray, position: np.ndarray) -> str:
    """The release's direction rule: from the object's closest point to the position, x-y only.

    Shorter than ON_TOP_DISTANCE (cell units) means 'on-top'; otherwise the dominant axis decides;
    on an exact tie north/south wins, as in the release.
    """
    d = np.asarray(position, dtype=np.float64)[0:2] - np.asarray(closest_point, dtype=np.float64)[0:2]
    if np.linalg.norm(d) < ON_TOP_DISTANCE:
        return "on-top"
    if abs(d[1]) >= abs(d[0]):
        return "north" if d[1] >= 0 else "south"
    return "east" if d[0] >= 0 else "west"
