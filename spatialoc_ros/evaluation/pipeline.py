"""Evaluate the whole coarse-to-fine pipeline on the val or test split.

    python -m spatialoc_ros.evaluation.pipeline --base_path DATA \
        --path_coarse checkpoints/C/best.pth --path_fine checkpoints/F/best.pth [--use_test_set] \
        [--out_json pipeline.json] [--plots_dir plots/]

Runs every query through :class:`spatialoc_ros.inference.Localizer` (the ROS node's path) against
all cells of the split and prints:

* coarse retrieval recall@1/3/5;
* localisation recall for top-1/5/10 at 5/10/15 m (world position = bbox_w[0:2] + mu * cell_size,
  min over the first k hypotheses, cells of another scene infinitely far);
* UGFL calibration: for the top-1 hypothesis when its cell is the right one, and for the fine
  stage run on the ground-truth cell, the share of true positions inside the 1/2/3-sigma ellipses
  (expected 39.3 / 86.5 / 98.9 %) and the mean negative log-likelihood in metres.

``--plots_dir`` draws recall curves and a map of one scene with true / predicted positions and
2-sigma ellipses.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from spatialoc_ros.cli import finite_float
from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.evaluation import metrics, plots
from spatialoc_ros.evaluation.args import (
    add_common_eval_args, check_eval_args, check_features, split_name, write_json,
)
from spatialoc_ros.evaluation.coarse import resolve_data
from spatialoc_ros.inference import Localizer, resolve_device, shipped_checkpoint
from spatialoc_ros.models.vector_index import FAISS_INSTALL_HINT, INDEX_KINDS, faiss_available
from spatialoc_ros.language.transforms import flipped, hint_subsets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.evaluation.pipeline",
        description="Coarse-to-fine localisation recall and UGFL calibration on KITTI360Pose-style data.",
    )
    add_common_eval_args(parser, default_top_k=[1, 5, 10])
    g = parser.add_argument_group("fine stage")
    g.add_argument("--path_fine", type=str, default=None,
                   help="fine (UGFL) checkpoint (default: the one shipped with the package)")
    g.add_argument("--coarse_top_k", type=int, nargs="+", default=[1, 3, 5],
                   help="k of the coarse retrieval table (default 1 3 5)")
    g.add_argument("--sigma_scale", type=finite_float, default=None,
                   help="override the covariance calibration scalar stored in the fine checkpoint "
                   "(1 = the model's raw covariance)")
    g.add_argument("--estimate_top_k", type=int, default=5,
                   help="hypotheses combined into the published estimate (default 5)")
    g.add_argument("--covariance", choices=("mixture", "top"), default="mixture",
                   help="published covariance: the mixture's moment-matched Gaussian (default) or the top "
                   "hypothesis alone")
    g.add_argument("--relation_weight", type=finite_float, default=None,
                   help="override the geometric level's weight stored in the coarse checkpoint (0 = the "
                   "learned levels alone: the ablation)")
    g.add_argument("--selection_weight", type=finite_float, default=None,
                   help="override the weight of the 'closest' selection rule in the geometric level, stored in "
                   "the coarse checkpoint (0 = off: the ablation)")
    g.add_argument("--refine_sharpness", type=finite_float, default=None,
                   help="sharpness of the geometric in-cell refinement (default: the Localizer's; 0 = off: "
                   "the ablation)")
    g.add_argument("--temperature", type=finite_float, default=None,
                   help="override the cell-probability temperature stored in the coarse checkpoint")
    g.add_argument("--hint_counts", type=int, nargs="*", default=[3, 4, 5, 6],
                   help="also evaluate with this many of each query's hints kept (a random subset, "
                   "seed 0; default 3 4 5 6; none: skip)")
    g.add_argument("--no_flip_control", action="store_true",
                   help="skip the direction-flip control (every north<->south, east<->west swapped)")
    g.add_argument("--index", choices=INDEX_KINDS, default="auto",
                   help="short list of retrieval: exact, faiss, or auto (FAISS above the pre-selection size "
                   "when installed; smaller maps rank every cell)")
    g.add_argument("--map_scene", type=str, default=None,
                   help="scene drawn in the map figure (short name such as 0003; default: the split's first)")
    return parser


def estimate_summary(estimates, true_xy: np.ndarray, true_scenes, true_ids) -> dict:
    """Coverage of published estimates over all answers (an estimate in another scene is outside
    every ellipse) and the reliability / AUROC of their confidence for 'the top cell is right'."""
    same = np.array([e.scene == s for e, s in zip(estimates, true_scenes)])
    mean = np.array([e.mean_xy for e in estimates])
    cov = np.array([e.cov_xy for e in estimates])
    d2 = np.full(len(estimates), np.inf)
    if same.any():
        d2[same] = metrics.mahalanobis_sq(mean[same], cov[same], true_xy[same])
    conf = np.array([e.confidence for e in estimates])
    right = np.array([e.hypotheses[0].cell_id == t for e, t in zip(estimates, true_ids)])
    rel = metrics.reliability(conf, right)
    err = np.where(same, np.linalg.norm(mean - true_xy[:, 0:2], axis=1), np.inf)
    return {"n": len(estimates), "coverage": metrics.ellipse_coverage(d2),
            "expected": {k: metrics.expected_coverage(k) for k in metrics.SIGMAS},
            "ece": rel["ece"], "auroc": metrics.auroc(conf, right), "mean_confidence": float(conf.mean()),
            "top1_right_share": float(right.mean()), "median_error_m": float(np.median(err)),
            "reliability_bins": rel["bins"]}


def evaluate(localizer: Localizer, data, args: argparse.Namespace, progress: bool = True) -> dict:
    """Run the localiser on the split's queries; return every number (and arrays for the plots)."""
    from spatialoc_ros.evaluation.baseline import BagOfObjects

    poses = data.poses[: args.max_queries] if args.max_queries else data.poses
    texts = [query_text(p) for p in poses]
    true_ids = [p.cell_id for p in poses]
    true_xy = np.array([np.asarray(p.pose_w, dtype=np.float64)[0:2] for p in poses])
    true_scenes = [p.scene_name for p in poses]
    kmax = min(max(max(args.top_k), max(args.coarse_top_k)), localizer.num_cells)

    t0 = time.perf_counter()
    hyps = localizer.localize_many(texts, top_k=kmax, progress=progress)
    t_loc = time.perf_counter() - t0
    timings = dict(localizer.timings)

    ids = [[h.cell_id for h in row] for row in hyps]
    coarse = metrics.coarse_recall(ids, true_ids, args.coarse_top_k)
    pred_xy = np.array([[h.mean_xy for h in row] for row in hyps])  # (Q, K, 2)
    dist = metrics.localization_distances(pred_xy, [[h.scene for h in row] for row in hyps], true_xy, true_scenes)
    loc = metrics.localization_recall(dist, args.top_k, args.threshs)

    right = np.array([row[0].cell_id == t for row, t in zip(hyps, true_ids)])
    top1_mean = np.array([row[0].mean_xy for row in hyps])
    top1_cov = np.array([row[0].cov_xy for row in hyps])
    calib_top1 = metrics.calibration_summary(top1_mean[right], top1_cov[right], true_xy[right])

    t0 = time.perf_counter()
    gt = localizer.predict_in_cells(texts, true_ids, progress=progress)
    t_gt = time.perf_counter() - t0
    calib_gt = metrics.calibration_summary(np.array([h.mean_xy for h in gt]), np.array([h.cov_xy for h in gt]), true_xy)

    kest = min(args.estimate_top_k, kmax)
    estimates = [localizer.combine(row[:kest], args.covariance) for row in hyps]
    est = estimate_summary(estimates, true_xy, true_scenes, true_ids)

    hint_lists = [localizer.understand(t).hints for t in texts]
    bag = BagOfObjects(localizer.cells)
    baseline = metrics.coarse_recall([[localizer.cells[i].id for i in row] for row in
                                      bag.rank(hint_lists, max(args.coarse_top_k))], true_ids, args.coarse_top_k)
    flip = None
    if not args.no_flip_control:
        ranked = localizer.rank([flipped(h) for h in hint_lists], top_k=max(args.coarse_top_k), progress=progress)
        flip_recall = metrics.coarse_recall([[localizer.cells[i].id for i in row] for row in ranked],
                                            true_ids, args.coarse_top_k)
        flip = {"coarse_recall": flip_recall,
                "relative_drop_at_1": float(1.0 - flip_recall[1] / coarse[1]) if coarse[1] > 0 else float("nan")}
    by_count = {}
    for count in args.hint_counts:
        sub = hint_subsets(hint_lists, count)
        usable = [i for i, h in enumerate(sub) if len(h) >= localizer.min_hints]
        if not usable:
            continue
        rows = localizer.localize_many([sub[i] for i in usable], top_k=kest, progress=progress)
        sel_ids = [true_ids[i] for i in usable]
        d = metrics.localization_distances(np.array([[r[0].mean_xy] for r in rows]), [[r[0].scene] for r in rows],
                                           true_xy[usable], [true_scenes[i] for i in usable])  # (n, 1)
        e = estimate_summary([localizer.combine(r, args.covariance) for r in rows], true_xy[usable],
                             [true_scenes[i] for i in usable], sel_ids)
        e.pop("reliability_bins")
        by_count[int(count)] = {
            "n": len(usable),
            "coarse_recall": metrics.coarse_recall([[h.cell_id for h in r] for r in rows], sel_ids, [1, kest]),
            "top1_within": {float(t): float(np.mean(d[:, 0] <= t)) for t in args.threshs},
            "estimate": e,
        }

    return {
        "num_queries": len(poses),
        "num_cells": localizer.num_cells,
        "coarse_recall": coarse,
        "baseline_bag_of_objects": {"coarse_recall": baseline, "gap": metrics.gaps_over_baseline(coarse, baseline)},
        "flip_control": flip,
        "localization_recall": loc,
        "estimate": est,
        "by_hint_count": by_count,
        "calibration": {"top1_right_cell": calib_top1, "ground_truth_cell": calib_gt},
        "time_s": {"localize_all": t_loc, "fine_on_ground_truth_cells": t_gt},
        "ms_per_query": {k: v / max(len(poses), 1) for k, v in timings.items()},
        "_arrays": {"dist": dist, "true_xy": true_xy, "top1_mean": top1_mean, "top1_cov": top1_cov,
                    "right": right, "true_scenes": true_scenes,
                    "reliability": {"ece": est["ece"], "bins": est["reliability_bins"]}},
    }


