"""cells_to_batch on hand-made cells: padding, truncation, sampling, flips."""
import numpy as np
import pytest
import torch

from spatialoc_ros.data.constants import CLASS_TO_INDEX, PAD_INDEX
from spatialoc_ros.data.kitti360pose import Cell, Object3d
from spatialoc_ros.models.cell_tensors import cells_to_batch


def obj(i, label, xyz, rgb=None):
    xyz = np.asarray(xyz, dtype=np.float64)
    rgb = np.full_like(xyz, 0.5) if rgb is None else np.asarray(rgb, dtype=np.float64)
    return Object3d(id=i, instance_id=100 + i, xyz=xyz, rgb=rgb, label=label)


@pytest.fixture
def cell():
    small = obj(0, "pole", [[0.1, 0.2, 0.0], [0.3, 0.2, 1.0]], rgb=[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    big = obj(1, "building", [[0.5 + 0.01 * k, 0.6, 0.1] for k in range(5)])
    mid = obj(2, "road", [[0.9, 0.1 * k, 0.0] for k in range(3)])
    return Cell(id="0003_00007", scene_name="0003", objects=[small, big, mid], cell_size=30.0,
                bbox_w=np.array([0.0, 0.0, 0.0, 30.0, 30.0, 5.0]))


def test_padding_layout_and_features(cell):
    b = cells_to_batch([cell], max_objects=5, num_points=4)
    assert b.xyz.shape == (1, 5, 4, 3) and b.rgb.shape == (1, 5, 4, 3) and b.xyz.dtype == torch.float32
    assert b.mask.tolist() == [[True, True, True, False, False]]
    assert b.class_idx.tolist() == [[CLASS_TO_INDEX["pole"], CLASS_TO_INDEX["building"], CLASS_TO_INDEX["road"],
                                     PAD_INDEX, PAD_INDEX]]
    assert b.num_points.tolist() == [[2.0, 5.0, 3.0, 0.0, 0.0]]
    assert torch.allclose(b.center[0, 0], torch.tensor([0.2, 0.2, 0.5]))  # mean of ALL points
    assert torch.allclose(b.color[0, 0], torch.tensor([0.5, 0.0, 0.5]))
    assert b.xyz[0, 3:].abs().sum() == 0 and b.center[0, 3:].abs().sum() == 0
    # rng None: evenly spaced indices, 2 points -> [0, 0, 1, 1] (upsampled deterministically)
    assert torch.allclose(b.xyz[0, 0, :, 0], torch.tensor([0.1, 0.1, 0.3, 0.3]))
    assert torch.allclose(b.xyz[0, 1, :, 0], torch.tensor([0.50, 0.51, 0.53, 0.54]))  # 5 -> 4: 0,1,3,4
    assert torch.equal(b.xyz, cells_to_batch([cell], max_objects=5, num_points=4).xyz)


def test_truncation_keeps_largest_objects_in_order(cell):
    b = cells_to_batch([cell], max_objects=2, num_points=3)
    assert b.mask.tolist() == [[True, True]]
    assert b.class_idx[0].tolist() == [CLASS_TO_INDEX["building"], CLASS_TO_INDEX["road"]]
    assert b.num_points[0].tolist() == [5.0, 3.0]


def test_random_sampling_uses_real_points(cell):
    rng = np.random.default_rng(0)
    b = cells_to_batch([cell, cell], max_objects=3, num_points=6, rng=rng)
    big_points = {tuple(np.round(p, 5)) for p in np.asarray(cell.objects[1].xyz, dtype=np.float32)}
    for k in range(6):
        assert tuple(np.round(b.xyz[0, 1, k].numpy(), 5)) in big_points
    assert not torch.equal(b.xyz[0], b.xyz[1])  # a fresh draw per cell


def test_flips_mirror_points_and_centres(cell):
    plain = cells_to_batch([cell], max_objects=4, num_points=4)
    fx, fy, fxy, none = (cells_to_batch([cell], max_objects=4, num_points=4, flip=[f]) for f in ("x", "y", "xy", None))
    real = plain.mask[0]
    assert torch.allclose(fx.xyz[0, real, :, 0], 1 - plain.xyz[0, real, :, 0])
    assert torch.equal(fx.xyz[0, real, :, 1:], plain.xyz[0, real, :, 1:])
    assert torch.allclose(fx.center[0, real, 0], 1 - plain.center[0, real, 0])
    assert torch.allclose(fy.center[0, real, 1], 1 - plain.center[0, real, 1])
    assert torch.allclose(fy.xyz[0, real, :, 1], 1 - plain.xyz[0, real, :, 1])
    assert torch.allclose(fxy.center[0, real, :2], 1 - plain.center[0, real, :2])
    assert torch.equal(fx.rgb, plain.rgb) and torch.equal(fx.color, plain.color)
    assert torch.equal(none.xyz, plain.xyz)
    assert fx.xyz[0, ~real].abs().sum() == 0  # padding stays zero
    both = cells_to_batch([cell, cell], max_objects=4, num_points=4, flip=["x", None])
    assert torch.equal(both.xyz[0], fx.xyz[0]) and torch.equal(both.xyz[1], plain.xyz[0])


def test_bad_inputs_raise(cell):
    with pytest.raises(ValueError, match="flip"):
        cells_to_batch([cell], flip=["z"])
    with pytest.raises(ValueError, match="entries"):
        cells_to_batch([cell], flip=["x", "y"])
    bad = Cell(id="0003_00008", scene_name="0003", objects=[obj(0, "spaceship", [[0.1, 0.1, 0.1]])],
               cell_size=30.0, bbox_w=np.zeros(6))
    with pytest.raises(ValueError, match="unknown class"):
        cells_to_batch([bad])
    empty = Cell(id="0003_00009", scene_name="0003", objects=[obj(0, "pole", np.zeros((0, 3)))],
                 cell_size=30.0, bbox_w=np.zeros(6))
    with pytest.raises(ValueError, match="N>0"):
        cells_to_batch([empty])
    with pytest.raises(ValueError, match="at least one cell"):
        cells_to_batch([])


def test_pad_objects_in_the_cell_are_skipped(cell):
    cell.objects.insert(1, obj(-1, "pad", [[0.0, 0.0, 0.0]]))
    b = cells_to_batch([cell], max_objects=4, num_points=2)
    assert b.mask[0].tolist() == [True, True, True, False]
    assert PAD_INDEX not in b.class_idx[0, :3].tolist()
