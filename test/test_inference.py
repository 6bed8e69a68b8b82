"""The inference API (spatialoc_ros.inference) end to end on a small synthetic city, with tiny
random-initialised checkpoints written in the test."""
import os

import numpy as np
import pytest
import torch

from spatialoc_ros import inference
from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.inference import Hypothesis, Localizer, resolve_device

TINY = dict(num_points=8, max_objects=12, pointnet_dim=16, dropout=0.0)


def write_tiny_checkpoints(folder, sigma_scale: float = 1.5) -> tuple[str, str]:
    """Random-initialised tiny coarse and fine checkpoints (seeded) in ``folder``."""
    from spatialoc_ros.models.builder import build_coarse_model, build_fine_model
    from spatialoc_ros.models.checkpoint import save_checkpoint
    from spatialoc_ros.models.config import CoarseConfig, FineConfig

    torch.manual_seed(0)
    ccfg = CoarseConfig(embed_dim=16, num_hidden_layers=1, num_heads=2, beose_dim=8, bezier_samples=2, **TINY)
    fcfg = FineConfig(embed_dim=16, num_layers=1, num_heads=2, **TINY)
    coarse, fine = str(folder / "coarse.pth"), str(folder / "fine.pth")
    save_checkpoint(coarse, build_coarse_model(ccfg, 384), ccfg, "coarse", {"max_tokens": 24})
    save_checkpoint(fine, build_fine_model(fcfg, 384), fcfg, "fine", {"max_tokens": 24, "sigma_scale": sigma_scale})
    return coarse, fine


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random-initialised tiny coarse and fine checkpoints (seeded)."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def localizer(checkpoints, small_city):
    loc = Localizer.from_checkpoints(*checkpoints, device="cpu")
    loc.set_map(load_split(small_city, "test").cells, progress=False)
    return loc


@pytest.fixture(scope="module")
def test_split(small_city):
    return load_split(small_city, "test")


def _check_hypothesis(h: Hypothesis, cells_by_id: dict) -> None:
    cell = cells_by_id[h.cell_id]
    assert h.scene == cell.scene_name
    assert h.mean_xy.shape == (2,) and h.cov_xy.shape == (2, 2) and h.pos_in_cell.shape == (2,)
    assert np.all(np.isfinite(h.mean_xy)) and np.all(np.isfinite(h.cov_xy))
    np.testing.assert_allclose(h.cov_xy, h.cov_xy.T, atol=1e-12)
    assert np.linalg.eigvalsh(h.cov_xy).min() > 0
    bbox = np.asarray(cell.bbox_w, dtype=np.float64)
    np.testing.assert_allclose(h.bbox_w, bbox)
    np.testing.assert_allclose(h.mean_xy, bbox[0:2] + h.pos_in_cell * cell.cell_size, atol=1e-9)


def test_localize_end_to_end(localizer, test_split):
    cells_by_id = {c.id: c for c in test_split.cells}
    pose = test_split.poses[0]
    hyps = localizer.localize(query_text(pose), top_k=5)
    assert len(hyps) == min(5, len(test_split.cells))
    assert len({h.cell_id for h in hyps}) == len(hyps), "a cell retrieved twice"
    scores = [h.score for h in hyps]
    assert scores == sorted(scores, reverse=True), "hypotheses not best-first"
    for h in hyps:
        _check_hypothesis(h, cells_by_id)
    assert set(localizer.timings) == {"text_ms", "retrieval_ms", "fine_ms"}
    assert all(v >= 0 for v in localizer.timings.values())
    assert localizer.num_cells == len(test_split.cells)
    assert localizer.sigma_scale == 1.5  # read from the fine checkpoint's extra


def test_localize_many_matches_localize(localizer, test_split):
    texts = [query_text(p) for p in test_split.poses[:4]]
    many = localizer.localize_many(texts, top_k=3)
    for text, row in zip(texts, many):
        single = localizer.localize(text, top_k=3)
        assert [h.cell_id for h in single] == [h.cell_id for h in row]
        for a, b in zip(single, row):
            np.testing.assert_allclose(a.mean_xy, b.mean_xy, atol=1e-4)
            np.testing.assert_allclose(a.cov_xy, b.cov_xy, rtol=1e-3, atol=1e-6)


def test_sigma_scale_scales_covariance(checkpoints, test_split):
    text = query_text(test_split.poses[1])
    cells = test_split.cells
    a = Localizer.from_checkpoints(*checkpoints, device="cpu", sigma_scale=1.0)
    b = Localizer.from_checkpoints(*checkpoints, device="cpu", sigma_scale=2.0)
    a.set_map(cells, progress=False)
    b.set_map(cells, progress=False)
    ha, hb = a.localize(text, 1)[0], b.localize(text, 1)[0]
    np.testing.assert_allclose(hb.cov_xy, 4.0 * ha.cov_xy, rtol=1e-6)
    np.testing.assert_allclose(hb.mean_xy, ha.mean_xy)