def print_report(res: dict, split: str) -> None:
    title = f"({split}, {res['num_queries']} queries, {res['num_cells']} cells)"
    print(metrics.format_coarse_table(res["coarse_recall"], f"Coarse retrieval recall {title}"))
    base = res["baseline_bag_of_objects"]
    print(metrics.format_coarse_table(base["coarse_recall"], "Bag-of-objects baseline (no positions)"))
    print("gap over the baseline: " + ", ".join(f"@{k} {v:+.3f}" for k, v in base["gap"].items()))
    if res["flip_control"] is not None:
        f = res["flip_control"]
        print(metrics.format_coarse_table(f["coarse_recall"], "Direction-flip control (north<->south, east<->west)"))
        print(f"flip lowers recall@1 by {100 * f['relative_drop_at_1']:.1f} % (relative)")
    print(metrics.format_localization_table(res["localization_recall"], f"Localisation recall {title}"))
    e = res["estimate"]
    exp = e["expected"]
    print(f"Published estimate over all {e['n']} answers: 1/2/3-sigma coverage "
          + ", ".join(f"{100 * e['coverage'][k]:.1f}% (expect {100 * exp[k]:.1f}%)" for k in sorted(e["coverage"]))
          + f"; median error {e['median_error_m']:.2f} m")
    print(f"Confidence (P(top cell right)): mean {e['mean_confidence']:.3f} vs share right "
          f"{e['top1_right_share']:.3f}; ECE {e['ece']:.3f} (10 bins); AUROC {e['auroc']:.3f}")
    if res["by_hint_count"]:
        print("By number of hints kept (random subsets):")
        print(f"{'hints':>6} {'n':>6} {'R@1':>7} {'@5 m':>7} {'@10 m':>7} {'1-sig':>7} {'2-sig':>7} {'ECE':>6} {'AUROC':>6}")
        for count, r in sorted(res["by_hint_count"].items()):
            est = r["estimate"]
            tw = r["top1_within"]
            print(f"{count:>6} {r['n']:>6} {r['coarse_recall'][1]:7.3f} {tw.get(5.0, float('nan')):7.3f} "
                  f"{tw.get(10.0, float('nan')):7.3f} {100 * est['coverage'][1]:6.1f}% {100 * est['coverage'][2]:6.1f}% "
                  f"{est['ece']:6.3f} {est['auroc']:6.3f}")
    print(metrics.format_calibration(res["calibration"]["top1_right_cell"],
                                     "UGFL calibration, top-1 hypothesis when its cell is right"))
    print(metrics.format_calibration(res["calibration"]["ground_truth_cell"],
                                     "UGFL calibration, fine stage on the ground-truth cell"))
    ms = res["ms_per_query"]
    print(f"[eval] per query: text {ms['text_ms']:.2f} ms, retrieval {ms['retrieval_ms']:.2f} ms, "
          f"fine {ms['fine_ms']:.2f} ms (batched)")


