"""Train the fine stage (UGFL: a 2-D Gaussian position inside the cell).

    python -m spatialoc_ros.training.fine --base_path DATA --fixed_embedding --shuffle \
        --regressor_cell all --pmc_prob 0.5 --folder_name my_fine [--fine_loss nll --beta 0.5 ...]

Every flag of the seed README's fine command keeps working. The model sees a query and the cell it
was described in (or, with ``--pmc_prob``, a neighbouring clone of it); the target is the position
normalised to that cell's box (``--regressor_cell all``). Validation runs the fine stage on every
val query's ground-truth cell and reports the mean error (m), the mean Gaussian NLL (m) and the
1/2/3-sigma coverage. ``best.pth`` is chosen by the lowest val NLL (``--fine_loss nll``) or the lowest
val mean error (``--fine_loss mse``; override with ``--select_by``).

``--calibrate_sigma val`` fits, after training, one scalar s on the val split so that the covariance
s^2 * Sigma has the maximum likelihood (closed form: s^2 = mean(d^2) / 2, d the Mahalanobis distance
under Sigma) and stores it in best.pth's ``extra['sigma_scale']``; the inference path applies it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from spatialoc_ros.cli import finite_float
from spatialoc_ros.models.config import FineConfig
from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.evaluation.metrics import calibration_summary, mahalanobis_sq
from spatialoc_ros.inference import Localizer
from spatialoc_ros.training import args as targs
from spatialoc_ros.training import distributed, engine
from spatialoc_ros.training.datasets import CellCollator, QueryDataset, UniqueCellBatchSampler, worker_init


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.training.fine",
        description="Train the SpatiaLoc fine stage (UGFL Gaussian fine localiser).",
    )
    targs.add_data_args(parser)
    targs.add_text_args(parser)
    targs.add_model_args(parser)
    targs.add_optim_args(parser, lr=3e-4, epochs=32, batch_size=32)
    targs.add_runtime_args(parser)
    g = parser.add_argument_group("fine model")
    g.add_argument("--fine_embed_dim", type=int, default=128, help="token width of the cross-attention layers")
    g.add_argument("--fine_num_layers", "--fine_num_decoder_layers", dest="fine_num_layers", type=int, default=2,
                   help="cross-attention blocks (hints <-> objects)")
    g.add_argument("--fine_num_heads", "--fine_num_decoder_heads", dest="fine_num_heads", type=int, default=4,
                   help="attention heads")
    g.add_argument("--pointnet_dim", type=int, default=128, help="width of the PointNet feature")
    g.add_argument("--mean_head", type=str, default="anchor", choices=("anchor", "direct"),
                   help="anchor: hints attend to object centres plus learned offsets; direct: MLP")
    g.add_argument("--min_std", type=finite_float, default=0.005, help="floor on the predicted std, cell units")
    g.add_argument("--dropout", type=finite_float, default=0.1, help="dropout in MLPs and attention layers")
    g.add_argument("--regressor_cell", type=str, default="all", choices=("all",),
                   help="regression target: 'all' = the position normalised to the whole cell box")
    g = parser.add_argument_group("fine loss and map cloning")
    g.add_argument("--fine_loss", type=str, default="nll", choices=("nll", "mse"),
                   help="nll: Gaussian negative log-likelihood (UGFL); mse: mean only (ablation)")
    g.add_argument("--beta", type=finite_float, default=0.0,
                   help="beta-NLL exponent: each sample's NLL is weighted by stop_grad(det Sigma)^(beta/2) (0 = NLL)")
    g.add_argument("--matching_weight", type=finite_float, default=FineConfig.matching_weight,
                   help="weight of the anchor head's hint->object matching ranking loss (in-batch cells "
                   "as negatives; ignored by --mean_head direct). Default 0 (off): on the synthetic "
                   "default city 0.2 gave a val mean error of 3.8 m against 3.1 m without it")
    g.add_argument("--pmc_prob", type=finite_float, default=0.0,
                   help="probability of prototype-based map cloning (swap the cell for a neighbour "
                   "from direction/<scene>.json)")
    g.add_argument("--pmc_max_missing", type=int, default=1,
                   help="described instances allowed to be missing in a cloned cell")
    g.add_argument("--select_by", type=str, default="auto", choices=("auto", "nll", "error"),
                   help="val metric that picks best.pth (auto: nll for --fine_loss nll, error for mse)")
    g.add_argument("--calibrate_sigma", type=str, default="none", choices=("none", "val"),
                   help="val: fit one scalar on Sigma by maximum likelihood on the val split after "
                   "training and store it in best.pth")
    # (flag, low, high) checked by check_common (NaN is refused at parse time by finite_float)
    parser.set_defaults(stage="fine", stage_ranges=(
        ("--min_std", 1e-6, 1.0), ("--dropout", 0.0, 0.99), ("--beta", 0.0, 1.0),
        ("--matching_weight", 0.0, None), ("--pmc_prob", 0.0, 1.0),
    ))
    return parser


def config_from_args(args: argparse.Namespace, text_dim: int):
    from spatialoc_ros.models.config import FineConfig

    return FineConfig(
        text_model=args.text_model,
        text_dim=int(text_dim),
        embed_dim=args.fine_embed_dim,
        use_features=list(args.use_features),
        num_points=args.num_points,
        max_objects=args.max_objects,
        pointnet_dim=args.pointnet_dim,
        pointnet_path=args.pointnet_path,
        pointnet_arch=args.pointnet_arch,
        num_layers=args.fine_num_layers,
        num_heads=args.fine_num_heads,
        mean_head=args.mean_head,
        fine_loss=args.fine_loss,
        beta=args.beta,
        matching_weight=args.matching_weight,
        min_std=args.min_std,
        regressor_cell=args.regressor_cell,
        dropout=args.dropout,
    )


#: Why the anchor head's matching loss is refused under torchrun (see :func:`uses_matching_loss`).
MATCHING_NOT_DISTRIBUTED = (
    "the hint-object matching loss takes the other cells of the batch as negatives inside the model, "
    "which sees one process's slice only under torchrun; train it as one process, or pass "
    "--matching_weight 0 (the default)")


def uses_matching_loss(cfg) -> bool:
    """Whether ``cfg`` (a FineConfig or the parsed flags) trains the anchor head's matching loss."""
    return cfg.mean_head == "anchor" and cfg.matching_weight > 0


