"""Pieces shared by the coarse and fine training loops: run folder, seeding, optimiser and schedule,
the one epoch loop (:func:`train_epoch`), the non-finite-loss guard, the per-epoch metrics CSV and
resumable checkpoints."""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from spatialoc_ros.inference import resolve_device
from spatialoc_ros.training import distributed
from spatialoc_ros.training.distributed import Topology, process_device, process_note
from spatialoc_ros.training.memory import enable_huge_pages

if TYPE_CHECKING:
    from spatialoc_ros.training.distributed import Distributed

BEST_NAME = "best.pth"
LAST_NAME = "last.pth"
METRICS_NAME = "metrics.csv"


class NonFiniteLossError(RuntimeError):
    """A loss term or the gradient norm became NaN / inf; training cannot go on."""


@dataclass
class EpochResult:
    """What one training epoch measured: mean of every logged term, batches, samples, seconds,
    and the sums of the per-batch counters a step returned."""

    means: dict
    batches: int
    samples: int
    seconds: float
    counters: dict


def train_epoch(model: torch.nn.Module, loader, step: Callable, optimizer: torch.optim.Optimizer,
                args: argparse.Namespace, epoch: int, total: int, desc: str, progress: bool,
                dist: Optional["Distributed"] = None) -> EpochResult:
    """One epoch of either trainer: for every batch, ``step(batch)`` returns (loss terms (tensors
    summed into the loss), logged extras (tensors / floats, not optimised), counters (ints:
    'samples' and any other)); the loss is checked for non-finite values, back-propagated, the
    gradient clipped (``args.grad_clip``) and checked, the optimiser stepped. Stops after
    ``args.max_batches`` batches when set. Raises SystemExit when no batch ran.

    In a distributed run (``dist``) each process's terms and extras are its share of the
    global-batch value (the mean over the processes is the global value, which is what DDP's
    gradient averaging optimises): they are averaged over the processes before the check and the
    log, so every process stops on the same batch; the counters are summed at the end."""
    from tqdm.auto import tqdm

    model.train()
    lr = optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    counters: dict[str, int] = {}
    n_batches = 0
    bar = tqdm(loader, total=total, desc=desc, disable=not progress, leave=False)
    for i, batch in enumerate(bar, start=1):
        terms, extras, counts = step(batch)
        loss = sum(terms.values())
        logged = {"loss": loss, **terms, **extras}
        if dist is not None:
            logged = dist.mean_over_ranks(logged)
        check_finite({**{k: logged[k] for k in terms}, "total": logged["loss"]}, epoch, i, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_check(model, args.grad_clip, epoch, i, lr)
        optimizer.step()
        for k, v in logged.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        for k, v in counts.items():
            counters[k] = counters.get(k, 0) + int(v)
        n_batches += 1
        bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}")
        if args.max_batches is not None and i >= args.max_batches:
            break
    bar.close()
    if n_batches == 0:
        raise SystemExit("error: no training batch (too few train queries for --batch_size?)")
    if dist is not None:
        counters = dist.sum_over_ranks(counters)
    return EpochResult({k: v / n_batches for k, v in sums.items()}, n_batches, counters.get("samples", 0),
                       time.perf_counter() - t0, counters)


def check_finite(terms: dict[str, torch.Tensor], epoch: int, batch: int, lr: float) -> None:
    """Raise :class:`NonFiniteLossError` naming the epoch, batch and term when one is not finite."""
    for name, value in terms.items():
        if not bool(torch.isfinite(value.detach()).all()):
            raise NonFiniteLossError(
                f"non-finite loss in epoch {epoch}, batch {batch}: term '{name}' = "
                f"{value.detach().float().mean().item()} (learning rate {lr:g}). Training stopped; "
                "lower --learning_rate, check the data, or --resume from the last good last.pth."
            )


def setup_runtime(args: argparse.Namespace, topology: Topology = Topology()) -> torch.device:
    """Threads, seeds and device from the parsed flags (in a distributed run on CUDA, this
    process's cuda:LOCAL_RANK); prints a note when the device changed. Huge pages for large CPU
    tensors first (:mod:`spatialoc_ros.training.memory`: before any big tensor exists)."""
    print(f"[memory] {enable_huge_pages()}")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device, note = resolve_device(args.device)
    device = process_device(device, topology)
    if note:
        print(f"[device] {note}", file=sys.stderr)
    print(f"[device] training on {device}{process_note(topology, device)}")
    return device


def resolve_base_path(args: argparse.Namespace) -> str:
    """--base_path, or the default synthetic city (generated when missing)."""
    if args.base_path is not None:
        return args.base_path
    from spatialoc_ros.data.synthetic import ensure_default_city

    path = ensure_default_city(log=print)
    print(f"[data] no --base_path: using the default synthetic city at {path}")
    return path


def run_folder(args: argparse.Namespace) -> str:
    path = os.path.join(args.checkpoint_root, args.folder_name)
    os.makedirs(path, exist_ok=True)
    return path


