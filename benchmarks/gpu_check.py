"""One prepared check of the CUDA path: correctness against the CPU, then speed.

    python benchmarks/gpu_check.py                      # on a machine with CUDA, at most ~5 minutes
    python benchmarks/gpu_check.py --device cpu --dry_run   # the same code on the CPU, small sizes

1. **Correctness.** The shipped checkpoints on the reference device (CPU) and on ``--device``, the
   same map (the default city's test split) and texts: the cells' global descriptors, the ranked
   cells, the calibrated probabilities and the published estimate (mean, covariance, confidence)
   are compared with the tolerances in :data:`TOLERANCES`. A top-1 cell may differ only where the
   reference's two best scores are closer than the score tolerance (a tie the devices may break
   differently).
2. **Speed on ``--device``.** For maps of ``--cells`` cells (the city replicated with jitter, as in
   ``benchmarks/latency.py``): ``set_map`` throughput, per-query ``localize`` p50 / p99 (top-10,
   sentence cache off, i.e. the language model runs per query), batched throughput
   (``localize_many``) and the short-list index in use (FAISS on the GPU when a faiss-gpu build is
   installed; FAISS on the CPU, or exact, otherwise).
3. **Language models on ``--device``.** The MiniLM encoder (6 hints per query) and a random
   Flan-T5-large-shaped encoder built locally from its configuration (24 layers, d_model 1024, 16
   heads, d_ff 2816, gated GELU; nothing downloaded): per-query p50 and batched sentences/s, in
   float32 and (CUDA) bfloat16.

It prints one table and exits 1 when any comparison is outside its tolerance, 2 when the device is
not usable. ``--dry_run`` shrinks every size (maps of 200 and 1,000 cells, 8 texts, a 2-layer T5)
so that the whole script runs in CI on the CPU (there the "device" run is a second CPU run, so the
comparison must come out exact).

On a lent GPU machine (see the device tool's README): carry the repository, install the wheels the
machine lacks, then ``PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out_json $OUT/gpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from latency import all_cells, pct, synth_cells  # noqa: E402

from spatialoc_ros.cli import device_name  # noqa: E402
from spatialoc_ros.data.loading import load_split, query_text  # noqa: E402
from spatialoc_ros.inference import Localizer, resolve_device  # noqa: E402

#: Largest differences accepted between the reference (CPU) and the device run.
TOLERANCES = {
    "descriptor": 1e-4,  # cell global descriptors (unit vectors), max abs
    "score": 1e-3,  # combined retrieval scores of the same cells, max abs
    "probability": 1e-3,  # calibrated cell probabilities, max abs
    "mean_m": 0.05,  # published mean, metres
    "cov_rel": 1e-2,  # published covariance, max abs difference / the reference's largest entry
    "confidence": 1e-3,
}
#: Flan-T5-large's encoder shape (its public configuration).
T5_LARGE = dict(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24, vocab_size=32128,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False)
#: Tokens per hint sentence fed to the random T5 (a KITTI360Pose hint is 12-16 tokens).
T5_TOKENS = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", type=device_name, metavar="{auto,cpu,cuda,cuda:N}",
                   help="device under test (default cuda)")
    p.add_argument("--reference_device", default="cpu", type=device_name, metavar="{cpu,cuda,cuda:N}")
    p.add_argument("--cells", type=int, nargs="+", default=[2000, 100000], help="map sizes timed")
    p.add_argument("--texts", type=int, default=64, help="texts compared between the devices")
    p.add_argument("--queries", type=int, default=50, help="timed single queries per map size")
    p.add_argument("--batch", type=int, default=256, help="texts per localize_many batch")
    p.add_argument("--t5_layers", type=int, default=T5_LARGE["num_layers"])
    p.add_argument("--dry_run", action="store_true", help="small sizes, for a CPU run in CI")
    p.add_argument("--base_path", default=None, help="KITTI360Pose folder (default: the synthetic default city)")
    p.add_argument("--out_json", default=None)
    args = p.parse_args()
    if args.dry_run:
        args.cells, args.texts, args.queries, args.batch, args.t5_layers = [200, 1000], 8, 3, 16, 2
    if min(args.cells) < 1 or args.texts < 1 or args.queries < 1 or args.batch < 1 or args.t5_layers < 1:
        p.error("sizes must be >= 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(ref: Localizer, dev: Localizer, texts: list[str]) -> dict:
    """Largest differences of the device run from the reference on ``texts``, and top-1 agreement."""
    out = {"descriptor": float((ref._index.global_.cpu() - dev._index.global_.cpu()).abs().max())}
    r_est = ref.estimate_many(texts, top_k=5)
    d_est = dev.estimate_many(texts, top_k=5)
    score = prob = mean = cov = conf = 0.0
    top1_mismatch = 0
    for a, b in zip(r_est, d_est):
        ha, hb = a.hypotheses, b.hypotheses
        if ha[0].cell_id != hb[0].cell_id:
            gap = ha[0].score - ha[1].score if len(ha) > 1 else float("inf")
            if gap >= TOLERANCES["score"]:
                top1_mismatch += 1
            continue  # a tie broken the other way: the rest is not comparable
        by_id = {h.cell_id: h for h in hb}
        for h in ha:
            if h.cell_id in by_id:
                score = max(score, abs(h.score - by_id[h.cell_id].score))
                prob = max(prob, abs(h.probability - by_id[h.cell_id].probability))
        mean = max(mean, float(np.abs(a.mean_xy - b.mean_xy).max()))
        cov = max(cov, float(np.abs(a.cov_xy - b.cov_xy).max() / max(np.abs(a.cov_xy).max(), 1e-12)))
        conf = max(conf, abs(a.confidence - b.confidence))
    out.update(score=score, probability=prob, mean_m=mean, cov_rel=cov, confidence=conf,
               top1_mismatch=top1_mismatch)
    return out


def time_map(device: str, cells, texts: list[str], args) -> dict:
    loc = Localizer.from_checkpoints(device=device, fixed_embedding=False, batch_size=256)
    dev = loc.device
    sync(dev)
    t0 = time.perf_counter()
    loc.set_map(cells, progress=False)
    sync(dev)
    set_map_s = time.perf_counter() - t0
    lat = []
    for i in range(3 + args.queries):
        sync(dev)
        t0 = time.perf_counter()
        loc.localize(texts[i % len(texts)], top_k=10)
        sync(dev)
        if i >= 3:
            lat.append(1e3 * (time.perf_counter() - t0))
    batch = [texts[i % len(texts)] for i in range(args.batch)]
    loc.localize_many(batch[: min(8, len(batch))], top_k=10)  # warm-up of the batched shapes
    sync(dev)
    t0 = time.perf_counter()
    loc.localize_many(batch, top_k=10)
    sync(dev)
    qps = len(batch) / (time.perf_counter() - t0)
    index = loc._vector_index
    where = index.kind + (" (GPU)" if getattr(index, "on_gpu", False) else "")
    return {"cells": len(cells), "set_map_s": set_map_s, "cells_per_s": len(cells) / set_map_s,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "batched_qps": qps, "index": where}


def time_encoders(device: torch.device, texts: list[str], args) -> list[dict]:
    from spatialoc_ros.inference import parse_query
    from spatialoc_ros.models.text_encoder import FrozenTextEncoder

    rows = []
    hints = [parse_query(t) for t in texts]
    minilm = FrozenTextEncoder("minilm", device=str(device))
    sentences = [s for h in hints for s in h]

    def run(name, encode_query, encode_many, n_sentences):
        lat = []
        for i in range(3 + args.queries):
            sync(device)
            t0 = time.perf_counter()
            encode_query(i)
            sync(device)
            if i >= 3:
                lat.append(1e3 * (time.perf_counter() - t0))
        sync(device)
        t0 = time.perf_counter()
        encode_many()
        sync(device)
        rows.append({"encoder": name, "query_p50_ms": pct(lat, 50), "query_p99_ms": pct(lat, 99),
                     "sentences_per_s": n_sentences / (time.perf_counter() - t0)})

    with torch.no_grad():
        many = sentences[: args.batch * 6]
        run("MiniLM-L6 (shipped), fp32", lambda i: minilm.encode(hints[i % len(hints)]), lambda: minilm.encode(many),
            len(many))
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(**{**T5_LARGE, "num_layers": args.t5_layers})
        torch.manual_seed(0)
        t5 = T5EncoderModel(cfg).to(device).eval()
        gen = torch.Generator().manual_seed(0)
        one = torch.randint(0, cfg.vocab_size, (6, T5_TOKENS), generator=gen).to(device)
        lots = torch.randint(0, cfg.vocab_size, (args.batch * 6, T5_TOKENS), generator=gen).to(device)
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for dtype in dtypes:
            model = t5.to(dtype)
            label = f"random T5 encoder, {args.t5_layers} x 1024 ({'fp32' if dtype == torch.float32 else 'bf16'})"
            run(label, lambda i: model(input_ids=one), lambda: model(input_ids=lots), len(lots))
    return rows


def main() -> int:
    args = parse_args()
    device, note = resolve_device(args.device)
    if note or (args.device.startswith("cuda") and device.type != "cuda"):
        print(f"gpu_check: error: {note or 'CUDA is not available'}; run with --device cpu --dry_run for a CPU dry run",
              file=sys.stderr)
        return 2
    base = args.base_path
    if base is None:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    data = load_split(base, "test")
    texts = [query_text(p) for p in data.poses]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    info = f"torch {torch.__version__}, device {device}"
    if device.type == "cuda":
        info += f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    print(info, flush=True)

    ref = Localizer.from_checkpoints(device=args.reference_device)
    dev = Localizer.from_checkpoints(device=str(device))
    for loc in (ref, dev):
        loc.set_map(data.cells, progress=False)
    diffs = compare(ref, dev, texts[: args.texts])
    del ref, dev
    failed = [k for k, tol in TOLERANCES.items() if not diffs[k] <= tol] + (["top1"] if diffs["top1_mismatch"] else [])
    print(f"\n1. {device} vs {args.reference_device}, {args.texts} texts on the {len(data.cells)}-cell test map")
    print(f"{'quantity':>14} | {'max difference':>14} | {'tolerance':>9} | ok")
    for k, tol in TOLERANCES.items():
        print(f"{k:>14} | {diffs[k]:14.3g} | {tol:9.3g} | {'yes' if diffs[k] <= tol else 'NO'}")
    print(f"{'top-1 cell':>14} | {diffs['top1_mismatch']:14d} | {0:9d} | {'yes' if not diffs['top1_mismatch'] else 'NO'}"
          "   (texts whose top-1 differs without a tie)")

    source = all_cells(base)
    maps = []
    print(f"\n2. localisation on {device}, top-10, sentence cache off")
    print(f"{'cells':>9} | {'set_map s':>9} {'cells/s':>8} | {'p50 ms':>7} {'p99 ms':>7} | {'batched q/s':>11} | index")
    for n in args.cells:
        row = time_map(str(device), synth_cells(source, n), texts, args)
        maps.append(row)
        print(f"{n:9d} | {row['set_map_s']:9.1f} {row['cells_per_s']:8.0f} | {row['p50_ms']:7.1f} {row['p99_ms']:7.1f} | "
              f"{row['batched_qps']:11.1f} | {row['index']}", flush=True)

    print(f"\n3. language models on {device} (6 hints per query; batched: {args.batch * 6} sentences)")
    print(f"{'encoder':>42} | {'query p50 ms':>12} {'p99 ms':>7} | {'sentences/s':>11}")
    encoders = time_encoders(device, texts, args)
    for row in encoders:
        print(f"{row['encoder']:>42} | {row['query_p50_ms']:12.1f} {row['query_p99_ms']:7.1f} | {row['sentences_per_s']:11.0f}")
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"device": str(device), "differences": diffs, "tolerances": TOLERANCES, "failed": failed,
                       "maps": maps, "encoders": encoders}, f, indent=2)
    if failed:
        print(f"\nMISMATCH: {', '.join(failed)} outside tolerance", file=sys.stderr)
        return 1
    print("\nall comparisons within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
