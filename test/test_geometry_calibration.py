"""Geometric hint binding, retrieval calibration, the mixture estimate and the metrics that judge
them (ECE, AUROC, the bag-of-objects baseline): pure logic on tiny hand-made cells, then the
Localizer on the small synthetic city."""
import math

import numpy as np
import pytest
import torch

from spatialoc_ros.data.kitti360pose import Cell, Object3d, direction_of
from spatialoc_ros.evaluation import metrics
from spatialoc_ros.evaluation.baseline import BagOfObjects
from spatialoc_ros.language import Hint
from spatialoc_ros.models import geometry
from spatialoc_ros.training import calibrate


def _obj(i, label, centre_xy, rgb=(0.53, 0.54, 0.49), n=40, half=0.02, z=0.1):
    rng = np.random.default_rng(i)
    xy = np.asarray(centre_xy) + rng.uniform(-half, half, size=(n, 2))
    xyz = np.concatenate([xy, np.full((n, 1), z)], axis=1)
    return Object3d(id=i, instance_id=i, xyz=xyz, rgb=np.tile(rgb, (n, 1)), label=label)


def _cell(cid, objects):
    return Cell(id=cid, scene_name="2013_05_28_drive_0003_sync", objects=objects, cell_size=30.0,
                bbox_w=np.array([0.0, 0.0, 0.0, 30.0, 30.0, 10.0]))


GRAY = (0.53, 0.54, 0.49)  # nearest colour centre: gray
BLACK = (0.1, 0.1, 0.1)


def test_direction_rule_matches_the_data_set():
    rng = np.random.default_rng(0)
    offsets = rng.uniform(-0.3, 0.3, size=(500, 2))
    offsets[:50] *= 0.1  # some on-top
    offsets[50:60, 1] = offsets[50:60, 0]  # exact ties go north/south
    got = geometry.direction_classes(offsets)
    want = [direction_of(np.zeros(2), o) for o in offsets]
    assert [geometry.DIRECTIONS[g] for g in got] == want


def test_bit_packing_round_trip():
    rng = np.random.default_rng(1)
    flags = rng.random((3, 5, 130)) < 0.4
    words = torch.from_numpy(geometry._pack_bits(flags))
    assert words.shape == (3, 5, 3) and bool((words >= 0).all())
    assert torch.equal(geometry._unpack_bits(words, 130), torch.from_numpy(flags))


def test_binding_reads_directions_colours_and_classes():
    # a gray building east of the centre, a black pole north of it
    a = _cell("0003_00000", [_obj(0, "building", (0.8, 0.5), GRAY), _obj(1, "pole", (0.5, 0.8), BLACK),
                             _obj(2, "road", (0.5, 0.5), GRAY, half=0.3)])
    # the same objects, mirrored: building west, pole south
    b = _cell("0003_00001", [_obj(3, "building", (0.2, 0.5), GRAY), _obj(4, "pole", (0.5, 0.2), BLACK),
                             _obj(5, "road", (0.5, 0.5), GRAY, half=0.3)])
    rel = geometry.cell_relations([a, b])
    hints = [Hint("west", "gray", "building"), Hint("south", "black", "pole"), Hint("on-top", "gray", "road")]
    s = geometry.binding_scores(hints, rel)
    assert s[0] > s[1]
    flipped = [Hint("east", "gray", "building"), Hint("north", "black", "pole"), Hint("on-top", "gray", "road")]
    s_flip = geometry.binding_scores(flipped, rel)
    assert s_flip[1] > s_flip[0]
    # the best cell explains every hint somewhere: the soft maximum is close to 1
    assert float(s[0]) > 1 - math.log(geometry.GRID_STEPS ** 2) / geometry.SHARPNESS
    # a wrong colour or class is not satisfied; no colour given accepts any colour
    assert geometry.binding_scores([Hint("west", "black", "building")] * 2, rel)[0] < s[0]
    assert geometry.binding_scores([Hint("west", "gray", "pole")] * 2, rel)[0] < s[0]
    sat_any = geometry.satisfied_hints([Hint("west", None, "building")], rel)
    sat_gray = geometry.satisfied_hints([Hint("west", "gray", "building")], rel)
    assert torch.equal(sat_any, sat_gray) and bool(sat_any[0].any()) and not bool(sat_any[1].any())


