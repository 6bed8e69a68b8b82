"""The validation boundaries, as pure logic: map cells (validate_cells and the loaders),
checkpoints (read_checkpoint), non-finite model outputs (Localizer), and the shared cell cutter
(generator and user clouds cut the same world objects into the same cells, with bounded work)."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

from spatialoc_ros.data.kitti360pose import Cell, Object3d
from spatialoc_ros.data.validation import validate_cells

def _obj(label="building", n=20, seed=0, **over):
    rng = np.random.default_rng(seed)
    fields = dict(id=0, instance_id=7, xyz=rng.uniform(0, 1, (n, 3)).astype(np.float32),
                  rgb=rng.uniform(0, 1, (n, 3)).astype(np.float32), label=label)
    fields.update(over)
    return Object3d(**fields)


def _cell(cid="0003_00001", **over):
    fields = dict(id=cid, scene_name="0003", objects=[_obj(), _obj("pole", seed=1)], cell_size=30.0,
                  bbox_w=np.array([0.0, 0.0, 0.0, 30.0, 30.0, 30.0]))
    fields.update(over)
    return Cell(**fields)


BAD_CELLS = {
    "nan point": lambda: _cell(objects=[_obj(xyz=np.array([[0.1, 0.2, np.nan]] * 3, dtype=np.float32),
                                             rgb=np.zeros((3, 3), np.float32))]),
    "inf rgb": lambda: _cell(objects=[_obj(rgb=np.full((20, 3), np.inf, np.float32))]),
    "nan bbox": lambda: _cell(bbox_w=np.array([0.0, np.nan, 0.0, 30.0, 30.0, 30.0])),
    "short bbox": lambda: _cell(bbox_w=np.array([0.0, 0.0, 30.0])),
    "flat bbox": lambda: _cell(bbox_w=np.array([0.0, 0.0, 0.0, 0.0, 30.0, 30.0])),
    "cell_size 0": lambda: _cell(cell_size=0.0),
    "cell_size nan": lambda: _cell(cell_size=float("nan")),
    "cell_size str": lambda: _cell(cell_size="30"),
    "empty label": lambda: _cell(objects=[_obj(label="")]),
    "unknown label": lambda: _cell(objects=[_obj(label="spaceship")]),
    "pad label": lambda: _cell(objects=[_obj(label="pad")]),
    "no points": lambda: _cell(objects=[_obj(xyz=np.zeros((0, 3), np.float32), rgb=np.zeros((0, 3), np.float32))]),
    "rgb count": lambda: _cell(objects=[_obj(rgb=np.zeros((3, 3), np.float32))]),
    "objects=7": lambda: _cell(objects=7),
    "no objects": lambda: _cell(objects=[]),
    "object is a dict": lambda: _cell(objects=[{"label": "building"}]),
    "list as id": lambda: _cell(cid=["0003", 1]),
    "empty id": lambda: _cell(cid=" "),
    "far point": lambda: _cell(objects=[_obj(xyz=np.full((5, 3), 1e12, np.float32), rgb=np.zeros((5, 3), np.float32))]),
    "string xyz": lambda: _cell(objects=[_obj(xyz=np.array([["a", "b", "c"]]), rgb=np.zeros((1, 3)))]),
    "not a cell": lambda: {"id": "0003_00009"},
}


@pytest.mark.parametrize("case", sorted(BAD_CELLS))
def test_a_bad_cell_is_dropped_with_a_reason_and_the_others_kept(case):
    good_a, good_b = _cell("0003_00001"), _cell("0003_00002")
    lines = []
    result = validate_cells([good_a, BAD_CELLS[case](), good_b], log=lines.append)
    assert result.good == [good_a, good_b]
    assert len(result.dropped) == 1 and result.dropped[0][1]
    assert len(lines) == 1 and "dropped 1 of 3 cells" in lines[0]


def test_duplicate_ids_keep_the_first():
    first, second = _cell("0003_00001"), _cell("0003_00001")
    result = validate_cells([first, second])
    assert result.good == [first] and "duplicate" in result.dropped[0][1]


def test_loader_drops_bad_cells_and_their_poses(small_city, tmp_path):
    """A crafted pickle of allowed classes with odd contents: the scene still loads, without the
    bad cells and the poses that named them."""
    import shutil

    from spatialoc_ros.data.loading import DataFormatError, load_scene
    from spatialoc_ros.data.safe_pickle import safe_load_pickle

    scene = "2013_05_28_drive_0003_sync"
    base = tmp_path / "city"
    shutil.copytree(small_city, base)
    path = base / "cells" / f"{scene}.pkl"
    cells = safe_load_pickle(str(path))
    n = len(cells)
    victim = cells[0].id
    cells[0].objects = 7
    cells[1].id = ["a", "list"]
    cells[2].bbox_w = np.array([np.nan] * 6)
    with open(path, "wb") as f:
        pickle.dump(cells, f, protocol=4)
    lines = []
    data = load_scene(str(base), scene, log=lines.append)
    assert len(data.cells) == n - 3
    assert victim not in data.cells_dict
    assert all(p.cell_id in data.cells_dict for p in data.poses)
    assert any("dropped 3 of" in line for line in lines)
    with open(path, "wb") as f:  # nothing usable at all: refused
        pickle.dump([cells[0]], f, protocol=4)
    with pytest.raises(DataFormatError, match="no usable cell"):
        load_scene(str(base), scene, log=lines.append)


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from ros_helpers import tiny_checkpoints

    return tiny_checkpoints(tmp_path_factory.mktemp("ckpt_hard"))


def _edited(src, dst, edit):
    payload = torch.load(src, map_location="cpu", weights_only=True)
    edit(payload)
    torch.save(payload, dst)
    return str(dst)


def _nan_first_weight(p):
    name = next(k for k, v in p["model"].items() if v.is_floating_point())
    p["model"][name] = torch.full_like(p["model"][name], float("nan"))


CHECKPOINT_CASES = {
    "random bytes": (lambda src, dst: dst.write_bytes(os.urandom(4096)) and str(dst), "cannot be read"),
    "truncated": (lambda src, dst: dst.write_bytes(open(src, "rb").read()[:3000]) and str(dst), "cannot be read"),
    "empty file": (lambda src, dst: dst.write_bytes(b"") or str(dst), "cannot be read"),
    "config None": (lambda s, d: _edited(s, d, lambda p: p.update(config=None)), "'config' is a NoneType"),
    "extra None": (lambda s, d: _edited(s, d, lambda p: p.update(extra=None)), "'extra' is a NoneType"),
    "model list": (lambda s, d: _edited(s, d, lambda p: p.update(model=[1, 2])), "not a state_dict"),
    "nan weights": (lambda s, d: _edited(s, d, _nan_first_weight), "non-finite weights"),
    "sigma 1e-200": (lambda s, d: _edited(s, d, lambda p: p["extra"].update(sigma_scale=1e-200)), "sigma_scale"),
    "sigma nan": (lambda s, d: _edited(s, d, lambda p: p["extra"].update(sigma_scale=float("nan"))), "sigma_scale"),
    "max_tokens 0": (lambda s, d: _edited(s, d, lambda p: p["extra"].update(max_tokens=0)), "max_tokens"),
    "kind list": (lambda s, d: _edited(s, d, lambda p: p.update(kind=["fine"])), "unknown kind"),
    "not a regular file": (lambda s, d: "/dev/zero", "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints_are_one_clear_error(case, tiny_pair, tmp_path):
    from spatialoc_ros.inference import Localizer
    from spatialoc_ros.models.checkpoint import CheckpointError

    make, message = CHECKPOINT_CASES[case]
    bad = make(tiny_pair[1], tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message) as info:
        Localizer.from_checkpoints(tiny_pair[0], bad, device="cpu")
    assert "\n" not in str(info.value)


def test_non_finite_outputs_are_counted_and_never_published(tiny_pair, small_city, caplog):
    """A model that turns non-finite after loading (the boundary refuses such files) gives no
    invented answer: the hypotheses are left out, counted and logged, and the call raises."""
    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer, NonFiniteOutputError

    data = load_split(small_city, "test")
    loc = Localizer.from_checkpoints(*tiny_pair, device="cpu")
    loc.set_map(data.cells, progress=False)
    text = query_text(data.poses[0])
    assert len(loc.localize(text, top_k=3)) == 3
    with torch.no_grad():
        for p in loc.fine.parameters():
            p.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError):
        loc.localize(text, top_k=3)
    assert loc.nonfinite["hypothesis"] == 3
    assert any("not finite" in r.message for r in caplog.records)


def test_a_cell_with_a_non_finite_embedding_is_left_out_of_the_map(tiny_pair, small_city):
    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer

    data = load_split(small_city, "test")
    cells = list(data.cells[:30])
    poisoned = _cell("0003_77777")
    poisoned.objects[0].xyz[0, 0] = np.nan  # bypasses validate_cells on purpose
    loc = Localizer.from_checkpoints(*tiny_pair, device="cpu")
    kept = loc.set_map(cells + [poisoned], progress=False)
    assert kept == 30 and loc.nonfinite["cell_embedding"] == 1
    hyps = loc.localize(query_text(data.poses[0]), top_k=5)
    assert len(hyps) == 5 and all(math.isfinite(h.score) for h in hyps)


# --------------------------------------------------------------------------- the shared cell cutter

def test_generator_and_cloud_path_cut_the_same_world_into_the_same_cells(tmp_path, monkeypatch):
    """The generator's world objects, flattened into a labelled cloud as a user would give it,
    are cut by the cloud path's index into exactly the generator's cells (same boxes)."""
    from spatialoc_ros.data import synthetic
    from spatialoc_ros.data.cloud_cells import make_cloud, world_index
    from spatialoc_ros.data.loading import load_scene

    seen = {}
    real = synthetic.WorldIndex

    def capture(labels, instance_ids, xyz, rgb):
        seen.update(labels=list(labels), instance_ids=list(instance_ids), xyz=list(xyz), rgb=list(rgb))
        return real(labels, instance_ids, xyz, rgb)

    monkeypatch.setattr(synthetic, "WorldIndex", capture)
    scene = "2013_05_28_drive_0003_sync"
    synthetic.generate_city(str(tmp_path), seed=5, scale="small", scenes=[scene], log=None)
    cells = load_scene(str(tmp_path), scene).cells
    n = [len(x) for x in seen["xyz"]]
    cloud = make_cloud(
        np.concatenate(seen["xyz"]), np.concatenate(seen["rgb"]),
        np.repeat(np.array(seen["labels"]), n), np.repeat(np.array(seen["instance_ids"]), n),
    )
    index = world_index(cloud)
    assert len(cells) > 5
    for cell in cells:
        ours = index.crop(np.asarray(cell.bbox_w), cell.cell_size)
        assert [(o.label, o.instance_id) for o in ours] == [(o.label, o.instance_id) for o in cell.objects]
        for a, b in zip(ours, cell.objects):
            np.testing.assert_array_equal(a.xyz, b.xyz)
            np.testing.assert_array_equal(a.rgb, b.rgb)


@pytest.mark.parametrize("far", [1e4, 1e12])
def test_a_far_outlier_costs_nothing(far):
    from ros_helpers import street_cloud

    from spatialoc_ros.data import cloud_cells
    from spatialoc_ros.data.cloud_cells import CellCutConfig, cut_cloud_into_cells, make_cloud

    xyz, rgb, labels, instances = street_cloud()
    cfg = CellCutConfig()
    clean = make_cloud(xyz, rgb, labels, instances)
    base = cut_cloud_into_cells(clean, "street")
    dirty = make_cloud(np.vstack([xyz, [[far, far, 0.0]]]), np.vstack([rgb, [[9, 9, 9]]]),
                       np.append(labels, 11), np.append(instances, 4242))
    lines = []
    cells = cut_cloud_into_cells(dirty, "street", cfg, log=lines.append)
    assert [c.bbox_w.tolist() for c in cells] == [c.bbox_w.tolist() for c in base]
    # bounded work: only grid cells over occupied tiles are visited, not the dense 10 km grid
    kept = cloud_cells.drop_far_outliers(dirty, cfg.max_outlier_distance, log=lambda _m: None)
    visited = len(cloud_cells._candidate_origins(cloud_cells.world_index(kept), cfg))
    visited_clean = len(cloud_cells._candidate_origins(cloud_cells.world_index(clean), cfg))
    assert visited <= visited_clean + 25
    if far > cfg.max_outlier_distance:
        assert len(lines) == 1 and "ignoring 1 of" in lines[0]
    else:
        assert not lines


@pytest.mark.parametrize("size", [1e30, 1e-300, 15.0])
def test_cell_size_must_be_the_bbox_edge(size):
    result = validate_cells([_cell("0003_00001"), _cell("0003_00002", cell_size=size)])
    assert len(result.good) == 1 and "longest edge" in result.dropped[0][1]


def test_colours_outside_0_1_are_refused():
    bright = _cell(objects=[_obj(rgb=np.full((20, 3), 255.0, np.float32))])
    assert "outside [0, 1]" in validate_cells([bright]).dropped[0][1]


def test_a_sparse_wide_cloud_with_huge_cells_is_refused_before_any_work():
    from spatialoc_ros.data.cloud_cells import CellCutConfig, cut_cloud_into_cells, make_cloud

    rng = np.random.default_rng(0)
    xyz = np.c_[rng.uniform(-19000, 19000, (500, 2)), np.zeros(500)]
    cloud = make_cloud(xyz, np.zeros((500, 3), np.uint8), np.full(500, 11), np.arange(500))
    with pytest.raises(ValueError, match="would visit up to"):
        cut_cloud_into_cells(cloud, "s", CellCutConfig(cell_size=1000.0, cell_stride=10.0), log=lambda _m: None)
