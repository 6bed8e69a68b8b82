"""Training throughput (samples/s) of the coarse and fine stages, as the training CLIs run them.

    python benchmarks/train_throughput.py [--base_path DATA] [--device cpu] [--batches 12]

Builds each model from the configuration stored in a checkpoint (default: the shipped ones, so the
figures are those of the embedded default) with fresh weights, then times full training steps
(data collation with augmentation, cached text features, forward, loss, backward, Adam step) on the
train split. The first ``--warmup`` batches (text cache filling, allocator warm-up) are not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spatialoc_ros.data.loading import load_split  # noqa: E402
from spatialoc_ros.inference import resolve_device, shipped_checkpoint  # noqa: E402
from spatialoc_ros.models.builder import build_coarse_model, build_fine_model  # noqa: E402
from spatialoc_ros.models.checkpoint import read_checkpoint  # noqa: E402
from spatialoc_ros.models.config import CoarseConfig, FineConfig  # noqa: E402
from spatialoc_ros.models.text_encoder import FrozenTextEncoder, HintEncoder  # noqa: E402
from spatialoc_ros.training.coarse import ranking_terms  # noqa: E402
from spatialoc_ros.training.datasets import CellCollator, QueryDataset, UniqueCellBatchSampler  # noqa: E402
from spatialoc_ros.training.fine import loss_terms  # noqa: E402
from spatialoc_ros.cli import device_name  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_path", default=None, help="KITTI360Pose folder (default: the synthetic default city)")
    p.add_argument("--path_coarse", default=None, help="checkpoint whose config to use (default: shipped)")
    p.add_argument("--path_fine", default=None, help="checkpoint whose config to use (default: shipped)")
    p.add_argument("--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--coarse_batch_size", type=int, default=64)
    p.add_argument("--fine_batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="timed batches per stage")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def load_cfg(path, kind, cls):
    payload = read_checkpoint(path or shipped_checkpoint(kind))
    return cls(**payload["config"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage(name, model, step, loader, device, warmup, batches):
    model.to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, samples = [], []
    it = iter(loader)
    for i in range(warmup + batches):
        sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        loss = step(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            samples.append(len(batch.hints))
    rate = sum(samples) / sum(times)
    print(f"{name:7s}: {rate:8.1f} samples/s  ({1e3 * np.mean(times):.0f} ms per batch of {samples[0]}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, device {device})")
    return rate


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, note = resolve_device(args.device)
    if note:
        print(f"[device] {note}")
    base = args.base_path
    if base is None:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    ccfg = load_cfg(args.path_coarse, "coarse", CoarseConfig)
    fcfg = load_cfg(args.path_fine, "fine", FineConfig)
    data = load_split(base, "train")
    hint_encoder = HintEncoder(FrozenTextEncoder(ccfg.text_model, device=str(device)), cache=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; train split: {len(data.poses)} queries")

    torch.manual_seed(0)
    ds = QueryDataset(data, augment=True, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=UniqueCellBatchSampler(ds.cell_ids, args.coarse_batch_size, shuffle=True),
        collate_fn=CellCollator(ccfg.max_objects, ccfg.num_points, True, 0.005))

    def coarse_step(model, batch):
        h = hint_encoder.batch(batch.hints, device)
        terms = ranking_terms(model, model.encode_text(h), model.encode_cells(batch.cells.to(device)), ccfg)
        return sum(terms.values())

    time_stage("coarse", build_coarse_model(ccfg, ccfg.text_dim, load_pointnet=False), coarse_step, loader,
               device, args.warmup, args.batches)

    ds = QueryDataset(data, augment=True, pmc_prob=0.5, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=UniqueCellBatchSampler(ds.cell_ids, args.fine_batch_size, shuffle=True),
        collate_fn=CellCollator(fcfg.max_objects, fcfg.num_points, True, 0.005))

    def fine_step(model, batch):
        h = hint_encoder.batch(batch.hints, device)
        gaussian, matching = model.forward_with_matching(h, batch.cells.to(device))
        return sum(loss_terms(gaussian, matching, batch.targets.to(device), fcfg).values())

    time_stage("fine", build_fine_model(fcfg, fcfg.text_dim, load_pointnet=False), fine_step, loader,
               device, args.warmup, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
