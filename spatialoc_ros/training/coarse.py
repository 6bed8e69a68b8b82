"""Train the coarse stage (text-to-cell retrieval).

    python -m spatialoc_ros.training.coarse --base_path DATA --fixed_embedding --shuffle \
        --folder_name my_coarse [--epochs 32 --batch_size 64 ...]

Every flag of the seed README's coarse command keeps working. Trains on the train split, validates
retrieval recall@k on the val split after every epoch (all val cells ranked, as in evaluation) and
writes into ``<checkpoint_root>/<folder_name>/``: ``best.pth`` (highest val recall@1, ties broken
by recall@5), ``last.pth`` (with the optimiser state, for ``--resume``), ``metrics.csv`` and
``args.json``. Loss: one ranking loss per similarity level (global, object, relation), summed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from spatialoc_ros.cli import finite_float
from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.evaluation.metrics import coarse_recall
from spatialoc_ros.inference import Localizer
from spatialoc_ros.models.config import RANKING_LOSSES, CoarseConfig
from spatialoc_ros.training import args as targs
from spatialoc_ros.training import distributed, engine
from spatialoc_ros.training.datasets import CellCollator, QueryDataset, UniqueCellBatchSampler, worker_init


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.training.coarse",
        description="Train the SpatiaLoc coarse stage (text-to-cell retrieval).",
    )
    targs.add_data_args(parser)
    targs.add_text_args(parser)
    targs.add_model_args(parser)
    targs.add_optim_args(parser, lr=1e-4, epochs=32, batch_size=64)
    targs.add_runtime_args(parser)
    g = parser.add_argument_group("coarse model")
    g.add_argument("--coarse_embed_dim", type=int, default=256, help="embedding width of every retrieval level")
    g.add_argument("--num_of_hidden_layer", dest="num_hidden_layers", type=int, default=3,
                   help="layers of the hint transformer and of BEOSE")
    g.add_argument("--num_heads", type=int, default=4, help="attention heads of the hint transformer")
    g.add_argument("--pointnet_dim", type=int, default=128, help="width of the PointNet feature")
    g.add_argument("--calibrate", type=str, default="val", choices=("none", "val"),
                   help="after training, fit the geometric level's weight and the cell-probability "
                   "temperature on the val split and store them in best.pth (default val; see "
                   "spatialoc_ros.training.calibrate)")
    g.add_argument("--beose_dim", type=int, default=64, help="width of BEOSE's pair features")
    g.add_argument("--bezier_samples", type=int, default=4, help="points sampled on each Bezier curve")
    g.add_argument("--no_beose", action="store_true",
                   help="ablation: no Bezier Enhanced Object Spatial Encoder (drops the relation level)")
    g.add_argument("--no_fae", action="store_true",
                   help="ablation: no Frequency Aware Encoder (global descriptor = MLP of mean and max pooling)")
    g.add_argument("--fae_highpass_ratio", type=finite_float, default=0.7, help="FAE: share of low frequency bins zeroed")
    g.add_argument("--dropout", type=finite_float, default=0.1, help="dropout in MLPs and transformer layers")
    g = parser.add_argument_group("ranking loss")
    g.add_argument("--ranking_loss", type=str, default=CoarseConfig.ranking_loss, choices=RANKING_LOSSES,
                   help="CCL: complementary contrastive loss; contrastive: symmetric InfoNCE")
    g.add_argument("--temperature", type=finite_float, default=0.05, help="softmax temperature of the ranking loss")
    g.add_argument("--alpha", type=finite_float, default=2.0, help="CCL weight exponent 1/alpha")
    g.add_argument("--level_weights", type=finite_float, nargs=3, default=[1.0, 1.0, 1.0],
                   metavar=("GLOBAL", "OBJECT", "RELATION"),
                   help="weights of the per-level ranking losses (the relation level exists with BEOSE only)")
    g.add_argument("--top_k", type=int, nargs="+", default=[1, 3, 5], help="k of the validation recall@k")
    # (flag, low, high) checked by check_common (NaN is refused at parse time by finite_float)
    parser.set_defaults(stage="coarse", stage_ranges=(
        ("--temperature", 1e-6, None), ("--alpha", 1e-6, None), ("--dropout", 0.0, 0.99),
        ("--fae_highpass_ratio", 0.0, 0.99), ("--level_weights", 0.0, None),
    ))
    return parser


def config_from_args(args: argparse.Namespace, text_dim: int):
    from spatialoc_ros.models.config import CoarseConfig

    return CoarseConfig(
        text_model=args.text_model,
        text_dim=int(text_dim),
        embed_dim=args.coarse_embed_dim,
        use_features=list(args.use_features),
        num_points=args.num_points,
        max_objects=args.max_objects,
        pointnet_dim=args.pointnet_dim,
        pointnet_path=args.pointnet_path,
        pointnet_arch=args.pointnet_arch,
        num_hidden_layers=args.num_hidden_layers,
        num_heads=args.num_heads,
        beose_dim=args.beose_dim,
        bezier_samples=args.bezier_samples,
        use_beose=not args.no_beose,
        use_fae=not args.no_fae,
        fae_highpass_ratio=args.fae_highpass_ratio,
        ranking_loss=args.ranking_loss,
        temperature=args.temperature,
        alpha=args.alpha,
        dropout=args.dropout,
    )


LEVELS = ("global", "object", "relation")


def ranking_terms(model, text_emb, cell_emb, cfg, weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """One ranking loss per similarity level (times its weight); the diagonal pairs are the positives."""
    from spatialoc_ros.models import losses

    sims = model.similarity(text_emb, cell_emb)
    terms = {}
    if cfg.ranking_loss == "CCL":
        summaries = model.level_summaries(text_emb, cell_emb)
        for level, sim in sims.items():
            t, c = summaries[level]
            terms[level] = losses.ccl_loss(sim, t, c, temperature=cfg.temperature, alpha=cfg.alpha)
    else:
        for level, sim in sims.items():
            terms[level] = losses.info_nce_loss(sim, temperature=cfg.temperature)
    if weights is not None:
        w = dict(zip(LEVELS, weights))
        terms = {level: w[level] * t for level, t in terms.items()}
    return terms


@torch.no_grad()
def validate(model, cfg, hint_encoder, data, device, ks: Sequence[int], max_queries: Optional[int],
             progress: bool, max_tokens: int) -> dict[str, float]:
    """Retrieval recall@k on ``data`` (all of its cells ranked), through the inference path."""
    poses = data.poses
    if max_queries is not None and len(poses) > max_queries:
        poses = [poses[i] for i in np.linspace(0, len(poses) - 1, max_queries).astype(int)]
    loc = Localizer(model, cfg, device=device, text_encoders={"coarse": hint_encoder}, max_tokens=max_tokens)
    loc.set_map(data.cells, progress=progress)
    ranked = loc.rank([query_text(p) for p in poses], top_k=min(max(ks), len(data.cells)))
    ids = [[data.cells[i].id for i in row] for row in ranked]
    recall = coarse_recall(ids, [p.cell_id for p in poses], ks)
    model.train()
    return {f"val_recall@{k}": v for k, v in recall.items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; a user error is one line on stderr and exit code 2."""
    from spatialoc_ros.cli import user_errors

    with user_errors("python -m spatialoc_ros.training.coarse"):
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    targs.check_common(args, parser)
    try:
        return train(args)
    except engine.NonFiniteLossError as err:
        print(f"[train] ERROR: {err}", file=sys.stderr)
        return 3


