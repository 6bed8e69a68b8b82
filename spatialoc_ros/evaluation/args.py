"""Flags shared by ``python -m spatialoc_ros.evaluation.coarse`` and ``...evaluation.pipeline``.

The seed README's evaluation / test commands run unchanged: ``--base_path --use_features
--no_pc_augment --no_pc_augment_fine --hungging_model --fixed_embedding --path_coarse --path_fine
--use_test_set``. Evaluation never augments, so the two ``--no_pc_augment*`` flags are accepted and
change nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import numpy as np

from spatialoc_ros.cli import device_name, finite_float

from spatialoc_ros.models.config import OBJECT_FEATURES as FEATURES  # noqa: E402  (one source)


def add_common_eval_args(parser: argparse.ArgumentParser, default_top_k: list[int]) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--base_path", type=str, default=None,
                   help="KITTI360Pose folder (cells/, poses/); default: the synthetic default city")
    g.add_argument("--use_test_set", action="store_true",
                   help="evaluate on the test scenes instead of the validation scene")
    g.add_argument("--split", type=str, default=None, choices=("train", "val", "test", "all"),
                   help="evaluate on this split (overrides --use_test_set)")
    g.add_argument("--max_queries", type=int, default=None,
                   help="debug: evaluate the first N queries only (all cells are still ranked)")
    g.add_argument("--use_features", nargs="+", default=None, choices=FEATURES, metavar="FEATURE",
                   help="accepted for the seed's commands; must match the features the checkpoint was "
                   "trained with (the checkpoint decides)")
    g.add_argument("--no_pc_augment", action="store_true",
                   help="accepted for the seed's commands; evaluation never augments")
    g.add_argument("--no_pc_augment_fine", action="store_true",
                   help="accepted for the seed's commands; evaluation never augments")

    g = parser.add_argument_group("models")
    g.add_argument("--path_coarse", type=str, default=None,
                   help="coarse checkpoint (default: the one shipped in spatialoc_ros/resources/checkpoints)")
    g.add_argument("--text_model", "--hungging_model", dest="text_model", type=str, default=None,
                   help="language model override ('minilm' or a local folder); default: the one named in "
                   "the checkpoint. --hungging_model is the seed's spelling")
    g.add_argument("--fixed_embedding", action="store_true",
                   help="accepted for the seed's commands; hint sentences are always encoded once and cached")

    g = parser.add_argument_group("metrics and output")
    g.add_argument("--top_k", type=int, nargs="+", default=default_top_k,
                   help=f"k of the recall tables (default {' '.join(map(str, default_top_k))})")
    g.add_argument("--threshs", type=finite_float, nargs="+", default=[5.0, 10.0, 15.0],
                   help="distance thresholds in metres (default 5 10 15)")
    g.add_argument("--out_json", type=str, default=None, metavar="FILE", help="write every number to FILE")
    g.add_argument("--plots_dir", type=str, default=None, metavar="DIR", help="write the PNG figures to DIR")

    g = parser.add_argument_group("runtime")
    g.add_argument("--device", type=device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N}", help="auto = CUDA when available")
    g.add_argument("--batch_size", type=int, default=64, help="queries / cells per forward pass")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")


def check_eval_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.base_path is not None and not os.path.isdir(args.base_path):
        parser.error(f"--base_path {args.base_path} is not a folder")
    for name in ("path_coarse", "path_fine"):
        path = getattr(args, name, None)
        if path is not None and not os.path.isfile(path):
            parser.error(f"--{name} {path}: no such file")
    from spatialoc_ros.cli import check_number, check_output_dir, check_output_file

    check_number(parser, "--top_k", args.top_k, low=1)
    check_number(parser, "--threshs", args.threshs, low=0, low_open=True)
    check_number(parser, "--batch_size", args.batch_size, low=1)
    check_number(parser, "--max_queries", args.max_queries, low=1)
    check_number(parser, "--threads", args.threads, low=1)
    check_output_file(parser, "--out_json", args.out_json)
    check_output_dir(parser, "--plots_dir", args.plots_dir)
    args.top_k = sorted(set(args.top_k))
    args.threshs = sorted(set(args.threshs))


def split_name(args: argparse.Namespace) -> str:
    if args.split is not None:
        return args.split
    return "test" if args.use_test_set else "val"


def check_features(args: argparse.Namespace, cfg, what: str) -> None:
    """--use_features, when given, must name the checkpoint's features (any order)."""
    if args.use_features is not None and set(args.use_features) != set(cfg.use_features):
        raise SystemExit(
            f"error: --use_features {' '.join(args.use_features)} differs from the features the {what} "
            f"checkpoint was trained with ({' '.join(cfg.use_features)}); drop the flag or pass those"
        )


def to_jsonable(obj):
    """Numbers and containers with str keys, for json.dump (NaN / inf become None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Optional[str], data: dict) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(data), f, indent=2)
    print(f"[eval] numbers written to {path}", file=sys.stderr)
