"""The KITTI360Pose classes: direction rule, colour names, hint text."""
import numpy as np
import pytest

from spatialoc_ros.data.constants import (
    CLASSES,
    COLOR_CENTERS,
    COLOR_NAMES,
    NUM_CLASSES,
    PAD_INDEX,
    STUFF_CLASSES,
    color_name,
    short_scene_name,
)
from spatialoc_ros.data.kitti360pose import Cell, DescriptionBestCell, Object3d, Pose, direction_of
from spatialoc_ros.data.loading import hint_texts, query_text


@pytest.mark.parametrize(
    "closest, position, expected",
    [
        ((0.5, 0.5), (0.8, 0.5), "east"),
        ((0.5, 0.5), (0.2, 0.55), "west"),
        ((0.5, 0.5), (0.45, 0.9), "north"),
        ((0.5, 0.5), (0.6, 0.1), "south"),
        # exact ties |dx| == |dy|: north / south win, as in the release
        ((0.0, 0.0), (0.25, 0.25), "north"),
        ((0.0, 0.0), (-0.25, 0.25), "north"),
        ((0.0, 0.0), (0.25, -0.25), "south"),
        ((0.0, 0.0), (-0.25, -0.25), "south"),
        # on-top: closer than 0.05 cell units in x-y; z is ignored
        ((0.5, 0.5, 0.0), (0.53, 0.53, 0.9), "on-top"),
        ((0.5, 0.5), (0.5, 0.5), "on-top"),
        ((0.5, 0.5), (0.5 + 0.0499, 0.5), "on-top"),
        ((0.5, 0.5), (0.5 + 0.0501, 0.5), "east"),
        ((0.5, 0.5, 0.0), (0.5, 0.44, 0.0), "south"),
    ],
)
def test_direction_of(closest, position, expected):
    assert direction_of(np.array(closest), np.array(position)) == expected


def test_direction_threshold_is_strict():
    # norm exactly 0.05 is not on-top (the release tests `< 0.05`)
    assert direction_of(np.array([0.0, 0.0]), np.array([0.03, 0.04])) == "north"


def test_colour_centres_name_themselves():
    for centre, name in zip(COLOR_CENTERS, COLOR_NAMES):
        assert color_name(centre) == name
    assert COLOR_NAMES.count("gray") == 2 and len(COLOR_NAMES) == 8
    # a small perturbation does not change the name
    for centre, name in zip(COLOR_CENTERS, COLOR_NAMES):
        assert color_name(centre + 0.01) == name


def test_object_colour_and_geometry():
    rng = np.random.default_rng(0)
    rgb = np.clip(COLOR_CENTERS[7] + rng.normal(0, 0.02, (50, 3)), 0, 1)  # beige
    xyz = rng.uniform(0.2, 0.4, (50, 3))
    obj = Object3d(3, 17, xyz, rgb, "building")
    assert obj.get_color_text() == "beige"
    np.testing.assert_allclose(obj.get_center(), xyz.mean(axis=0))
    np.testing.assert_allclose(obj.get_color_rgb(), rgb.mean(axis=0))
    anchor = np.array([1.0, 1.0, 1.0])
    cp = obj.get_closest_point(anchor)
    assert np.linalg.norm(cp - anchor) == pytest.approx(np.min(np.linalg.norm(xyz - anchor, axis=1)))


def test_hint_text_format():
    d = DescriptionBestCell(object_id=2, object_instance_id=11001, object_label="building",
                            object_color_rgb=COLOR_CENTERS[1], object_color_text="gray", direction="north",
                            is_matched=True)
    assert d.hint() == "The pose is north of a gray building."
    d2 = DescriptionBestCell(object_label="traffic sign", object_color_text="bright-gray", direction="on-top")
    assert d2.hint() == "The pose is on-top of a bright-gray traffic sign."
    assert d2.is_matched is False and d2.object_id is None and d2.best_offset_center is None
    pose = Pose(np.array([0.5, 0.5, 0.5]), np.array([10.0, 20.0, 1.0]), "0003_00001", "0003", [d, d2], "closest")
    assert hint_texts(pose) == [d.hint(), d2.hint()]
    assert query_text(pose) == "The pose is north of a gray building. The pose is on-top of a bright-gray traffic sign."


def test_cell_centre_and_constants():
    cell = Cell("0003_00042", "0003", [], 30.0, np.array([10.0, 20.0, 0.0, 40.0, 50.0, 30.0]))
    np.testing.assert_allclose(cell.get_center(), [25.0, 35.0, 15.0])
    assert NUM_CLASSES == 22 and CLASSES[PAD_INDEX] == "pad"
    assert len(STUFF_CLASSES) == 10 and all(c in CLASSES for c in STUFF_CLASSES)
    assert short_scene_name("2013_05_28_drive_0003_sync") == "0003"
    with pytest.raises(ValueError):
        short_scene_name("drive_3")