def test_binding_refuses_no_hints():
    rel = geometry.cell_relations([_cell("0003_00000", [_obj(0, "building", (0.8, 0.5))])])
    with pytest.raises(ValueError):
        geometry.binding_scores([], rel)


def test_temperature_fit_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3000, 20)) * 2.0
    t_true = 0.5
    p = np.exp(scores / t_true)
    p /= p.sum(axis=1, keepdims=True)
    true = np.array([rng.choice(20, p=row) for row in p])
    t = calibrate.fit_temperature(scores, true)
    assert abs(t - t_true) / t_true < 0.1


def test_fit_calibration_uses_an_informative_geometric_level():
    rng = np.random.default_rng(1)
    q, n = 400, 30
    true = rng.integers(0, n, size=q)
    learned = rng.normal(size=(q, n))
    geo = rng.random((q, n)) * 0.5
    geo[np.arange(q), true] = 1.0  # the geometry knows
    res = calibrate.fit_calibration(learned, geo, true)
    assert res["relation_weight"] > 0 and res["val_recall@1"] > res["val_recall@1_learned_only"]
    res0 = calibrate.fit_calibration(learned, rng.random((q, n)), true)  # geometry that knows nothing
    assert res0["val_recall@1"] >= res0["val_recall@1_learned_only"]
    with pytest.raises(ValueError):
        calibrate.fit_calibration(learned, geo[:, :5], true)


def test_mixture_scales_fit_a_known_spread():
    """Truths drawn near one of two hypotheses: the exact moments are miscalibrated; the fitted
    (a, b) bring the 1/2-sigma coverage back to a calibrated Gaussian's."""
    rng = np.random.default_rng(3)
    n = 3000
    within = np.tile(np.eye(2), (n, 1, 1))
    sep = rng.uniform(0, 10, n)
    spread = np.zeros((n, 2, 2))
    spread[:, 0, 0] = (sep / 2) ** 2  # two equal components at -sep/2 and +sep/2 on x
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    offsets = rng.normal(size=(n, 2))
    offsets[:, 0] += side * sep / 2
    exact = calibrate.mixture_d2(offsets, within, spread, 1.0, 1.0)
    assert abs(np.mean(exact <= 1) - 0.393) > 0.05  # the exact moments miss
    a, b = calibrate.fit_mixture_scales(offsets, within, spread, within_grid=calibrate.SCALE_GRID)
    assert calibrate.fit_mixture_scales(offsets, within, spread)[0] == 1.0  # the default keeps a = 1
    d2 = calibrate.mixture_d2(offsets, within, spread, a, b)
    assert abs(np.mean(d2 <= 1) - 0.393) < 0.02 and abs(np.mean(d2 <= 4) - 0.865) < 0.02
    offsets[:10] = np.nan  # answers in another scene are never covered
    assert np.all(np.isinf(calibrate.mixture_d2(offsets, within, spread, a, b)[:10]))


def test_moment_match_covers_the_spread_of_the_components():
    from spatialoc_ros.inference import moment_match

    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    covs = np.stack([np.eye(2), np.eye(2)])
    mean, cov = moment_match(np.array([1.0, 1.0]), means, covs)
    np.testing.assert_allclose(mean, [5.0, 0.0])
    np.testing.assert_allclose(cov, [[26.0, 0.0], [0.0, 1.0]])
    mean, cov = moment_match(np.array([1.0, 0.0]), means, covs)
    np.testing.assert_allclose(mean, [0.0, 0.0])
    np.testing.assert_allclose(cov, np.eye(2))
    _, cov = moment_match(np.array([1.0, 1.0]), means, covs, within_scale=0.5, spread_scale=0.1)
    np.testing.assert_allclose(cov, [[0.5 + 2.5, 0.0], [0.0, 0.5]])
    for bad in (np.array([0.0, 0.0]), np.array([1.0, np.nan]), np.array([-1.0, 2.0])):
        with pytest.raises(ValueError):
            moment_match(bad, means, covs)


