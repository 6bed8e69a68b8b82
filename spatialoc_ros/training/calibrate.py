"""Fit the retrieval's calibration on the val split and store it in the coarse checkpoint.

    python -m spatialoc_ros.training.calibrate --base_path DATA --path_coarse C.pth [--out C2.pth]

Up to four numbers, kept in the checkpoint's ``extra`` (like the fine stage's ``sigma_scale``) and
read by :meth:`spatialoc_ros.inference.Localizer.from_checkpoints`:

* ``relation_weight`` and ``selection_weight``: the weight of the geometric hint-binding level
  (:mod:`spatialoc_ros.models.geometry`) added to the learned levels' combined score, and the
  weight of the data set's 'closest' selection rule inside it
  (:func:`~spatialoc_ros.models.geometry.with_selection`); the pair of :data:`WEIGHT_GRID` x
  :data:`SELECTION_GRID` with the best val recall@1 (ties: recall@5, then the smaller weights).
* ``temperature``: ``P(cell | text) = softmax(score / temperature)`` over the ranked cells; the
  value that maximises the val likelihood of the queries' true cells (golden-section search on
  log T).
* ``mixture_within_scale`` and ``mixture_spread_scale`` (only with a fine checkpoint): the
  published estimate's covariance is ``a * within + b * spread`` (the probability-weighted mean of the
  top :data:`ESTIMATE_TOP_K` hypotheses' covariances, and the spread of their means); b on
  :data:`SCALE_GRID` (a on :data:`WITHIN_GRID`, i.e. 1) brings its val 1- and 2-sigma coverage over
  ALL answers closest to a calibrated Gaussian's (39.3 / 86.5 %; least squares, ties to the value
  nearest 1). The exact moments (b = 1) are too wide when the hypotheses disagree, since the truth
  sits near one of them, not between them, so b comes out below 1 with many hints.

Coarse training runs the first two on its best checkpoint at the end (``--calibrate val``, the
default); this CLI, given the fine checkpoint too, fits all three.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np

#: Candidate relation weights (0 = the learned levels alone).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
#: Candidate weights of the 'closest' selection rule inside the geometric level (0 = off).
SELECTION_GRID: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
#: Search range of the temperature.
TEMPERATURE_RANGE: tuple[float, float] = (1e-2, 1e2)
#: Hypotheses combined into the published estimate (the node's and the evaluation's default top_k).
ESTIMATE_TOP_K = 5
#: Candidate factors of the spread term of the mixture's covariance.
SCALE_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 81))
#: Candidate factors of its within term: 1 only, since the hypotheses' own covariances are already
#: calibrated (the fine stage's sigma_scale); fitting both on one val scene made the pair jump
#: between hint counts (two factors, two targets, a few hundred queries).
WITHIN_GRID: tuple[float, ...] = (1.0,)


def _recalls(scores: np.ndarray, true: np.ndarray, ks=(1, 5)) -> tuple[float, ...]:
    rank = (scores > scores[np.arange(len(true)), true][:, None]).sum(axis=1)  # cells strictly above
    return tuple(float(np.mean(rank < k)) for k in ks)


def true_cell_nll(scores: np.ndarray, true: np.ndarray, temperature: float) -> float:
    """Mean -log P(true cell) under softmax(scores / temperature) over each row."""
    z = scores / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z[np.arange(len(true)), true] - np.log(np.exp(z).sum(axis=1))
    return float(-np.mean(logp))


def fit_temperature(scores: np.ndarray, true: np.ndarray, bounds=TEMPERATURE_RANGE, iters: int = 60) -> float:
    """The temperature minimising :func:`true_cell_nll` (golden-section search on log T)."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = true_cell_nll(scores, true, math.exp(a)), true_cell_nll(scores, true, math.exp(b))
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = true_cell_nll(scores, true, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = true_cell_nll(scores, true, math.exp(b))
    return float(math.exp(0.5 * (lo + hi)))


def combined(learned: np.ndarray, geometric: np.ndarray, weight: float, shares: Optional[np.ndarray] = None,
             selection: float = 0.0) -> np.ndarray:
    """(Q, N) ranking scores ``learned + weight * geometric`` with the selection rule (weight
    ``selection``, match shares ``shares`` (Q, N)) added to every cell's geometric level."""
    if shares is None or selection <= 0:
        return learned + weight * geometric
    import torch

    from spatialoc_ros.models.geometry import with_selection

    geo = with_selection(torch.from_numpy(geometric), torch.from_numpy(shares), selection).numpy()
    return learned + weight * geo


def fit_calibration(learned: np.ndarray, geometric: np.ndarray, true: np.ndarray,
                    weights: Sequence[float] = WEIGHT_GRID, shares: Optional[np.ndarray] = None,
                    selections: Sequence[float] = SELECTION_GRID) -> dict:
    """Relation weight, selection weight (with ``shares``, the (Q, N) match shares of
    :meth:`Localizer.selection_shares`; else 0) and temperature from (Q, N) level scores and the
    (Q,) true cell indices: the pair with the best val recall@1 (ties: recall@5, then the smaller
    weights), then the temperature of the best likelihood.

    Returns {'relation_weight', 'selection_weight', 'temperature', 'val_recall@1', 'val_recall@5',
    'val_nll', 'val_recall@1_learned_only'}.
    """
    if learned.shape != geometric.shape or learned.shape[0] != len(true) or len(true) == 0:
        raise ValueError("calibration needs (Q, N) learned and geometric scores and Q true cells, Q > 0")
    if shares is not None and shares.shape != learned.shape:
        raise ValueError("selection shares must have the shape of the level scores")
    best = None
    for beta in (selections if shares is not None else (0.0,)):
        for w in weights:
            r1, r5 = _recalls(combined(learned, geometric, w, shares, beta), true)
            key = (r1, r5, -w, -beta)
            if best is None or key > best[0]:
                best = (key, float(w), float(beta))
    weight, selection = best[1], best[2]
    scores = combined(learned, geometric, weight, shares, selection)
    temperature = fit_temperature(scores, true)
    r1, r5 = _recalls(scores, true)
    return {"relation_weight": weight, "selection_weight": selection, "temperature": temperature,
            "val_recall@1": r1, "val_recall@5": r5, "val_nll": true_cell_nll(scores, true, temperature),
            "val_recall@1_learned_only": _recalls(learned, true)[0]}


def mixture_d2(offsets: np.ndarray, within: np.ndarray, spread: np.ndarray, a: float, b: float) -> np.ndarray:
    """Squared Mahalanobis distances of (N, 2) offsets (truth - mean; NaN rows = another scene ->
    inf) under a * within + b * spread ((N, 2, 2) each)."""
    cov = a * within + b * spread + 1e-9 * np.eye(2)
    ok = np.all(np.isfinite(offsets), axis=1)
    out = np.full(len(offsets), np.inf)
    if ok.any():
        x = offsets[ok]
        out[ok] = np.einsum("ni,ni->n", x, np.linalg.solve(cov[ok], x[..., None])[..., 0])
    return out


def fit_mixture_scales(offsets: np.ndarray, within: np.ndarray, spread: np.ndarray,
                       grid: Sequence[float] = SCALE_GRID,
                       within_grid: Sequence[float] = WITHIN_GRID) -> tuple[float, float]:
    """(a, b) of :func:`mixture_d2` whose 1- and 2-sigma coverage is closest to 1 - exp(-k^2 / 2),
    a from ``within_grid`` and b from ``grid``."""
    if len(offsets) == 0:
        raise ValueError("no estimates to fit the mixture scales on")
    targets = [(k, 1.0 - math.exp(-0.5 * k * k)) for k in (1, 2)]
    best = None
    for a in within_grid:
        for b in grid:
            d2 = mixture_d2(offsets, within, spread, a, b)
            err = sum((float(np.mean(d2 <= k * k)) - t) ** 2 for k, t in targets)
            key = (round(err, 6), (a - 1.0) ** 2 + (b - 1.0) ** 2)
            if best is None or key < best[0]:
                best = (key, (float(a), float(b)))
    return best[1]


def _mixture_terms(localizer, queries, poses, progress: bool):
    """(offsets truth - mean (N, 2; NaN = another scene), within (N, 2, 2), spread (N, 2, 2)) of
    the localizer's top-ESTIMATE_TOP_K mixtures for ``queries`` with the truths of ``poses``."""
    from spatialoc_ros.inference import mixture_moments

    rows = localizer.localize_many(queries, top_k=ESTIMATE_TOP_K, progress=progress)
    offsets = np.full((len(poses), 2), np.nan)
    within = np.tile(np.eye(2), (len(poses), 1, 1))
    spread = np.zeros((len(poses), 2, 2))
    for i, (row, p) in enumerate(zip(rows, poses)):
        same = [h for h in row if h.scene == row[0].scene]
        mean, within[i], spread[i] = mixture_moments(np.array([h.probability for h in same]),
                                                     np.stack([h.mean_xy for h in same]),
                                                     np.stack([h.cov_xy for h in same]))
        if row[0].scene == p.scene_name:
            offsets[i] = np.asarray(p.pose_w, dtype=np.float64)[0:2] - mean
    return offsets, within, spread


def calibrate_localizer(localizer, data, progress: bool = True) -> dict:
    """Fit every calibration value on the queries and cells of ``data`` (a loaded split) and leave
    ``localizer`` calibrated (its map becomes the split's cells):

    * the relation weight and temperature on the whole queries (:func:`fit_calibration`);
    * for each hint count n of CALIBRATED_HINT_COUNTS, on the queries cut to n of their hints (a
      random subset, seed 0, as the evaluation does): the temperature, and with a fine model the
      two mixture scales (:func:`fit_mixture_scales`); the lists go to ``*_by_hints``, and the
      scalars are the values of the whole queries.
    """
    from spatialoc_ros.data.loading import query_text
    from spatialoc_ros.language.transforms import hint_subsets
    from spatialoc_ros.models.checkpoint import CALIBRATED_HINT_COUNTS

    localizer.set_map(data.cells, progress=progress)
    poses = [p for p in data.poses if p.cell_id in localizer._id_to_index]
    if not poses:
        raise ValueError("no val query has its cell in the map")
    texts = [query_text(p) for p in poses]
    learned, geometric = localizer.score_levels(texts, progress=progress)
    shares = localizer.selection_shares(texts, progress=progress)
    true = np.array([localizer.cell_index(p.cell_id) for p in poses])
    result = fit_calibration(learned, geometric, true, shares=shares)
    weight, selection = result["relation_weight"], result["selection_weight"]
    localizer.relation_weight, localizer.temperature = weight, result["temperature"]
    localizer.selection_weight = selection
    localizer.by_hints = {}
    localizer.set_map(data.cells, progress=progress)  # with the geometric level of the fitted weight
    hint_lists = [localizer.understand(t).hints for t in texts]
    lists: dict[str, list] = {"temperature_by_hints": [], "mixture_within_scale_by_hints": [],
                              "mixture_spread_scale_by_hints": []}
    for n in CALIBRATED_HINT_COUNTS:
        sub = hint_subsets(hint_lists, n)
        if all(len(h) <= n for h in hint_lists):  # the whole queries: already scored above
            lo, geo, sh = learned, geometric, shares
        else:
            lo, geo = localizer.score_levels(sub, progress=progress)
            sh = localizer.selection_shares(sub, progress=progress) if selection > 0 else None
        temperature = fit_temperature(combined(lo, geo, weight, sh, selection), true)
        lists["temperature_by_hints"].append(temperature)
        if localizer.fine is None:
            continue
        localizer.temperature = temperature
        offsets, within, spread = _mixture_terms(localizer, sub, poses, progress)
        a, b = fit_mixture_scales(offsets, within, spread)
        lists["mixture_within_scale_by_hints"].append(a)
        lists["mixture_spread_scale_by_hints"].append(b)
        d2 = mixture_d2(offsets, within, spread, a, b)
        for k in (1, 2):
            result[f"val_{n}_hints_estimate_cover{k}"] = float(np.mean(d2 <= k * k))
        if n == max(len(h) for h in hint_lists):
            result["mixture_within_scale"], result["mixture_spread_scale"] = a, b
            for k in (1, 2, 3):
                result[f"val_estimate_cover{k}"] = float(np.mean(d2 <= k * k))
    localizer.temperature = result["temperature"]
    for key, values in lists.items():
        if values:
            result[key] = values
            localizer.by_hints[key] = tuple(values)
    if "mixture_within_scale" in result:
        localizer.mixture_within_scale = result["mixture_within_scale"]
        localizer.mixture_spread_scale = result["mixture_spread_scale"]
    return result


def store_calibration(path: str, result: dict, out: Optional[str] = None) -> str:
    """Write ``relation_weight`` and ``temperature`` (and the val figures under 'calibration')
    into the coarse checkpoint ``path`` (or a copy at ``out``); returns the path written."""
    import torch

    from spatialoc_ros.models.checkpoint import load_checkpoint
    from spatialoc_ros.training import engine

    model, cfg, extra = load_checkpoint(path, "coarse", torch.device("cpu"))

    extra = {**(extra or {}), "relation_weight": float(result["relation_weight"]),
             "selection_weight": float(result.get("selection_weight", 0.0)),
             "temperature": float(result["temperature"]),
             "calibration": {k: float(v) for k, v in result.items() if not isinstance(v, list)}}
    for key in ("mixture_within_scale", "mixture_spread_scale", "temperature_by_hints",
                "mixture_within_scale_by_hints", "mixture_spread_scale_by_hints"):
        if key in result:
            value = result[key]
            extra[key] = [float(v) for v in value] if isinstance(value, list) else float(value)
        else:
            extra.pop(key, None)  # fitted for another weight / temperature: no longer applies
    target = out or path
    engine.save_run_checkpoint(target, model, cfg, "coarse", extra)
    return target


def build_parser() -> argparse.ArgumentParser:
    from spatialoc_ros.cli import device_name

    parser = argparse.ArgumentParser(prog="python -m spatialoc_ros.training.calibrate",
                                     description="Fit the relation weight and the cell-probability "
                                     "temperature of a coarse checkpoint on the val split.")
    parser.add_argument("--base_path", default=None, help="KITTI360Pose folder whose val scene is used "
                        "(default: the synthetic default city)")
    parser.add_argument("--path_coarse", required=True, help="coarse checkpoint to calibrate (written in place)")
    parser.add_argument("--path_fine", default=None, help="fine checkpoint the estimate scale is fitted with "
                        "(default: the shipped one)")
    parser.add_argument("--out", default=None, help="write the calibrated checkpoint here instead")
    parser.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--text_model", default=None, help="language model override (local folder)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from spatialoc_ros.cli import user_errors

    with user_errors("python -m spatialoc_ros.training.calibrate"):
        return _main(argv)


def _main(argv) -> int:
    from spatialoc_ros.cli import check_output_file
    from spatialoc_ros.data.loading import load_split
    from spatialoc_ros.evaluation.coarse import resolve_data
    from spatialoc_ros.inference import Localizer

    parser = build_parser()
    args = parser.parse_args(argv)
    check_output_file(parser, "--out", args.out or args.path_coarse)
    loc = Localizer.from_checkpoints(args.path_coarse, args.path_fine, text_model=args.text_model,
                                     device=args.device)
    data = load_split(resolve_data(args), "val", with_direction=False)
    result = calibrate_localizer(loc, data, progress=not args.no_progress)
    written = store_calibration(args.path_coarse, result, args.out)
    print(format_result(result))
    print(f"[calibrate] wrote {written}")
    return 0


def format_result(result: dict) -> str:
    text = (f"[calibrate] val: relation weight {result['relation_weight']:g}, selection weight "
            f"{result.get('selection_weight', 0.0):g} (recall@1 "
            f"{result['val_recall@1_learned_only']:.3f} -> {result['val_recall@1']:.3f}, recall@5 "
            f"{result['val_recall@5']:.3f}); temperature {result['temperature']:.4f}, true-cell NLL "
            f"{result['val_nll']:.3f}")
    if "temperature_by_hints" in result:
        text += "; temperature by hints " + "/".join(f"{t:.3f}" for t in result["temperature_by_hints"])
    if "mixture_within_scale_by_hints" in result:
        text += ("; mixture scales by hints (within, spread) " + " ".join(
            f"({a:.2f}, {b:.2f})" for a, b in zip(result["mixture_within_scale_by_hints"],
                                                   result["mixture_spread_scale_by_hints"])))
    if "mixture_within_scale" in result:
        text += (f"; mixture scales {result['mixture_within_scale']:.2f} (within) / "
                 f"{result['mixture_spread_scale']:.2f} (spread) (val 1/2/3-sigma coverage "
                 f"{100 * result['val_estimate_cover1']:.1f} / {100 * result['val_estimate_cover2']:.1f} / "
                 f"{100 * result['val_estimate_cover3']:.1f} %)")
    return text


if __name__ == "__main__":
    sys.exit(main())