def loss_terms(gaussian, matching: Optional[torch.Tensor], target: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
    """The training loss as named terms: the position term of ``cfg.fine_loss`` (cell units) plus,
    for the anchor head, ``cfg.matching_weight`` x the hint->object matching ranking loss."""
    from spatialoc_ros.models import losses

    if cfg.fine_loss == "nll":
        terms = {"nll": losses.gaussian_nll(gaussian.mean, gaussian.scale_tril, target, beta=cfg.beta)}
    else:
        terms = {"mse": losses.mse_loss(gaussian.mean, target)}
    if matching is not None and cfg.matching_weight > 0:
        terms["matching"] = cfg.matching_weight * losses.fine_matching_loss(matching)
    return terms


@torch.no_grad()
def predict_val(model, cfg, hint_encoder, data, device, max_queries: Optional[int], max_tokens: int):
    """Fine stage on each val query's ground-truth cell -> (mean (N, 2) m, cov (N, 2, 2) m^2, true (N, 2))."""
    poses = data.poses
    if max_queries is not None and len(poses) > max_queries:
        poses = [poses[i] for i in np.linspace(0, len(poses) - 1, max_queries).astype(int)]
    loc = Localizer(None, None, model, cfg, device=device, text_encoders={"fine": hint_encoder}, max_tokens=max_tokens)
    loc.set_map(data.cells, progress=False)
    hyps = loc.predict_in_cells([query_text(p) for p in poses], [p.cell_id for p in poses])
    model.train()
    return (np.array([h.mean_xy for h in hyps]), np.array([h.cov_xy for h in hyps]),
            np.array([np.asarray(p.pose_w, dtype=np.float64)[0:2] for p in poses]))


def val_metrics(mean, cov, true) -> dict[str, float]:
    s = calibration_summary(mean, cov, true)
    return {"val_mean_error_m": s["mean_error"], "val_median_error_m": s["median_error"],
            "val_nll_m": s["mean_nll"], "val_cover1": s["coverage"][1], "val_cover2": s["coverage"][2],
            "val_cover3": s["coverage"][3]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; a user error is one line on stderr and exit code 2."""
    from spatialoc_ros.cli import user_errors

    with user_errors("python -m spatialoc_ros.training.fine"):
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    targs.check_common(args, parser)
    if not 0.0 <= args.pmc_prob <= 1.0:
        parser.error("--pmc_prob must be in [0, 1]")
    if not 0.0 <= args.beta <= 1.0:
        parser.error("--beta must be in [0, 1]")
    if targs.run_topology(parser).distributed and args.resume is None and uses_matching_loss(args):
        parser.error(f"--matching_weight {args.matching_weight:g}: {MATCHING_NOT_DISTRIBUTED}")
    try:
        return train(args)
    except engine.NonFiniteLossError as err:
        print(f"[train] ERROR: {err}", file=sys.stderr)
        return 3


def train(args: argparse.Namespace) -> int:
    """Train as one process, or as one of torchrun's processes (see training.distributed)."""
    return engine.run_trainer(args, _train)


def _train(args: argparse.Namespace, device: torch.device, run: distributed.Distributed) -> int:
    from spatialoc_ros.cli import UserError
    from spatialoc_ros.models.builder import build_fine_model
    from spatialoc_ros.models.checkpoint import load_checkpoint
    from spatialoc_ros.models.text_encoder import FrozenTextEncoder, HintEncoder

    base_path = run.main_first(lambda: engine.resolve_base_path(args))
    folder = engine.run_folder(args)
    if run.is_main:
        engine.write_run_args(folder, args, run.world_size)
    progress = not args.no_progress and run.is_main

    text_encoder = FrozenTextEncoder(args.text_model, device=str(device), max_tokens=args.max_tokens)
    hint_encoder = HintEncoder(text_encoder, cache=args.fixed_embedding)

    def build_new():
        cfg = config_from_args(args, text_encoder.dim)
        return build_fine_model(cfg, text_encoder.dim), cfg

    model, cfg, optimizer, scheduler, start_epoch, best, history = engine.prepare_model(
        args, "fine", text_encoder.dim, device, build_new, initial_best=[-math.inf])
    if run.enabled and uses_matching_loss(cfg):
        raise UserError(f"matching_weight {cfg.matching_weight:g} (from {args.resume or 'the flags'}): "
                        f"{MATCHING_NOT_DISTRIBUTED}")
    forward = run.data_parallel(model)
    run.reseed_process(args.seed)
    select_by = args.select_by if args.select_by != "auto" else ("nll" if cfg.fine_loss == "nll" else "error")
    select_key = "val_nll_m" if select_by == "nll" else "val_mean_error_m"

    train_data = load_split(base_path, "train", with_direction=args.pmc_prob > 0)
    val_data = load_split(base_path, "val", with_direction=False)
    dataset = QueryDataset(train_data, augment=not args.no_pc_augment, pmc_prob=args.pmc_prob,
                           max_missing=args.pmc_max_missing, seed=run.rank_seed(args.seed),
                           hint_dropout_min=args.hint_dropout_min, colour_dropout=args.colour_dropout)
    collate = CellCollator(cfg.max_objects, cfg.num_points, random_points=not args.no_pc_augment,
                           jitter=0.0 if args.no_pc_augment else args.jitter, seed=run.rank_seed(args.seed))
    # Distinct cells per batch: the matching loss takes the other cells of a batch as negatives.
    sampler = run.shard_batches(
        UniqueCellBatchSampler(dataset.cell_ids, args.batch_size, shuffle=args.shuffle, seed=args.seed))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                        worker_init_fn=worker_init if args.num_workers > 0 else None)
    print(f"[train] fine: {len(dataset)} train queries, {len(val_data.poses)} val queries; map cloning "
          f"p={dataset.pmc_prob:g}; {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
          f"parameters; best by {select_key}; run folder {folder}{run.batch_note(args.batch_size)}")
    csv_log = engine.MetricsCSV(f"{folder}/{engine.METRICS_NAME}", resume=bool(args.resume)) if run.is_main else None

    def step(batch):
        hints = hint_encoder.batch(batch.hints, device)
        target = batch.targets.to(device)
        cells = batch.cells.to(device)

        def loss(net):
            gaussian, matching = net.forward_with_matching(hints, cells)
            terms = loss_terms(gaussian, matching, target, cfg)
            err = torch.linalg.vector_norm(gaussian.mean.detach() - target, dim=-1).mean()
            return terms, err

        terms, err = forward(loss)
        # The loss terms are means over this process's samples; scaled by its share of the global
        # batch, their average over the processes (what DDP's gradient averaging optimises) is
        # the single-process mean, also when tail slices differ in size.
        share = run.sample_share(len(batch.hints))
        if share is not None:
            terms, err = {k: v * share for k, v in terms.items()}, err * share
        return terms, {"error_cells": err}, {"samples": len(batch.hints), "cloned": int(batch.cloned)}

    for epoch in range(start_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.reseed(run.rank_seed(args.seed * 1000 + epoch))
        collate.reseed(run.rank_seed(args.seed * 1000 + epoch + 500))
        lr = optimizer.param_groups[0]["lr"]
        total = len(sampler) if args.max_batches is None else min(len(sampler), args.max_batches)
        ep = engine.train_epoch(model, loader, step, optimizer, args, epoch, total,
                                f"fine epoch {epoch}/{args.epochs}", progress, run)
        train_time, n_samples, n_cloned = ep.seconds, ep.samples, ep.counters.get("cloned", 0)
        scheduler.step()
        if run.is_main:  # validation, metrics and checkpoints; the other processes wait below
            t1 = time.perf_counter()
            val = val_metrics(*predict_val(model, cfg, hint_encoder, val_data, device, args.max_val_queries,
                                           args.max_tokens))
            val_time = time.perf_counter() - t1
            row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in ep.means.items()},
                   "train_cloned_share": n_cloned / max(n_samples, 1), **val,
                   "train_samples_per_s": n_samples / max(train_time, 1e-9), "train_time_s": train_time,
                   "val_time_s": val_time}
            csv_log.write(row)
            score = -val[select_key] if np.isfinite(val[select_key]) else -math.inf
            improved = [score] > best
            if improved:
                best = [score]
            history[str(epoch)] = {k: float(v) for k, v in row.items()}
            common = {"max_tokens": args.max_tokens, "epoch": epoch, "sigma_scale": 1.0,
                      "val": {k: float(v) for k, v in val.items()}, "selection": select_key}
            if improved:
                engine.save_run_checkpoint(f"{folder}/{engine.BEST_NAME}", model, cfg, "fine", common)
            engine.save_last(f"{folder}/{engine.LAST_NAME}", model, cfg, "fine",
                             {**common, "best_metric": [float(b) for b in best], "history": history},
                             optimizer, scheduler)
            print(f"[train] epoch {epoch}: loss {row['train_loss']:.4f} | val error {val['val_mean_error_m']:.2f} m, "
                  f"NLL {val['val_nll_m']:.3f}, 1/2-sigma {100 * val['val_cover1']:.0f}/{100 * val['val_cover2']:.0f}% | "
                  f"{train_time:.0f}+{val_time:.0f} s{' | best' if improved else ''}", flush=True)
        run.barrier()

    if run.is_main:
        if args.calibrate_sigma == "val":
            best_path = f"{folder}/{engine.BEST_NAME}"
            best_model, best_cfg, best_extra = load_checkpoint(best_path, "fine", device)
            mean, cov, true = predict_val(best_model, best_cfg, hint_encoder, val_data, device, None,
                                          args.max_tokens)
            scale = math.sqrt(float(np.mean(mahalanobis_sq(mean, cov, true))) / 2.0)
            after = val_metrics(mean, cov * scale**2, true)
            engine.save_run_checkpoint(best_path, best_model, best_cfg, "fine",
                                       {**best_extra, "sigma_scale": scale,
                                        "val_calibrated": {k: float(v) for k, v in after.items()}})
            print(f"[train] sigma calibration on val: scale {scale:.3f}; 1/2/3-sigma coverage "
                  f"{100 * after['val_cover1']:.1f}/{100 * after['val_cover2']:.1f}/{100 * after['val_cover3']:.1f}%, "
                  f"NLL {after['val_nll_m']:.3f}")
        print(f"[train] done: best {select_key} {-best[0]:.3f}; checkpoints in {folder}")
    run.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