def test_reliability_and_auroc():
    rng = np.random.default_rng(2)
    conf = rng.random(20000)
    right = rng.random(20000) < conf  # calibrated by construction
    rel = metrics.reliability(conf, right)
    assert rel["ece"] < 0.02 and len(rel["bins"]) == metrics.CONFIDENCE_BINS
    assert metrics.reliability(np.full(1000, 0.9), rng.random(1000) < 0.5)["ece"] > 0.35
    assert metrics.auroc(conf, right) > 0.8
    assert metrics.auroc(np.full(100, 0.3), rng.random(100) < 0.5) == pytest.approx(0.5)
    assert metrics.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert math.isnan(metrics.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError):
        metrics.reliability(np.array([1.5]), np.array([1]))


def test_bag_of_objects_counts_classes_and_colours_not_positions():
    a = _cell("0003_00000", [_obj(0, "building", (0.8, 0.5), GRAY), _obj(1, "pole", (0.5, 0.8), BLACK)])
    b = _cell("0003_00001", [_obj(2, "building", (0.2, 0.5), BLACK), _obj(3, "vegetation", (0.5, 0.2), GRAY)])
    bag = BagOfObjects([a, b])
    assert bag.rank([[Hint("north", "gray", "building"), Hint("east", "black", "pole")]], 2)[0].tolist() == [0, 1]
    assert bag.rank([[Hint("north", "black", "building"), Hint("east", None, "vegetation")]], 2)[0].tolist() == [1, 0]
    # positions do not matter: mirrored directions give the same scores
    np.testing.assert_allclose(bag.scores([Hint("north", "gray", "building")]), bag.scores([Hint("south", "gray", "building")]))


@pytest.fixture(scope="module")
def calibrated(small_city, tmp_path_factory):
    """Tiny random checkpoints, the coarse one calibrated on the small city's val split."""
    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.inference import Localizer
    from test_inference import write_tiny_checkpoints

    folder = tmp_path_factory.mktemp("calib")
    coarse, fine = write_tiny_checkpoints(folder, sigma_scale=1.0)
    loc = Localizer.from_checkpoints(coarse, fine, device="cpu")
    result = calibrate.calibrate_localizer(loc, load_split(small_city, "val"), progress=False)
    out = str(folder / "coarse_calibrated.pth")
    calibrate.store_calibration(coarse, result, out)
    return out, fine, result


def test_calibration_is_stored_and_used(calibrated, small_city):
    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer

    coarse, fine, result = calibrated
    # random learned levels know nothing: the geometric level must take over
    assert result["relation_weight"] > 0 and result["val_recall@1"] > result["val_recall@1_learned_only"]
    loc = Localizer.from_checkpoints(coarse, fine, device="cpu")
    assert loc.relation_weight == result["relation_weight"]
    assert loc.temperature == pytest.approx(result["temperature"])
    # per hint count: one temperature and two mixture scales for each calibrated count
    from spatialoc_ros.models.checkpoint import CALIBRATED_HINT_COUNTS

    for key in ("temperature_by_hints", "mixture_within_scale_by_hints", "mixture_spread_scale_by_hints"):
        assert len(loc.by_hints[key]) == len(CALIBRATED_HINT_COUNTS) == len(result[key])
    assert loc.calibrated("temperature", 3) == loc.by_hints["temperature_by_hints"][1]
    assert loc.calibrated("temperature", 40) == loc.by_hints["temperature_by_hints"][-1]
    assert loc.calibrated("temperature", 1) == loc.by_hints["temperature_by_hints"][0]
    data = load_split(small_city, "test")
    loc.set_map(data.cells, progress=False)
    texts = [query_text(p) for p in data.poses[:20]]
    learned, geo = loc.score_levels(texts)
    shares = loc.selection_shares(texts)
    assert loc.selection_weight == result["selection_weight"]
    hyps = loc.localize_many(texts, top_k=5)
    from spatialoc_ros.inference import SELECTION_SHORTLIST

    for row, l_row, g_row, s_row in zip(hyps, learned, geo, shares):
        scores = l_row + loc.relation_weight * g_row
        # the selection rule on the short list of the best cells by the other levels
        top = np.argsort(-scores, kind="stable")[:SELECTION_SHORTLIST]
        scores[top] = calibrate.combined(l_row[top][None], g_row[top][None], loc.relation_weight,
                                         s_row[top][None], loc.selection_weight)[0]
        assert row[0].cell_id == data.cells[int(np.argmax(scores))].id
        assert row[0].num_hints == 6
        p = np.exp((scores - scores.max()) / loc.calibrated("temperature", 6))
        p /= p.sum()
        np.testing.assert_allclose([h.probability for h in row], np.sort(p)[::-1][:5], rtol=1e-4, atol=1e-6)