def draw_plots(res: dict, data, args: argparse.Namespace, split: str) -> list[str]:
    folder = plots.ensure_dir(args.plots_dir)
    arr = res["_arrays"]
    out = [plots.plot_recall_curves(arr["dist"], args.top_k, os.path.join(folder, "recall_curves.png"),
                                    title=f"Localisation recall ({split})")]
    scene = args.map_scene
    scenes = sorted(set(arr["true_scenes"]))
    if scene is None:
        scene = scenes[0]
    elif scene not in scenes:
        print(f"[plots] --map_scene {scene} has no queries in this split ({', '.join(scenes)}); "
              f"drawing {scenes[0]}", file=sys.stderr)
        scene = scenes[0]
    sel = np.array([s == scene for s in arr["true_scenes"]])
    bbox = np.stack([np.asarray(c.bbox_w, dtype=np.float64) for c in data.cells if c.scene_name == scene])
    out.append(plots.plot_scene_map(
        bbox, arr["true_xy"][sel], arr["top1_mean"][sel], arr["top1_cov"][sel], arr["right"][sel],
        os.path.join(folder, f"map_{scene}.png"),
        title=f"Scene {scene}: true positions (black), top-1 means with 2-sigma ellipses",
    ))
    out.append(plots.plot_reliability(arr["reliability"], os.path.join(folder, "reliability.png"),
                                      title=f"Reliability of the confidence ({split}, ECE {arr['reliability']['ece']:.3f})"))
    for p in out:
        print(f"[plots] wrote {p}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; a user error is one line on stderr and exit code 2."""
    from spatialoc_ros.cli import user_errors

    with user_errors("python -m spatialoc_ros.evaluation.pipeline"):
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_eval_args(args, parser)
    from spatialoc_ros.cli import check_number
    from spatialoc_ros.models.checkpoint import EXTRA_RANGES

    check_number(parser, "--coarse_top_k", args.coarse_top_k, low=1)
    check_number(parser, "--sigma_scale", args.sigma_scale, *EXTRA_RANGES["sigma_scale"][1:])
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device, note = resolve_device(args.device)
    if note:
        print(f"[device] {note}", file=sys.stderr)

    path_coarse = args.path_coarse or shipped_checkpoint("coarse")
    path_fine = args.path_fine or shipped_checkpoint("fine")
    check_number(parser, "--estimate_top_k", args.estimate_top_k, low=1)
    check_number(parser, "--hint_counts", args.hint_counts, low=1)
    check_number(parser, "--relation_weight", args.relation_weight, *EXTRA_RANGES["relation_weight"][1:])
    check_number(parser, "--selection_weight", args.selection_weight, *EXTRA_RANGES["selection_weight"][1:])
    check_number(parser, "--temperature", args.temperature, *EXTRA_RANGES["temperature"][1:])
    check_number(parser, "--refine_sharpness", args.refine_sharpness, 0.0, 1e3)
    if args.index == "faiss" and not faiss_available():
        parser.error(FAISS_INSTALL_HINT)
    overrides = {k: getattr(args, k) for k in ("sigma_scale", "relation_weight", "selection_weight", "temperature",
                                                 "refine_sharpness")
                 if getattr(args, k) is not None}
    localizer = Localizer.from_checkpoints(path_coarse, path_fine, text_model=args.text_model,
                                           device=str(device), batch_size=args.batch_size, index=args.index,
                                           **overrides)
    if args.temperature is not None:  # an explicit temperature replaces the per-hint-count ones
        localizer.by_hints["temperature_by_hints"] = None
    check_features(args, localizer.coarse_cfg, "coarse")
    check_features(args, localizer.fine_cfg, "fine")

    split = split_name(args)
    data = load_split(resolve_data(args), split, with_direction=False)
    print(f"[eval] {split}: {len(data.poses)} queries, {len(data.cells)} cells ({', '.join(data.scenes)}) "
          f"on {device}; sigma scale {localizer.sigma_scale:.3f}, relation weight {localizer.relation_weight:g}, "
          f"selection weight {localizer.selection_weight:g}, "
          f"temperature {localizer.temperature:.3f}")
    t0 = time.perf_counter()
    localizer.set_map(data.cells, progress=not args.no_progress)
    t_map = time.perf_counter() - t0
    res = evaluate(localizer, data, args, progress=not args.no_progress)
    res["time_s"]["map_embedding"] = t_map
    print_report(res, split)
    plot_files = draw_plots(res, data, args, split) if args.plots_dir else []
    arrays = res.pop("_arrays")
    write_json(args.out_json, {
        "split": split, "scenes": data.scenes, "path_coarse": path_coarse, "path_fine": path_fine,
        "device": str(device), "sigma_scale": localizer.sigma_scale, "plots": plot_files,
        **res,
        "top1_right_cell_share": float(np.mean(arrays["right"])),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
