"""Metrics of spatialoc_ros.evaluation against hand-computed cases, and the figure writers."""
import math

import numpy as np
import pytest

from spatialoc_ros.evaluation import metrics, plots


def test_coarse_recall_hand_case():
    retrieved = [["a", "b", "c"], ["x", "y", "z"], ["q", "r", "s"], ["m", "n", "t"]]
    truth = ["a", "z", "s", "nope"]
    r = metrics.coarse_recall(retrieved, truth, ks=(1, 2, 3))
    assert r == {1: 0.25, 2: 0.25, 3: 0.75}


def test_coarse_recall_rejects_mismatch():
    with pytest.raises(ValueError):
        metrics.coarse_recall([["a"]], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.coarse_recall([], [])


def test_localization_recall_with_other_scene_cells():
    # query 0: hypotheses at 3 m (other scene!), 7 m, 12 m; query 1: 4 m, 20 m, 1 m
    pred = np.array([[[3.0, 0.0], [0.0, 7.0], [12.0, 0.0]],
                     [[100.0, 104.0], [120.0, 100.0], [101.0, 100.0]]])
    scenes = [["0005", "0003", "0003"], ["0009", "0009", "0009"]]
    true = np.array([[0.0, 0.0, 5.0], [100.0, 100.0, 0.0]])
    dist = metrics.localization_distances(pred, scenes, true, ["0003", "0009"])
    assert math.isinf(dist[0, 0])
    np.testing.assert_allclose(dist[0, 1:], [7.0, 12.0])
    np.testing.assert_allclose(dist[1], [4.0, 20.0, 1.0])
    r = metrics.localization_recall(dist, ks=(1, 2, 3), thresholds=(5.0, 10.0, 15.0))
    # top-1: q0 inf -> miss everywhere; q1 4 m -> hit at 5/10/15
    assert r[1] == {5.0: 0.5, 10.0: 0.5, 15.0: 0.5}
    # top-2: q0 min 7 m -> hit at 10/15
    assert r[2] == {5.0: 0.5, 10.0: 1.0, 15.0: 1.0}
    assert r[3] == {5.0: 0.5, 10.0: 1.0, 15.0: 1.0}


def test_localization_recall_uses_all_when_fewer_than_k():
    dist = np.array([[20.0, 3.0]])
    assert metrics.localization_recall(dist, ks=(1, 10), thresholds=(5.0,)) == {1: {5.0: 0.0}, 10: {5.0: 1.0}}


def test_mahalanobis_and_coverage_hand_case():
    mean = np.zeros((3, 2))
    cov = np.array([np.diag([4.0, 1.0])] * 3)
    x = np.array([[2.0, 0.0], [0.0, 1.5], [0.0, 3.5]])  # d^2 = 1, 2.25, 12.25
    d2 = metrics.mahalanobis_sq(mean, cov, x)
    np.testing.assert_allclose(d2, [1.0, 2.25, 12.25])
    cover = metrics.ellipse_coverage(d2)
    assert cover == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}


def test_gaussian_nll_hand_case():
    # standard 2-D normal at its mean: log(2 pi)
    nll = metrics.gaussian_nll(np.zeros((1, 2)), np.eye(2)[None], np.zeros((1, 2)))
    np.testing.assert_allclose(nll, [math.log(2 * math.pi)])
    # sigma = 2 m per axis, 2 m off in x: 0.5 * 1 + 0.5 * log(16) + log(2 pi)
    nll = metrics.gaussian_nll(np.zeros((1, 2)), 4 * np.eye(2)[None], np.array([[2.0, 0.0]]))
    np.testing.assert_allclose(nll, [0.5 + 0.5 * math.log(16.0) + math.log(2 * math.pi)])


def test_coverage_of_known_gaussian_matches_theory():
    rng = np.random.default_rng(0)
    n = 200_000
    cov = np.array([[9.0, 2.5], [2.5, 4.0]])
    mean = np.array([10.0, -3.0])
    x = rng.multivariate_normal(mean, cov, size=n)
    s = metrics.calibration_summary(np.tile(mean, (n, 1)), np.tile(cov, (n, 1, 1)), x)
    for k in (1, 2, 3):
        assert s["coverage"][k] == pytest.approx(metrics.expected_coverage(k), abs=0.005)
    assert metrics.expected_coverage(1) == pytest.approx(0.3935, abs=1e-4)
    assert metrics.expected_coverage(2) == pytest.approx(0.8647, abs=1e-4)
    # an over-confident Gaussian (covariance / 4) covers far less
    s_bad = metrics.calibration_summary(np.tile(mean, (n, 1)), np.tile(cov / 4, (n, 1, 1)), x)
    assert s_bad["coverage"][1] < 0.2


def test_calibration_summary_empty():
    s = metrics.calibration_summary(np.zeros((0, 2)), np.zeros((0, 2, 2)), np.zeros((0, 2)))
    assert s["n"] == 0 and math.isnan(s["coverage"][1])
    assert "no samples" in metrics.format_calibration(s, "x")


def test_tables_format():
    text = metrics.format_coarse_table({1: 0.25, 3: 0.5, 5: 0.75})
    assert "0.250" in text and "@5" in text
    text = metrics.format_localization_table({1: {5.0: 0.1, 10.0: 0.2}, 5: {5.0: 0.3, 10.0: 0.4}})
    assert "top-5" in text and "10 m" in text and "0.400" in text


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(1)
    dist = rng.uniform(0, 30, size=(50, 10))
    dist[::7, 0] = np.inf
    p = plots.plot_recall_curves(dist, [1, 5, 10], str(tmp_path / "curves.png"))
    bbox = np.array([[0, 0, 0, 30, 30, 5], [10, 0, 0, 40, 30, 5]], dtype=float)
    true = rng.uniform(0, 30, size=(20, 2))
    pred = true + rng.normal(0, 3, size=(20, 2))
    cov = np.tile(np.array([[4.0, 1.0], [1.0, 2.0]]), (20, 1, 1))
    m = plots.plot_scene_map(bbox, true, pred, cov, rng.uniform(size=20) > 0.3, str(tmp_path / "map.png"))
    for path in (p, m):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