def test_estimate_mixture_and_top(calibrated, small_city):
    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer

    coarse, fine, result = calibrated
    loc = Localizer.from_checkpoints(coarse, fine, device="cpu")
    data = load_split(small_city, "test")
    loc.set_map(data.cells, progress=False)
    text = query_text(data.poses[0])
    est = loc.estimate(text, top_k=5)
    assert est.mean_xy.shape == (2,) and est.cov_xy.shape == (2, 2)
    assert 0 < est.confidence <= 1 and est.confidence == est.hypotheses[0].probability
    assert len(est.hypotheses) == 5 and all(0 <= h.probability <= 1 for h in est.hypotheses)
    assert (loc.mixture_within_scale, loc.mixture_spread_scale) == (result["mixture_within_scale"], result["mixture_spread_scale"])
    top = loc.estimate(text, top_k=5, covariance="top")
    np.testing.assert_allclose(top.cov_xy, est.hypotheses[0].cov_xy)
    # the mixture covers the spread of the hypotheses: never tighter than its weighted components
    same = [h for h in est.hypotheses if h.scene == est.scene]
    w = np.array([h.probability for h in same]) / sum(h.probability for h in same)
    inner = np.einsum("k,kij->ij", w, np.stack([h.cov_xy for h in same]))
    assert np.linalg.eigvalsh(est.cov_xy - loc.mixture_within_scale * inner).min() > -1e-6
    with pytest.raises(ValueError, match="covariance"):
        loc.estimate(text, covariance="widest")


def test_calibration_values_out_of_range_are_refused(calibrated, tmp_path):
    from spatialoc_ros.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    coarse, _, _ = calibrated
    model, cfg, extra = load_checkpoint(coarse, "coarse", torch.device("cpu"))
    for key, value in (("temperature", 0.0), ("temperature", float("nan")), ("relation_weight", -1.0),
                       ("temperature_by_hints", [1.0, 1.0]), ("temperature_by_hints", [1.0, 1.0, 0.0, 1.0, 1.0]),
                       ("mixture_spread_scale_by_hints", [1.0, 1.0, 1.0, 1.0, float("inf")])):
        bad = str(tmp_path / f"{key}.pth")
        save_checkpoint(bad, model, cfg, "coarse", {**extra, key: value})
        with pytest.raises(CheckpointError, match=key):
            load_checkpoint(bad, "coarse", torch.device("cpu"))


def test_refinement_moves_the_gaussian_to_where_the_hints_hold():
    grid = geometry.candidate_grid()
    share = np.zeros((2, len(grid)))
    target = np.argmin(np.linalg.norm(grid - [0.6, 0.55], axis=1))
    share[:, target] = 1.0  # the hints hold at one grid point only
    mean = np.array([[0.5, 0.5], [0.5, 0.5]])
    cov = np.stack([np.eye(2) * 0.05 ** 2, np.eye(2) * 0.05 ** 2])
    m, c = geometry.refine_in_cell(share, grid, mean, cov, sharpness=16.0)
    assert np.linalg.norm(m[0] - grid[target]) < np.linalg.norm(mean[0] - grid[target]) / 2
    assert np.all(np.linalg.eigvalsh(c[0]) > 0) and np.trace(c[0]) < np.trace(cov[0])
    m0, c0 = geometry.refine_in_cell(share, grid, mean, cov, sharpness=0.0)  # no likelihood: prior on the grid
    np.testing.assert_allclose(m0[0], [0.5, 0.5], atol=1e-6)
    bad = cov.copy()
    bad[1, 0, 0] = np.nan  # a non-finite row is returned unchanged
    mb, cb = geometry.refine_in_cell(share, grid, mean, bad)
    assert np.isnan(cb[1, 0, 0]) and np.allclose(mb[1], mean[1])