def test_predict_in_cells_uses_the_given_cell(localizer, test_split):
    poses = test_split.poses[:3]
    hyps = localizer.predict_in_cells([query_text(p) for p in poses], [p.cell_id for p in poses])
    cells_by_id = {c.id: c for c in test_split.cells}
    assert [h.cell_id for h in hyps] == [p.cell_id for p in poses]
    for h in hyps:
        _check_hypothesis(h, cells_by_id)
        assert np.isnan(h.score)
    with pytest.raises(ValueError, match="not in the map"):
        localizer.predict_in_cells([query_text(poses[0])], ["9999_99999"])


def test_preselection_path(checkpoints, test_split):
    """Above ``preselect_above`` cells, only the global top-N are re-ranked: results stay valid."""
    loc = Localizer.from_checkpoints(*checkpoints, device="cpu", preselect_above=3, preselect_top=4)
    loc.set_map(test_split.cells, progress=False)
    text = query_text(test_split.poses[0])
    hyps = loc.localize(text, top_k=3)
    assert len(hyps) == 3
    # the retrieved cells are among the global-descriptor top-4
    full = Localizer.from_checkpoints(*checkpoints, device="cpu")
    full.set_map(test_split.cells, progress=False)
    hb = full._hint_batch("coarse", [inference.parse_query(text)])
    glob = (full.coarse.encode_text(hb).global_ @ full._index.global_.T)[0]
    top4 = {test_split.cells[i].id for i in torch.topk(glob, 4).indices.tolist()}
    assert {h.cell_id for h in hyps} <= top4


@pytest.mark.parametrize("text", ["", "   \n\t ", "...", " . . "])
def test_empty_or_invalid_text_raises(localizer, text):
    with pytest.raises(ValueError, match="hint|empty"):
        localizer.localize(text)


def test_non_string_text_raises(localizer):
    with pytest.raises(ValueError, match="string"):
        localizer.localize(None)  # type: ignore[arg-type]


def test_long_text_is_truncated_not_refused(localizer):
    hint = "The pose is west of a gray building with a very long and unusual description " + "word " * 80 + "."
    hyps = localizer.localize(hint * 40, top_k=2)
    assert len(hyps) == 2
    assert len(inference.parse_query(hint * 40)) == inference.MAX_HINTS


def test_bad_top_k_raises(localizer):
    with pytest.raises(ValueError, match="top_k"):
        localizer.localize("The pose is west of a gray building.", top_k=0)


def test_map_not_set_raises(checkpoints):
    loc = Localizer.from_checkpoints(*checkpoints, device="cpu")
    assert loc.num_cells == 0
    with pytest.raises(ValueError, match="set_map"):
        loc.localize("The pose is west of a gray building.")


def test_set_map_rejects_duplicates_and_empty(checkpoints, test_split):
    loc = Localizer.from_checkpoints(*checkpoints, device="cpu")
    with pytest.raises(ValueError, match="at least one"):
        loc.set_map([])
    with pytest.raises(ValueError, match="unique"):
        loc.set_map([test_split.cells[0], test_split.cells[0]])


def test_wrong_kind_checkpoint_is_refused(checkpoints):
    coarse, fine = checkpoints
    with pytest.raises(ValueError, match="fine"):
        Localizer.from_checkpoints(fine, coarse, device="cpu")


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev, note = resolve_device("cuda")
    assert dev.type == "cpu"
    assert note is not None and "CUDA" in note
    assert resolve_device("auto") == (torch.device("cpu"), None)
    assert resolve_device("cpu") == (torch.device("cpu"), None)
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


def test_safe_covariance_symmetrises_floors_and_refuses_non_finite():
    bad = np.array([[1.0, 2.0], [0.0, -1.0]])
    fixed = inference.safe_covariance(bad)
    np.testing.assert_allclose(fixed, fixed.T)
    assert np.linalg.eigvalsh(fixed).min() >= inference.MIN_VARIANCE_M2 * 0.999
    with pytest.raises(ValueError, match="not finite"):
        inference.safe_covariance(np.full((2, 2), np.nan))


def test_shipped_checkpoints_load_via_package_path(test_split):
    """The checkpoints shipped in spatialoc_ros/resources/checkpoints load with no path given."""
    assert os.path.isfile(inference.shipped_checkpoint("coarse")), "shipped coarse.pth missing"
    assert os.path.isfile(inference.shipped_checkpoint("fine")), "shipped fine.pth missing"
    size = sum(os.path.getsize(inference.shipped_checkpoint(k)) for k in ("coarse", "fine"))
    assert size <= 20 * 1024 * 1024
    loc = Localizer.from_checkpoints(device="cpu")
    loc.set_map(test_split.cells[:20], progress=False)
    hyps = loc.localize(query_text(test_split.poses[0]), top_k=3)
    assert len(hyps) == 3


def test_intra_op_threads_sets_and_restores():
    before = torch.get_num_threads()
    with inference.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with inference.intra_op_threads(0):  # 0 = leave it as it is
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with inference.intra_op_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before  # restored on an exception too
    with pytest.raises(ValueError, match="n >= 0"):
        with inference.intra_op_threads(-1):
            pass
