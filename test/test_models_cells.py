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


def _reference_batch(cells, max_objects, num_points, rng, flip):
    """cells_to_batch written object by object (the definition the vectorised one must match)."""
    from spatialoc_ros.models.cell_tensors import _kept_objects, _point_indices

    B, O, P = len(cells), max_objects, num_points
    out = {k: np.zeros(s, dtype=np.float32) for k, s in
           (("xyz", (B, O, P, 3)), ("rgb", (B, O, P, 3)), ("color", (B, O, 3)), ("center", (B, O, 3)))}
    for b, c in enumerate(cells):
        for o, ob in enumerate(_kept_objects([x for x in c.objects if x.label != "pad"], O)):
            pts, cols = np.asarray(ob.xyz, dtype=np.float64), np.asarray(ob.rgb, dtype=np.float64)
            idx = _point_indices(len(pts), P, rng)
            sampled, centre = pts[idx].copy(), pts.mean(axis=0)
            for axis, name in ((0, "x"), (1, "y")):
                if flip is not None and flip[b] is not None and name in flip[b]:
                    sampled[:, axis] = 1.0 - sampled[:, axis]
                    centre[axis] = 1.0 - centre[axis]
            out["xyz"][b, o], out["rgb"][b, o] = sampled, cols[idx]
            out["color"][b, o], out["center"][b, o] = cols.mean(axis=0), centre
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("random", [False, True])
def test_vectorised_batch_equals_object_by_object_reference(dtype, random):
    """Many cells of random sizes (some above max_objects, objects of 1..300 points), float32 and
    float64 inputs, flips, deterministic and random sampling: identical to the reference."""
    gen = np.random.default_rng(3)
    labels = sorted(CLASS_TO_INDEX)
    cells = []
    for c in range(40):
        objects = []
        for i in range(int(gen.integers(1, 16))):
            n = int(gen.integers(1, 300))
            xyz = gen.uniform(0, 1, (n, 3)).astype(dtype)
            objects.append(Object3d(i, i, xyz, gen.uniform(0, 1, (n, 3)).astype(dtype), labels[i % len(labels)]))
        cells.append(Cell(f"0003_{c:05d}", "0003", objects, 30.0, np.array([0.0, 0, 0, 30, 30, 5])))
    flips = [[None, "x", "y", "xy"][c % 4] for c in range(40)]
    want = _reference_batch(cells, 10, 24, np.random.default_rng(5) if random else None, flips)
    got = cells_to_batch(cells, 10, 24, np.random.default_rng(5) if random else None, flips)
    for key, value in want.items():
        np.testing.assert_array_equal(getattr(got, key).numpy(), value, err_msg=key)
