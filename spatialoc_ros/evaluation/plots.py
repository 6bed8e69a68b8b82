"""PNG figures of an evaluation: recall curves and a map of true / predicted positions."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Ellipse, Rectangle  # noqa: E402


def plot_recall_curves(
    distances: np.ndarray, ks: Sequence[int], path: str, max_threshold: float = 30.0, title: str = ""
) -> str:
    """Localisation recall against the distance threshold, one curve per top-k.

    Args:
        distances: (Q, K) distances in metres (inf for another scene), hypotheses best first.
    """
    thresholds = np.linspace(0.0, max_threshold, 121)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in ks:
        best = np.min(distances[:, : int(k)], axis=1)
        ax.plot(thresholds, [(best <= t).mean() for t in thresholds], label=f"top-{k}")
    for t in (5, 10, 15):
        ax.axvline(t, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("distance threshold (m)")
    ax.set_ylabel("localisation recall")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max_threshold)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "Localisation recall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _ellipse(mean: np.ndarray, cov: np.ndarray, nsig: float, **kw) -> Ellipse:
    w, v = np.linalg.eigh(cov)
    w = np.clip(w, 0.0, None)
    angle = np.degrees(np.arctan2(v[1, 1], v[0, 1]))
    return Ellipse(mean, 2 * nsig * np.sqrt(w[1]), 2 * nsig * np.sqrt(w[0]), angle=angle, fill=False, **kw)


def plot_scene_map(
    cells_bbox: np.ndarray,
    true_xy: np.ndarray,
    pred_xy: np.ndarray,
    pred_cov: np.ndarray,
    correct_cell: np.ndarray,
    path: str,
    title: str = "",
    max_queries: Optional[int] = 60,
    seed: int = 0,
) -> str:
    """A map of one scene: cell outlines, true positions, top-1 predictions with 2-sigma ellipses.

    Args:
        cells_bbox: (N, 6) bbox_w of the scene's cells; true_xy / pred_xy: (Q, 2) metres;
        pred_cov: (Q, 2, 2) m^2; correct_cell: (Q,) bool, True when the top-1 cell is the true one
        (green), else red. At most ``max_queries`` queries are drawn (a random subset).
    """
    q = len(true_xy)
    sel = np.arange(q)
    if max_queries is not None and q > max_queries:
        sel = np.sort(np.random.default_rng(seed).choice(q, max_queries, replace=False))
    fig, ax = plt.subplots(figsize=(8, 8))
    for b in cells_bbox:
        ax.add_patch(Rectangle((b[0], b[1]), b[3] - b[0], b[4] - b[1], fill=False, lw=0.3, color="0.75"))
    for i in sel:
        color = "tab:green" if correct_cell[i] else "tab:red"
        ax.plot([true_xy[i, 0], pred_xy[i, 0]], [true_xy[i, 1], pred_xy[i, 1]], color=color, lw=0.6, alpha=0.6)
        ax.add_patch(_ellipse(pred_xy[i], pred_cov[i], 2.0, color=color, lw=0.8, alpha=0.8))
    ax.scatter(true_xy[sel, 0], true_xy[sel, 1], s=10, c="k", marker="o", label="true position", zorder=3)
    ax.scatter(pred_xy[sel, 0], pred_xy[sel, 1], s=14, c=np.where(correct_cell[sel], "tab:green", "tab:red"),
               marker="x", label="top-1 mean (green: right cell, red: wrong)", zorder=4)
    lo = cells_bbox[:, 0:2].min(axis=0)
    hi = cells_bbox[:, 3:5].max(axis=0)
    ax.set_xlim(lo[0] - 5, hi[0] + 5)
    ax.set_ylim(lo[1] - 5, hi[1] + 5)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "True and predicted positions (2-sigma ellipses)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def plot_reliability(rel: dict, path: str, title: str = "") -> str:
    """Reliability diagram of :func:`spatialoc_ros.evaluation.metrics.reliability`: accuracy
    against confidence per bin (bar width = bin), the diagonal, and the bin counts."""
    bins = rel["bins"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = np.array([(b["low"] + b["high"]) / 2 for b in bins])
    width = bins[0]["high"] - bins[0]["low"]
    acc = np.array([b["accuracy"] if b["n"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["n"] else np.nan for b in bins])
    ax.bar(centres, acc, width=width * 0.95, color="tab:blue", alpha=0.7, label="share right")
    ax.plot(conf, acc, "o", color="tab:red", ms=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_ylabel("share of top cells that are right")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title or f"Reliability of the confidence (ECE {rel['ece']:.3f})")
    axn.bar(centres, [b["n"] for b in bins], width=width * 0.95, color="0.5")
    axn.set_xlabel("confidence (probability that the top cell is right)")
    axn.set_ylabel("answers")
    axn.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
