"""Metrics of the KITTI360Pose benchmark and of the Gaussian fine stage (pure numpy).

* Coarse retrieval recall@k: the query's exact ``pose.cell_id`` is among the top-k retrieved cells.
* Localisation recall at (k, t): the smallest x-y distance (metres) between the true world position
  and the predicted positions in the first k retrieved cells is at most t; a cell of another scene
  is infinitely far.
* Calibration of a 2-D Gaussian (mean, covariance in m^2): the share of true positions whose
  Mahalanobis distance is at most 1, 2, 3 (for a 2-D Gaussian the expected shares are
  1 - exp(-k^2 / 2): 39.3 %, 86.5 %, 98.9 %), and the mean negative log-likelihood in metres.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

#: Default k of the coarse table and of the localisation table, and the distance thresholds (m).
COARSE_KS: tuple[int, ...] = (1, 3, 5)
LOCALIZATION_KS: tuple[int, ...] = (1, 5, 10)
THRESHOLDS_M: tuple[float, ...] = (5.0, 10.0, 15.0)
SIGMAS: tuple[int, ...] = (1, 2, 3)


def expected_coverage(k: float) -> float:
    """Probability mass of a 2-D Gaussian inside its k-sigma ellipse: 1 - exp(-k^2 / 2)."""
    return 1.0 - math.exp(-0.5 * k * k)


def coarse_recall(
    retrieved_ids: Sequence[Sequence[str]], true_ids: Sequence[str], ks: Iterable[int] = COARSE_KS
) -> dict[int, float]:
    """Recall@k of cell retrieval.

    Args:
        retrieved_ids: per query, the retrieved cell ids best first (at least max(ks) when available).
        true_ids: per query, the id of its ground-truth (best) cell.
    Returns:
        {k: share of queries whose true cell is among the first k retrieved}.
    """
    if len(retrieved_ids) != len(true_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieval lists for {len(true_ids)} queries")
    if not true_ids:
        raise ValueError("no queries to evaluate")
    out = {}
    for k in ks:
        hits = [truth in list(ranked[:k]) for ranked, truth in zip(retrieved_ids, true_ids)]
        out[int(k)] = float(np.mean(hits))
    return out


def localization_distances(
    pred_xy: np.ndarray, pred_scenes: Sequence[Sequence[str]], true_xy: np.ndarray, true_scenes: Sequence[str]
) -> np.ndarray:
    """x-y distances (m) between each query's predictions and its true position.

    Args:
        pred_xy: (Q, K, 2) predicted world positions of the top-K hypotheses.
        pred_scenes: (Q, K) scene names of the hypotheses' cells.
        true_xy: (Q, 2) (or (Q, 3); only x-y is used) true world positions.
        true_scenes: (Q,) scene names of the queries.
    Returns:
        (Q, K) distances, +inf where the hypothesis lies in another scene.
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64)
    true_xy = np.asarray(true_xy, dtype=np.float64)[:, 0:2]
    if pred_xy.ndim != 3 or pred_xy.shape[0] != true_xy.shape[0] or pred_xy.shape[2] != 2:
        raise ValueError(f"pred_xy must be (Q, K, 2) with Q = {true_xy.shape[0]}, got {pred_xy.shape}")
    dist = np.linalg.norm(pred_xy - true_xy[:, None, :], axis=-1)  # (Q, K)
    same = np.array(
        [[s == t for s in row] for row, t in zip(pred_scenes, true_scenes)], dtype=bool
    ).reshape(dist.shape)
    dist[~same] = np.inf
    return dist


def localization_recall(
    distances: np.ndarray, ks: Iterable[int] = LOCALIZATION_KS, thresholds: Iterable[float] = THRESHOLDS_M
) -> dict[int, dict[float, float]]:
    """Localisation recall from (Q, K) distances: {k: {t: share with min over first k <= t}}.

    When a query has fewer than k hypotheses, all of them are used.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[0] == 0:
        raise ValueError(f"distances must be a non-empty (Q, K) array, got shape {distances.shape}")
    out: dict[int, dict[float, float]] = {}
    for k in ks:
        best = distances[:, : int(k)].min(axis=1)
        out[int(k)] = {float(t): float(np.mean(best <= t)) for t in thresholds}
    return out


def mahalanobis_sq(mean: np.ndarray, cov: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances (x - mean)^T cov^-1 (x - mean) for (N, 2) / (N, 2, 2) / (N, 2)."""
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    d = np.asarray(x, dtype=np.float64)[..., 0:2] - mean
    sol = np.linalg.solve(cov, d[..., None])[..., 0]
    return np.einsum("...i,...i->...", d, sol)


