"""Fixed vocabularies of KITTI360Pose: classes, colour centres, scenes and splits.

The values are facts of the published data set (see shared/docs/kitti360pose.md).
"""
from __future__ import annotations

import numpy as np

#: The 21 object classes plus padding, in the index order the release uses.
CLASSES: tuple[str, ...] = (
    "building", "pole", "traffic light", "traffic sign", "garage", "stop", "smallpole",
    "lamp", "trash bin", "vending machine", "box", "road", "sidewalk", "parking", "wall",
    "fence", "guard rail", "bridge", "tunnel", "vegetation", "terrain", "pad",
)
CLASS_TO_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
PAD_LABEL = "pad"
PAD_INDEX = CLASS_TO_INDEX[PAD_LABEL]
NUM_CLASSES = len(CLASSES)  # 22, padding included

#: Classes that the release cut into pieces (DBSCAN, eps 0.75 m) instead of keeping whole instances.
STUFF_CLASSES: frozenset[str] = frozenset(
    ("road", "sidewalk", "parking", "wall", "fence", "guard rail", "bridge", "tunnel",
     "vegetation", "terrain")
)

#: Colour centres (mean rgb / 255) and their names; "gray" occurs twice on purpose.
COLOR_CENTERS_255 = np.array(
    [
        [47.26, 49.75, 42.42],
        [136.33, 136.95, 126.03],
        [87.50, 91.69, 80.15],
        [213.91, 216.25, 207.25],
        [110.39, 112.92, 103.69],
        [27.48, 28.44, 25.17],
        [66.66, 70.22, 60.20],
        [171.01, 170.06, 155.00],
    ],
    dtype=np.float64,
)
COLOR_CENTERS = COLOR_CENTERS_255 / 255.0
COLOR_NAMES: tuple[str, ...] = (
    "dark-green", "gray", "gray-green", "bright-gray", "gray", "black", "green", "beige",
)
UNIQUE_COLOR_NAMES: tuple[str, ...] = tuple(dict.fromkeys(COLOR_NAMES))

DIRECTIONS: tuple[str, ...] = ("east", "west", "north", "south", "on-top")
#: Hints closer than this (x-y, in cell units) to the object's closest point say "on-top".
ON_TOP_DISTANCE = 0.05
NUM_MENTIONED = 6

SCENES_TRAIN: tuple[str, ...] = tuple(
    f"2013_05_28_drive_{n:04d}_sync" for n in (0, 2, 4, 6, 7)
)
SCENES_VAL: tuple[str, ...] = ("2013_05_28_drive_0010_sync",)
SCENES_TEST: tuple[str, ...] = tuple(f"2013_05_28_drive_{n:04d}_sync" for n in (3, 5, 9))
SCENES_ALL: tuple[str, ...] = tuple(sorted(SCENES_TRAIN + SCENES_VAL + SCENES_TEST))
SPLITS: dict[str, tuple[str, ...]] = {
    "train": SCENES_TRAIN,
    "val": SCENES_VAL,
    "test": SCENES_TEST,
    "all": SCENES_ALL,
}


def short_scene_name(scene: str) -> str:
    """'2013_05_28_drive_0003_sync' -> '0003' (the prefix of cell ids)."""
    parts = scene.split("_")
    if len(parts) != 6:
        raise ValueError(f"not a KITTI-360 drive name: {scene!r} (expected e.g. 2013_05_28_drive_0003_sync)")
    return parts[-2]


def color_name(rgb_mean: np.ndarray) -> str:
    """Name of the colour centre nearest (L2) to a mean rgb in [0, 1]."""
    dists = np.linalg.norm(COLOR_CENTERS - np.asarray(rgb_mean, dtype=np.float64)[None, :3], axis=1)
    return COLOR_NAMES[int(np.argmin(dists))]
