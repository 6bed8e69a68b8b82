"""Evaluate the coarse stage (text-to-cell retrieval) on the val or test split.

    python -m spatialoc_ros.evaluation.coarse --base_path DATA --path_coarse checkpoints/RUN/best.pth \
        [--use_test_set] [--top_k 1 3 5] [--out_json coarse.json]

Every cell of the split is ranked for every query (through :class:`spatialoc_ros.inference.Localizer`,
the path the ROS node uses). Prints retrieval recall@k and, for reference, the localisation recall
when each retrieved cell predicts its centre.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.evaluation import metrics
from spatialoc_ros.evaluation.args import (
    add_common_eval_args, check_eval_args, check_features, split_name, write_json,
)
from spatialoc_ros.inference import Localizer, resolve_device, shipped_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.evaluation.coarse",
        description="Coarse retrieval recall@k of a SpatiaLoc coarse checkpoint on KITTI360Pose-style data.",
    )
    add_common_eval_args(parser, default_top_k=[1, 3, 5])
    return parser


def resolve_data(args: argparse.Namespace) -> str:
    if args.base_path is not None:
        return args.base_path
    from spatialoc_ros.data.synthetic import ensure_default_city

    path = ensure_default_city(log=print)
    print(f"[data] no --base_path: using the default synthetic city at {path}")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; a user error is one line on stderr and exit code 2."""
    from spatialoc_ros.cli import user_errors

    with user_errors("python -m spatialoc_ros.evaluation.coarse"):
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_eval_args(args, parser)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device, note = resolve_device(args.device)
    if note:
        print(f"[device] {note}", file=sys.stderr)
    from spatialoc_ros.models.checkpoint import load_checkpoint

    path_coarse = args.path_coarse or shipped_checkpoint("coarse")
    model, cfg, extra = load_checkpoint(path_coarse, "coarse", device)
    check_features(args, cfg, "coarse")
    localizer = Localizer(model, cfg, device=device, text_model=args.text_model,
                          max_tokens=int((extra or {}).get("max_tokens", 32)), batch_size=args.batch_size)

    split = split_name(args)
    data = load_split(resolve_data(args), split, with_direction=False)
    poses = data.poses[: args.max_queries] if args.max_queries else data.poses
    texts = [query_text(p) for p in poses]
    print(f"[eval] {split}: {len(poses)} queries, {len(data.cells)} cells ({', '.join(data.scenes)}) on {device}")

    t0 = time.perf_counter()
    localizer.set_map(data.cells, progress=not args.no_progress)
    t_map = time.perf_counter() - t0
    kmax = min(max(args.top_k), len(data.cells))
    t0 = time.perf_counter()
    ranked = localizer.rank(texts, top_k=kmax, progress=not args.no_progress)  # (Q, kmax)
    t_rank = time.perf_counter() - t0

    ids = [[data.cells[i].id for i in row] for row in ranked]
    recall = metrics.coarse_recall(ids, [p.cell_id for p in poses], args.top_k)
    centres = np.array([[data.cells[i].get_center()[0:2] for i in row] for row in ranked])
    scenes = [[data.cells[i].scene_name for i in row] for row in ranked]
    dist = metrics.localization_distances(centres, scenes, np.array([p.pose_w for p in poses]),
                                          [p.scene_name for p in poses])
    loc = metrics.localization_recall(dist, args.top_k, args.threshs)

    print(metrics.format_coarse_table(recall, f"Coarse retrieval recall ({split}, {len(poses)} queries, "
                                              f"{len(data.cells)} cells)"))
    print(metrics.format_localization_table(loc, "Localisation recall at the retrieved cells' centres"))
    print(f"[eval] map embedding {t_map:.1f} s, retrieval {1e3 * t_rank / max(len(poses), 1):.2f} ms/query")
    write_json(args.out_json, {
        "split": split, "scenes": data.scenes, "num_queries": len(poses), "num_cells": len(data.cells),
        "path_coarse": path_coarse, "device": str(device),
        "coarse_recall": recall, "localization_recall_cell_centres": loc,
        "time_s": {"map_embedding": t_map, "retrieval": t_rank},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