def write_run_args(folder: str, args: argparse.Namespace, world_size: int = 1) -> None:
    """args.json: the flags of the run (appended per start, so resumed runs keep their history);
    a distributed start also records its number of processes."""
    path = os.path.join(folder, "args.json")
    history = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
    entry = {"argv": sys.argv[1:], "args": vars(args)}
    if world_size > 1:
        entry["world_size"] = world_size
    history.append(entry)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(history, f, indent=2, default=str)


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if args.weight_decay > 0:
        return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    return torch.optim.Adam(params, lr=args.learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.lr_step), gamma=args.lr_gamma)
    if args.lr_scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_gamma)
    if args.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def clip_and_check(model: torch.nn.Module, max_norm: float, epoch: int, batch: int, lr: float) -> float:
    """Clip the gradient norm (when max_norm > 0) and stop on a non-finite gradient."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    check_finite({"gradient norm": norm}, epoch, batch, lr)
    return float(norm)


class MetricsCSV:
    """Per-epoch metrics, one row per epoch; the header is fixed by the first row written."""

    def __init__(self, path: str, resume: bool) -> None:
        self.path = path
        self.fields: Optional[list[str]] = None
        if resume and os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                self.fields = next(reader, None)
        elif os.path.isfile(path):
            os.remove(path)

    def write(self, row: dict) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def save_run_checkpoint(path: str, model, cfg, kind: str, extra: dict) -> None:
    """Write a checkpoint through the models' save_checkpoint (which writes atomically)."""
    from spatialoc_ros.models.checkpoint import save_checkpoint

    save_checkpoint(path, model, cfg, kind, extra)


def state_path(last_path: str) -> str:
    """Optimiser / scheduler state written beside a last.pth (``last.pth`` -> ``last.state.pth``)."""
    root, ext = os.path.splitext(last_path)
    return f"{root}.state{ext or '.pth'}"


def save_last(path: str, model, cfg, kind: str, extra: dict, optimizer, scheduler) -> None:
    """last.pth (a normal checkpoint; its extra holds epoch, best metric and history) plus the
    optimiser and scheduler state in last.state.pth (tensors; loads with weights_only=True)."""
    save_run_checkpoint(path, model, cfg, kind, extra)
    tmp = state_path(path) + ".tmp"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": int(extra["epoch"])}, tmp)
    os.replace(tmp, state_path(path))


def load_resume(path: str, kind: str, device: torch.device):
    """(model, cfg, extra, state) of a last.pth; ``state`` is None when last.state.pth is missing
    (then training resumes with a fresh optimiser, with a warning)."""
    from spatialoc_ros.models.checkpoint import CheckpointError, load_checkpoint

    model, cfg, extra = load_checkpoint(path, kind, device)
    if "epoch" not in extra or "best_metric" not in extra:
        raise CheckpointError(f"{path} holds no training progress (is it a best.pth?); resume from a last.pth")
    state = None
    spath = state_path(path)
    if os.path.isfile(spath):
        try:
            state = torch.load(spath, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged file raises many types; all mean "unreadable"
            raise CheckpointError(f"{spath} cannot be read ({type(err).__name__}); delete it to resume "
                                  "with a fresh optimiser") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{spath} does not hold a training state; delete it to resume with a fresh optimiser")
        if int(state.get("epoch", -1)) != int(extra["epoch"]):
            print(f"[train] WARNING: {spath} belongs to epoch {state.get('epoch')}, {path} to epoch "
                  f"{extra['epoch']}; starting a fresh optimiser", file=sys.stderr)
            state = None
    else:
        print(f"[train] WARNING: {spath} missing; resuming the weights with a fresh optimiser", file=sys.stderr)
    return model, cfg, extra, state


def prepare_model(args: argparse.Namespace, kind: str, text_dim: int, device: torch.device,
                  build_new, initial_best: list):
    """Model, config, optimiser, scheduler and progress of a run, fresh or resumed (--resume).

    ``build_new()`` -> (model, cfg) builds a fresh model from the flags. Returns
    (model, cfg, optimizer, scheduler, start_epoch, best, history).
    """
    extra = state = None
    if args.resume:
        model, cfg, extra, state = load_resume(args.resume, kind, device)
        if cfg.text_dim != text_dim:
            raise SystemExit(f"error: {args.resume} was trained on {cfg.text_dim}-wide text features, "
                             f"--text_model {args.text_model} gives {text_dim}")
        print(f"[train] resuming {args.resume} after epoch {extra['epoch']} (model flags come from the checkpoint)")
    else:
        model, cfg = build_new()
    model.to(device)
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, args)
    if extra is None:
        return model, cfg, optimizer, scheduler, 1, list(initial_best), {}
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return (model, cfg, optimizer, scheduler, int(extra["epoch"]) + 1, list(extra["best_metric"]),
            dict(extra.get("history", {})))


def run_trainer(args: argparse.Namespace, body: Callable) -> int:
    """``body(args, device, run)`` as one process, or as one of torchrun's processes (see
    :mod:`spatialoc_ros.training.distributed`): runtime set up, process group started and shut down."""
    topology = distributed.Topology.from_env()
    with distributed.quiet_unless_main(topology):
        device = setup_runtime(args, topology)
        run = distributed.Distributed.start(topology, device)
        try:
            return body(args, device, run)
        finally:
            run.shutdown()
