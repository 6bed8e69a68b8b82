"""Fit the retrieval's calibration on the val split and store it in the coarse checkpoint.

    python -m spatialoc_ros.training.calibrate --base_path DATA --path_coarse C.pth [--out C2.pth]

Two numbers, both kept in the checkpoint's ``extra`` (like the fine stage's ``sigma_scale``) and
read by :meth:`spatialoc_ros.inference.Localizer.from_checkpoints`:

* ``relation_weight``: the weight of the geometric hint-binding level
  (:mod:`spatialoc_ros.models.geometry`) added to the learned levels' combined score; the value of
  :data:`WEIGHT_GRID` with the best val recall@1 (ties: recall@5, then the smaller weight).
* ``temperature``: ``P(cell | text) = softmax(score / temperature)`` over the ranked cells; the
  value that maximises the val likelihood of the queries' true cells (golden-section search on
  log T).

Coarse training runs this on its best checkpoint at the end (``--calibrate val``, the default).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

import numpy as np

#: Candidate relation weights (0 = the learned levels alone).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
#: Search range of the temperature.
TEMPERATURE_RANGE: tuple[float, float] = (1e-2, 1e2)


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


def fit_calibration(learned: np.ndarray, geometric: np.ndarray, true: np.ndarray,
                    weights: Sequence[float] = WEIGHT_GRID) -> dict:
    """Relation weight and temperature from (Q, N) level scores and the (Q,) true cell indices.

    Returns {'relation_weight', 'temperature', 'val_recall@1', 'val_recall@5', 'val_nll',
    'val_recall@1_learned_only'}.
    """
    if learned.shape != geometric.shape or learned.shape[0] != len(true) or len(true) == 0:
        raise ValueError("calibration needs (Q, N) learned and geometric scores and Q true cells, Q > 0")
    best = None
    for w in weights:
        r1, r5 = _recalls(learned + w * geometric, true)
        key = (r1, r5, -w)
        if best is None or key > best[0]:
            best = (key, float(w))
    weight = best[1]
    scores = learned + weight * geometric
    temperature = fit_temperature(scores, true)
    r1, r5 = _recalls(scores, true)
    return {"relation_weight": weight, "temperature": temperature, "val_recall@1": r1, "val_recall@5": r5,
            "val_nll": true_cell_nll(scores, true, temperature),
            "val_recall@1_learned_only": _recalls(learned, true)[0]}


def calibrate_localizer(localizer, data, progress: bool = True) -> dict:
    """:func:`fit_calibration` on the queries and cells of ``data`` (a loaded split) with the
    localizer's coarse model; sets the map of ``localizer`` to the split's cells."""
    from spatialoc_ros.data.loading import query_text

    localizer.set_map(data.cells, progress=progress)
    poses = [p for p in data.poses if p.cell_id in localizer._id_to_index]
    if not poses:
        raise ValueError("no val query has its cell in the map")
    learned, geometric = localizer.score_levels([query_text(p) for p in poses], progress=progress)
    true = np.array([localizer.cell_index(p.cell_id) for p in poses])
    return fit_calibration(learned, geometric, true)


def store_calibration(path: str, result: dict, out: Optional[str] = None) -> str:
    """Write ``relation_weight`` and ``temperature`` (and the val figures under 'calibration')
    into the coarse checkpoint ``path`` (or a copy at ``out``); returns the path written."""
    import torch

    from spatialoc_ros.models.checkpoint import load_checkpoint
    from spatialoc_ros.training import engine

    model, cfg, extra = load_checkpoint(path, "coarse", torch.device("cpu"))

    extra = {**(extra or {}), "relation_weight": float(result["relation_weight"]),
             "temperature": float(result["temperature"]),
             "calibration": {k: float(v) for k, v in result.items()}}
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
    parser.add_argument("--path_fine", default=None, help="fine checkpoint (default: the shipped one; only "
                        "its language model is used)")
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
    return (f"[calibrate] val: relation weight {result['relation_weight']:g} (recall@1 "
            f"{result['val_recall@1_learned_only']:.3f} -> {result['val_recall@1']:.3f}, recall@5 "
            f"{result['val_recall@5']:.3f}); temperature {result['temperature']:.4f}, true-cell NLL "
            f"{result['val_nll']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