def gather_embeddings(run: distributed.Distributed, text, cells):
    """The global batch's text and cell embeddings (every process's rows in rank order, i.e. the
    single-process batch) from this process's, autograd-aware: the in-batch ranking losses then
    see every other cell of the global batch as a negative. Unchanged for a single process."""
    def gather(emb):
        return dataclasses.replace(emb, **{f.name: run.gather_rows(getattr(emb, f.name))
                                           for f in dataclasses.fields(emb) if getattr(emb, f.name) is not None})

    return gather(text), gather(cells)


def train(args: argparse.Namespace) -> int:
    """Train as one process, or as one of torchrun's processes (see training.distributed)."""
    return engine.run_trainer(args, _train)


def _train(args: argparse.Namespace, device: torch.device, run: distributed.Distributed) -> int:
    from spatialoc_ros.models.builder import build_coarse_model
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
        return build_coarse_model(cfg, text_encoder.dim), cfg

    model, cfg, optimizer, scheduler, start_epoch, best, history = engine.prepare_model(
        args, "coarse", text_encoder.dim, device, build_new, initial_best=[-1.0, -1.0])
    forward = run.data_parallel(model)
    run.reseed_process(args.seed)

    train_data = load_split(base_path, "train", with_direction=False)
    val_data = load_split(base_path, "val", with_direction=False)
    dataset = QueryDataset(train_data, augment=not args.no_pc_augment, seed=run.rank_seed(args.seed),
                           hint_dropout_min=args.hint_dropout_min, colour_dropout=args.colour_dropout)
    sampler = run.shard_batches(
        UniqueCellBatchSampler(dataset.cell_ids, args.batch_size, shuffle=args.shuffle, seed=args.seed))
    collate = CellCollator(args.max_objects if not args.resume else cfg.max_objects,
                           args.num_points if not args.resume else cfg.num_points,
                           random_points=not args.no_pc_augment,
                           jitter=0.0 if args.no_pc_augment else args.jitter, seed=run.rank_seed(args.seed))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                        worker_init_fn=worker_init if args.num_workers > 0 else None)
    print(f"[train] coarse: {len(dataset)} train queries ({len(train_data.cells)} cells), "
          f"{len(val_data.poses)} val queries ({len(val_data.cells)} cells); "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters; run folder {folder}"
          f"{run.batch_note(args.batch_size)}")
    csv_log = engine.MetricsCSV(f"{folder}/{engine.METRICS_NAME}", resume=bool(args.resume)) if run.is_main else None

    def step(batch):
        hints = hint_encoder.batch(batch.hints, device)
        cells = batch.cells.to(device)

        def loss(net):
            text, cell_emb = net.encode_text(hints), net.encode_cells(cells)
            if run.enabled:  # every process computes the ranking loss of the whole global batch
                text, cell_emb = gather_embeddings(run, text, cell_emb)
            return ranking_terms(net, text, cell_emb, cfg, args.level_weights)

        return forward(loss), {}, {"samples": len(batch.hints)}

    for epoch in range(start_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.reseed(run.rank_seed(args.seed * 1000 + epoch))
        collate.reseed(run.rank_seed(args.seed * 1000 + epoch + 500))
        lr = optimizer.param_groups[0]["lr"]
        total = len(sampler) if args.max_batches is None else min(len(sampler), args.max_batches)
        ep = engine.train_epoch(model, loader, step, optimizer, args, epoch, total,
                                f"coarse epoch {epoch}/{args.epochs}", progress, run)
        train_time, n_samples = ep.seconds, ep.samples
        scheduler.step()
        if run.is_main:  # validation, metrics and checkpoints; the other processes wait below
            t1 = time.perf_counter()
            val = validate(model, cfg, hint_encoder, val_data, device, args.top_k, args.max_val_queries,
                           progress, args.max_tokens)
            val_time = time.perf_counter() - t1
            row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in ep.means.items()}, **val,
                   "train_samples_per_s": n_samples / max(train_time, 1e-9), "train_time_s": train_time,
                   "val_time_s": val_time}
            csv_log.write(row)
            key = [val.get(f"val_recall@{args.top_k[0]}", 0.0), val.get(f"val_recall@{max(args.top_k)}", 0.0)]
            improved = key > best
            if improved:
                best = key
            history[str(epoch)] = {k: float(v) for k, v in row.items()}
            common = {"max_tokens": args.max_tokens, "epoch": epoch, "val": {k: float(v) for k, v in val.items()},
                      "selection": f"val recall@{args.top_k[0]} (ties: recall@{max(args.top_k)})"}
            if improved:
                engine.save_run_checkpoint(f"{folder}/{engine.BEST_NAME}", model, cfg, "coarse", common)
            engine.save_last(f"{folder}/{engine.LAST_NAME}", model, cfg, "coarse",
                             {**common, "best_metric": [float(b) for b in best], "history": history},
                             optimizer, scheduler)
            vals = " ".join(f"{k.replace('val_', '')} {v:.3f}" for k, v in val.items())
            print(f"[train] epoch {epoch}: loss {row['train_loss']:.4f} | val {vals} | "
                  f"{train_time:.0f}+{val_time:.0f} s{' | best' if improved else ''}", flush=True)
        run.barrier()
    if run.is_main:
        if args.calibrate == "val":
            from spatialoc_ros.models.checkpoint import load_checkpoint
            from spatialoc_ros.training import calibrate

            best_path = f"{folder}/{engine.BEST_NAME}"
            best_model, best_cfg, _ = load_checkpoint(best_path, "coarse", device)
            loc = Localizer(best_model, best_cfg, device=device, max_tokens=args.max_tokens,
                            text_encoders={"coarse": hint_encoder})
            result = calibrate.calibrate_localizer(loc, val_data, progress=progress)
            calibrate.store_calibration(best_path, result)
            print(calibrate.format_result(result).replace("[calibrate]", "[train] calibration on"))
        print(f"[train] done: best val recall@{args.top_k[0]} {best[0]:.3f}; checkpoints in {folder}")
    run.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