def test_relations_match_the_rule_object_by_object(small_city):
    """cell_relations against the data set's rule applied to each closest point directly."""
    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.models.cell_tensors import _kept_objects

    cells = load_split(small_city, "val").cells[:8]
    rel = geometry.cell_relations(cells)
    grid = geometry.candidate_grid()
    for n, cell in enumerate(cells):
        objs = _kept_objects([o for o in cell.objects if o.label != "pad"], 28)
        for o, obj in enumerate(objs):
            pts = geometry._object_points(obj.xyz, geometry.MAX_POINTS)
            want = []
            for g in grid:
                cp = pts[np.argmin(((pts - g) ** 2).sum(axis=1))]
                want.append(geometry.DIRECTIONS.index(direction_of(cp, g)))
            got = geometry._unpack_bits(rel.placed[n, o], len(grid))  # (5, G)
            assert got.sum(dim=0).eq(1).all()  # one direction per position
            assert got.int().argmax(dim=0).tolist() == want
        assert int(rel.mask[n].sum()) == len(objs)


def test_embedding_cache_round_trip_and_rebuild(calibrated, small_city, tmp_path, caplog):
    import logging

    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer
    from spatialoc_ros.models import embedding_cache

    coarse, fine, _ = calibrated
    data = load_split(small_city, "test")
    texts = [query_text(p) for p in data.poses[:6]]
    cache = tmp_path / "cache"
    first = Localizer.from_checkpoints(coarse, fine, device="cpu")
    first.set_map(data.cells, progress=False, cache_dir=str(cache))
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 1
    want = first.localize_many(texts, top_k=3)
    second = Localizer.from_checkpoints(coarse, fine, device="cpu")
    with caplog.at_level(logging.INFO, logger="spatialoc_ros.inference"):
        second.set_map(data.cells, progress=False, cache_dir=str(cache))
    assert "loaded from the cache" in caplog.text
    got = second.localize_many(texts, top_k=3)
    for name in ("global_", "objects", "mask", "relations", "cell", "start"):  # the same tensors back
        assert torch.equal(getattr(first._index, name), getattr(second._index, name)), name
    with np.load(files[0], allow_pickle=False) as f:
        assert f["index.objects@packed"].shape == (int(first._index.mask.sum()), first._index.objects.shape[-1])
    for a, b in zip(want, got):
        assert [h.cell_id for h in a] == [h.cell_id for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-6)
        np.testing.assert_allclose(np.stack([h.mean_xy for h in a]), np.stack([h.mean_xy for h in b]))
    # another map (one cell fewer) selects another file; the first is left alone
    Localizer.from_checkpoints(coarse, fine, device="cpu").set_map(data.cells[1:], progress=False, cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 2
    # a damaged file is reported and rebuilt, never half-used
    files[0].write_bytes(b"not an npz")
    caplog.clear()
    third = Localizer.from_checkpoints(coarse, fine, device="cpu")
    with caplog.at_level(logging.WARNING):
        third.set_map(data.cells, progress=False, cache_dir=str(cache))
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert [h.cell_id for h in third.localize(texts[0], top_k=3)] == [h.cell_id for h in want[0]]
    assert embedding_cache.load(str(files[0]), [c.id for c in data.cells], {"global_": ("f", None)}, None) is not None
    # the cache file holds plain arrays only
    with np.load(files[0], allow_pickle=False) as f:
        assert "ids" in f.files and all(f[k].dtype != object for k in f.files)


def test_hint_transforms():
    from spatialoc_ros.language.transforms import flipped, hint_subsets

    hints = [Hint("north", "gray", "building"), Hint("east", None, "pole"), Hint("on-top", "gray", "road")]
    assert [h.direction for h in flipped(hints)] == ["south", "west", "on-top"]
    assert flipped(flipped(hints)) == hints
    subs = hint_subsets([hints, hints[:2]], 2, seed=0)
    assert len(subs[0]) == 2 and subs[1] == hints[:2]
    assert all(h in hints for h in subs[0]) and subs[0] == sorted(subs[0], key=hints.index)  # order kept
    assert hint_subsets([hints, hints[:2]], 2, seed=0) == subs  # seeded


def test_relations_blocks_and_point_subsets(monkeypatch):
    """The block-wise vectorised relations do not depend on the block size, and an object with
    more than max_points points uses the evenly spaced subset of :func:`geometry._object_points`."""
    rng = np.random.default_rng(0)
    objects = [_obj(i, "pole", tuple(rng.uniform(0.2, 0.8, 2)), n=int(n), half=0.08)
               for i, n in enumerate((1, 3, 40, 257, 600))]
    cells = [_cell("0003_00001", objects), _cell("0003_00002", objects[::-1])]
    base = geometry.cell_relations(cells, max_points=16)
    monkeypatch.setattr(geometry, "BLOCK_ELEMENTS", 50)  # one object per block
    small = geometry.cell_relations(cells, max_points=16)
    assert torch.equal(base.placed, small.placed)
    grid = geometry.candidate_grid()
    for n, cell in enumerate(cells):
        for o, obj in enumerate(cell.objects):
            pts = geometry._object_points(obj.xyz, 16)
            want = [geometry.DIRECTIONS.index(direction_of(pts[np.argmin(((pts - g) ** 2).sum(axis=1))], g))
                    for g in grid]
            assert geometry._unpack_bits(base.placed[n, o], len(grid)).int().argmax(dim=0).tolist() == want


def _nearest_keys_by_hand(cell, grid):
    """(G, NEAREST) hint keys of the NEAREST kept objects at each grid position, computed
    object by object from the data set's rule (-1 past the cell's objects)."""
    from spatialoc_ros.models.cell_tensors import _kept_objects

    objs = _kept_objects([o for o in cell.objects if o.label != "pad"], 28)
    out = np.full((len(grid), geometry.NEAREST), -1)
    for g, pos in enumerate(grid):
        found = []
        for o, obj in enumerate(objs):
            pts = geometry._object_points(obj.xyz, geometry.MAX_POINTS)
            d2 = ((pts - pos) ** 2).sum(axis=1)
            cp = pts[np.argmin(d2)]
            key = geometry.hint_key(geometry.CLASS_TO_INDEX[obj.label],
                                    int(geometry.colour_index(np.asarray(obj.rgb).mean(axis=0))),
                                    geometry.DIRECTIONS.index(direction_of(cp, pos)))
            found.append((float(np.float32(d2.min())), o, key))
        found.sort()
        for k, (_, _, key) in enumerate(found[:geometry.NEAREST]):
            out[g, k] = key
    return out


def test_nearest_objects_match_the_rule_object_by_object(small_city):
    from spatialoc_ros.data.loading import load_split

    cells = load_split(small_city, "val").cells[:4]
    rel = geometry.cell_relations(cells)
    grid = geometry.candidate_grid()
    assert rel.nearest.shape == (4, len(grid), geometry.NEAREST) and rel.nearest.dtype == torch.int16
    for n, cell in enumerate(cells):
        want = _nearest_keys_by_hand(cell, grid)
        got = rel.nearest[n].numpy()
        # the same set of keys at every position (the order of exact distance ties may differ)
        assert (np.sort(got, axis=1) == np.sort(want, axis=1)).mean() > 0.99


def test_selection_matches_only_where_the_hints_are_the_nearest_objects():
    # two buildings east of the centre: a gray one close by and a black one far away
    cell = _cell("0003_00000", [_obj(0, "building", (0.6, 0.5), GRAY), _obj(1, "building", (0.95, 0.5), BLACK),
                                _obj(2, "pole", (0.5, 0.6), BLACK), _obj(3, "pole", (0.4, 0.5), GRAY),
                                _obj(4, "lamp", (0.5, 0.4), GRAY), _obj(5, "box", (0.45, 0.45), GRAY),
                                _obj(6, "fence", (0.55, 0.55), BLACK), _obj(7, "stop", (0.05, 0.05), BLACK)])
    rel = geometry.cell_relations([cell])
    grid = geometry.candidate_grid()
    centre = int(np.argmin(np.linalg.norm(grid - 0.5, axis=1)))
    near = [Hint("west", "gray", "building"), Hint("south", "black", "pole"), Hint("east", "gray", "pole")]
    m = geometry.selection_matches(near, rel)
    assert m.shape == (1, len(grid)) and bool(m[0, centre])
    # every matched position satisfies every hint
    sat = geometry.satisfied_hints(near, rel).all(dim=1)
    assert bool((sat | ~m).all())
    # the far black building satisfies its hint at the centre but is not among the six nearest
    far = [Hint("west", "black", "building"), Hint("south", "black", "pole")]
    assert bool(geometry.satisfied_hints(far, rel)[0, :, centre].all())
    assert not bool(geometry.selection_matches(far, rel)[0, centre])
    # no colour: any colour of the class; two hints need two distinct objects
    assert bool(geometry.selection_matches([Hint("west", None, "building")], rel)[0, centre])
    assert not bool(geometry.selection_matches([Hint("west", "gray", "building")] * 2, rel)[0, centre])
    assert not bool(geometry.selection_matches([Hint("west", "gray", "building"), Hint("west", None, "building")],
                                               rel)[0, centre])
    assert bool(geometry.selection_matches([Hint("east", "gray", "pole"), Hint("east", None, "pole")] [:1] +
                                           [Hint("south", None, "pole")], rel)[0, centre])
    with pytest.raises(ValueError):
        geometry.selection_matches([], rel)


def test_selection_term_weights_matched_positions():
    geo = torch.tensor([0.9, 0.9, 0.5], dtype=torch.float64)
    share = torch.tensor([0.0, 0.2, 0.2], dtype=torch.float64)
    assert torch.equal(geometry.with_selection(geo, share, 0.0), geo)
    got = geometry.with_selection(geo, share, 10.0, sharpness=8.0)
    want = 1 + torch.log(torch.exp(8.0 * (geo - 1)) + 10.0 * share) / 8.0
    torch.testing.assert_close(got, want)
    assert got[0] == geo[0] and got[1] > geo[1] and got[2] > geo[2]
    with pytest.raises(ValueError):
        geometry.with_selection(geo, share, -1.0)
    # in the refinement, matched positions pull the Gaussian towards them
    grid = geometry.candidate_grid()
    share_g = np.ones((1, len(grid)))
    target = np.argmin(np.linalg.norm(grid - [0.6, 0.55], axis=1))
    match = np.zeros((1, len(grid)), dtype=bool)
    match[0, target] = True
    mean, cov = np.array([[0.5, 0.5]]), np.eye(2)[None] * 0.05 ** 2
    m0, _ = geometry.refine_in_cell(share_g, grid, mean, cov, 16.0)
    m1, _ = geometry.refine_in_cell(share_g, grid, mean, cov, 16.0, match, 100.0)
    assert np.linalg.norm(m1[0] - grid[target]) < 0.8 * np.linalg.norm(m0[0] - grid[target])
    m2, _ = geometry.refine_in_cell(share_g, grid, mean, cov, 16.0, match, 0.0)  # weight 0: no effect
    np.testing.assert_allclose(m2, m0)


def test_fit_calibration_picks_an_informative_selection_rule():
    rng = np.random.default_rng(2)
    q, n = 400, 30
    true = rng.integers(0, n, size=q)
    learned = rng.normal(size=(q, n))
    geo = np.full((q, n), 0.9)
    shares = rng.random((q, n)) * 0.02
    shares[np.arange(q), true] = 0.3  # the selection rule knows
    res = calibrate.fit_calibration(learned, geo, true, shares=shares)
    assert res["selection_weight"] > 0 and res["relation_weight"] > 0
    assert res["val_recall@1"] > res["val_recall@1_learned_only"] + 0.3
    off = calibrate.fit_calibration(learned, geo, true)  # without shares the rule is off
    assert off["selection_weight"] == 0.0