def gaussian_nll(mean: np.ndarray, cov: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-sample negative log-likelihood of a 2-D Gaussian, in the units of its inputs:
    0.5 d^2 + 0.5 log det(cov) + log(2 pi)."""
    d2 = mahalanobis_sq(mean, cov, x)
    _, logdet = np.linalg.slogdet(np.asarray(cov, dtype=np.float64))
    return 0.5 * d2 + 0.5 * logdet + math.log(2.0 * math.pi)


def ellipse_coverage(d2: np.ndarray, sigmas: Iterable[int] = SIGMAS) -> dict[int, float]:
    """Share of samples inside the k-sigma ellipse (Mahalanobis distance <= k) for each k."""
    d2 = np.asarray(d2, dtype=np.float64)
    if d2.size == 0:
        return {int(k): float("nan") for k in sigmas}
    return {int(k): float(np.mean(d2 <= k * k)) for k in sigmas}


def calibration_summary(mean: np.ndarray, cov: np.ndarray, x: np.ndarray) -> dict:
    """Coverage of the 1/2/3-sigma ellipses, mean NLL and mean / median error of a set of Gaussians.

    Args:
        mean: (N, 2) predicted means, cov: (N, 2, 2) covariances, x: (N, 2) true positions (same units).
    Returns:
        {'n', 'coverage': {1: .., 2: .., 3: ..}, 'expected': {...}, 'mean_nll', 'mean_error',
         'median_error'}; NaNs when N = 0.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, 2)
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])[:, 0:2]
    n = int(mean.shape[0])
    expected = {k: expected_coverage(k) for k in SIGMAS}
    if n == 0:
        nan = float("nan")
        return {"n": 0, "coverage": {k: nan for k in SIGMAS}, "expected": expected,
                "mean_nll": nan, "mean_error": nan, "median_error": nan}
    cov = np.asarray(cov, dtype=np.float64).reshape(n, 2, 2)
    d2 = mahalanobis_sq(mean, cov, x)
    err = np.linalg.norm(mean - x, axis=1)
    return {
        "n": n,
        "coverage": ellipse_coverage(d2),
        "expected": expected,
        "mean_nll": float(np.mean(gaussian_nll(mean, cov, x))),
        "mean_error": float(np.mean(err)),
        "median_error": float(np.median(err)),
    }


def format_coarse_table(recall: dict[int, float], title: str = "Coarse retrieval recall") -> str:
    """A two-line text table: header of k, then recall values."""
    ks = sorted(recall)
    head = " ".join(f"{'@' + str(k):>7}" for k in ks)
    vals = " ".join(f"{recall[k]:7.3f}" for k in ks)
    return f"{title}\n{'':10}{head}\n{'recall':10}{vals}"


def format_localization_table(
    recall: dict[int, dict[float, float]], title: str = "Localisation recall"
) -> str:
    """Rows top-k, columns thresholds in metres."""
    ks = sorted(recall)
    ts = sorted(next(iter(recall.values())))
    head = " ".join(f"{f'{t:g} m':>7}" for t in ts)
    lines = [title, f"{'':10}{head}"]
    for k in ks:
        lines.append(f"{'top-' + str(k):10}" + " ".join(f"{recall[k][t]:7.3f}" for t in ts))
    return "\n".join(lines)


def format_calibration(summary: dict, title: str) -> str:
    """One block: coverage at 1/2/3 sigma against the expected value, NLL and errors."""
    if summary["n"] == 0:
        return f"{title}: no samples"
    cov = summary["coverage"]
    exp = summary["expected"]
    parts = ", ".join(f"{k}-sigma {cov[k] * 100:5.1f}% (expect {exp[k] * 100:4.1f}%)" for k in sorted(cov))
    return (
        f"{title} (n={summary['n']}): {parts}\n"
        f"{'':4}mean NLL {summary['mean_nll']:.3f} (m), mean error {summary['mean_error']:.2f} m, "
        f"median error {summary['median_error']:.2f} m"
    )


#: Bins of the expected calibration error and of the reliability diagram.
CONFIDENCE_BINS = 10


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = CONFIDENCE_BINS) -> dict:
    """Reliability of a confidence in [0, 1] against 0/1 outcomes, over ``bins`` equal-width bins.

    Returns {'ece': sum_b n_b / n * |acc_b - conf_b|, 'bins': [{'low', 'high', 'n', 'confidence',
    'accuracy'}, ...]} (empty bins have n = 0 and NaN means).
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.shape != ok.shape or conf.size == 0:
        raise ValueError(f"need as many confidences as outcomes (> 0), got {conf.size} and {ok.size}")
    if not np.all(np.isfinite(conf)) or np.any(conf < 0) or np.any(conf > 1):
        raise ValueError("confidences must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        c = float(conf[sel].mean()) if n else float("nan")
        a = float(ok[sel].mean()) if n else float("nan")
        if n:
            ece += n / conf.size * abs(a - c)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n, "confidence": c, "accuracy": a})
    return {"ece": float(ece), "bins": rows}


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` separating positives from negatives (ties count
    half); NaN when one class is absent. A constant score gives 0.5."""
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    y = np.asarray(positive, dtype=bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties (1-based)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gaps_over_baseline(recall: dict[int, float], baseline: dict[int, float]) -> dict[int, float]:
    """recall@k - baseline recall@k for every k of both."""
    return {k: float(recall[k] - baseline[k]) for k in sorted(recall) if k in baseline}
