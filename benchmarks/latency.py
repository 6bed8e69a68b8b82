"""City-scale retrieval: map embedding, caches, exact vs FAISS short lists, per-query latency.

    python benchmarks/latency.py [--cells 2000 10000 100000] [--index_only 1000000] [--queries 50]
                                 [--device cpu] [--cache_dir DIR] [--out_json F]

Full maps (``--cells``) go through the whole :class:`Localizer`: the test split's cells replicated
with a world offset, new ids and jittered points (every copy is a distinct cell to the model).
For each size it prints

* map preparation: the coarse model's embedding (cells/s), the geometric level's precomputation,
  the whole ``set_map`` with its cache written, and a restart (a fresh Localizer's ``set_map`` on the
  same map with the cache ready);
* memory per cell (embedding + geometry + index; up to ``PRESELECT_ABOVE`` cells also what the
  exact path reads per query: the packed embedding, the hint lookup, the fine model's object tokens);
* per query (``localize``, top-10, sentence cache off, so each query pays its language model):
  retrieval and total p50 / p99 in ms with the exact index (as the Localizer runs by default: every
  cell ranked on every level up to ``PRESELECT_ABOVE`` cells, the exact global short list above)
  and with the FAISS short list, and FAISS's recall of the exact top-10 of the global descriptor
  (all test queries, batched).

``--index_only`` sizes measure the short-list index alone (a full 10^6-cell map of points and
per-object embeddings does not fit this machine's memory, see the printed bytes per cell):
descriptors are the largest full map's global descriptors, replicated with Gaussian jitter whose
size is measured between the real cells and their jittered copies, queries are the real queries'
text descriptors. It prints build time, search p50 / p99 (k = 10 and k = the pre-selection size),
the exact search's p50 and the recall of the exact top-10.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spatialoc_ros.cli import device_name  # noqa: E402
from spatialoc_ros.data.kitti360pose import Cell, Object3d  # noqa: E402
from spatialoc_ros.data.loading import load_split, query_text  # noqa: E402
from spatialoc_ros.inference import PRESELECT_TOP, Localizer, parse_query  # noqa: E402
from spatialoc_ros.models import vector_index as vi  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_path", default=None, help="KITTI360Pose folder (default: the synthetic default city)")
    p.add_argument("--path_coarse", default=None, help="coarse checkpoint (default: shipped)")
    p.add_argument("--path_fine", default=None, help="fine checkpoint (default: shipped)")
    p.add_argument("--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--cells", type=int, nargs="*", default=[2000, 10000, 100000], help="full map sizes")
    p.add_argument("--index_only", type=int, nargs="*", default=[1000000], help="index-only map sizes")
    p.add_argument("--queries", type=int, default=50, help="timed queries per map size and index")
    p.add_argument("--warmup", type=int, default=3, help="untimed queries first")
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=256, help="cells per forward pass in set_map")
    p.add_argument("--cache_dir", default=None, help="map cache folder (default: a temporary one, removed)")
    p.add_argument("--out_json", default=None, help="also write the figures here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    for name in ("cells", "index_only"):
        if any(n < 1 for n in getattr(args, name)):
            p.error(f"--{name} sizes must be >= 1")
    if args.queries < 1 or args.top_k < 1:
        p.error("--queries and --top_k must be >= 1")
    return args


def synth_cells(cells: list[Cell], n: int, seed: int = 0) -> list[Cell]:
    """``n`` cells: the real ones, then copies shifted by whole map extents, each copy mirrored
    (x, y or both, in turn), without one random object (cells of more than 3) and with its points
    jittered by 0.3 m, so that copies are distinct cells rather than near-duplicates."""
    rng = np.random.default_rng(seed)
    out = list(cells[:n])
    lo = np.min([c.bbox_w[0:2] for c in cells], axis=0)
    hi = np.max([c.bbox_w[3:5] for c in cells], axis=0)
    span = hi - lo + 100.0
    copy_idx = 0
    while len(out) < n:
        copy_idx += 1
        shift = np.array([span[0] * (copy_idx % 50), span[1] * (copy_idx // 50), 0.0])
        mirror = np.array([copy_idx % 2 == 1, copy_idx % 4 >= 2, False])
        for c in cells:
            if len(out) >= n:
                break
            drop = int(rng.integers(len(c.objects))) if len(c.objects) > 3 else -1
            objects = []
            for k, o in enumerate(c.objects):
                if k == drop:
                    continue
                xyz = np.where(mirror, 1.0 - o.xyz, o.xyz) + rng.normal(0, 0.01, o.xyz.shape)
                objects.append(Object3d(o.id, o.instance_id, xyz.astype(o.xyz.dtype), o.rgb, o.label))
            bbox = np.asarray(c.bbox_w, dtype=np.float64) + np.concatenate([shift, shift])
            out.append(Cell(f"{c.id}_{copy_idx}", c.scene_name, objects, c.cell_size, bbox))
    return out


def all_cells(base: str) -> list[Cell]:
    """Every cell of the city's train, val and test splits (the replication source)."""
    seen, out = set(), []
    for split in ("train", "val", "test"):
        for c in load_split(base, split).cells:
            if c.id not in seen:
                seen.add(c.id)
                out.append(c)
    return out


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def tensor_bytes(obj) -> int:
    import dataclasses

    total = 0
    for f in dataclasses.fields(obj):
        t = getattr(obj, f.name)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(approx, exact)]))


def time_queries(loc: Localizer, texts: list[str], args) -> dict:
    retrieval, total = [], []
    for i in range(args.warmup + args.queries):
        t0 = time.perf_counter()
        loc.localize(texts[i % len(texts)], top_k=args.top_k)
        ms = 1e3 * (time.perf_counter() - t0)
        if i >= args.warmup:
            retrieval.append(loc.timings["retrieval_ms"])
            total.append(ms)
    return {"retrieval_p50_ms": pct(retrieval, 50), "retrieval_p99_ms": pct(retrieval, 99),
            "total_p50_ms": pct(total, 50), "total_p99_ms": pct(total, 99)}


def text_descriptors(loc: Localizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        parts = []
        for s in range(0, len(texts), 256):
            hints = [parse_query(t) for t in texts[s:s + 256]]
            parts.append(loc.coarse.encode_text(loc._hint_batch("coarse", hints)).global_)
        return torch.cat(parts)


def full_map(loc_args: dict, base_cells, n: int, texts, queries_global, cache_dir, args) -> tuple[dict, Localizer]:
    cells = synth_cells(base_cells, n)
    loc = Localizer.from_checkpoints(**loc_args)
    t0 = time.perf_counter()
    loc.set_map(cells, progress=False, cache_dir=cache_dir)
    build_s = time.perf_counter() - t0
    mt = dict(loc.map_timings)
    row = {"cells": n, "embed_cells_per_s": n / max(mt["embed_s"], 1e-9), "embed_s": mt["embed_s"],
           "geometry_s": mt["geometry_s"], "fine_tokens_s": mt.get("fine_s", 0.0), "set_map_s": build_s,
           "cache_write_s": mt["cache_s"]}
    restarted = Localizer.from_checkpoints(**loc_args)
    t0 = time.perf_counter()
    restarted.set_map(cells, progress=False, cache_dir=cache_dir)
    row["restart_s"] = time.perf_counter() - t0
    row["restart_from_cache"] = bool(restarted.map_timings.get("cached"))
    del restarted
    # what the Localizer holds for the map: the (packed) embedding and geometry, and up to
    # PRESELECT_ABOVE cells the hint lookup and the fine model's object tokens
    held = (loc._relations, loc._hint_lookup, loc._fine_tokens)
    per_cell = sum(tensor_bytes(part) for part in held if part is not None)
    per_cell += sum(t.numel() * t.element_size() for t in (*loc._index.tensors.values(), loc._index.cell, loc._index.start))
    exact_top = vi.ExactIndex(loc._index.global_).search(queries_global, 10)[1].cpu().numpy()
    for kind in ("exact", "faiss"):
        t0 = time.perf_counter()
        loc.use_index(kind)
        row[f"{kind}_build_s"] = time.perf_counter() - t0
        row[f"{kind}_index_bytes_per_cell"] = loc._vector_index.nbytes / n
        # 'exact' runs as the Localizer does by default at this size: every cell ranked on every
        # level up to PRESELECT_ABOVE cells, the exact global short list above; 'faiss' always
        # takes its short list from FAISS.
        row.update({f"{kind}_{k}": v for k, v in time_queries(loc, texts, args).items()})
        if kind == "faiss":
            got = loc._vector_index.search(queries_global, 10)[1].cpu().numpy()
            row["faiss_recall_at_10"] = recall_at(got, exact_top)
            shortlist = loc._vector_index.search(queries_global, PRESELECT_TOP)[1].cpu().numpy()
            row["faiss_shortlist_holds_exact_top10"] = recall_at(shortlist, exact_top)
    row["bytes_per_cell"] = per_cell / n + row["faiss_index_bytes_per_cell"]
    return row, loc


def index_only(base: torch.Tensor, copies_sigma: float, n: int, queries_global: torch.Tensor, args) -> dict:
    gen = torch.Generator().manual_seed(0)
    reps = -(-n // len(base))
    parts = [base]
    for r in range(1, reps):
        parts.append(torch.nn.functional.normalize(base + copies_sigma * torch.randn(base.shape, generator=gen), dim=1))
    vectors = torch.cat(parts)[:n].contiguous()
    t0 = time.perf_counter()
    index = vi.FaissIndex(vectors)
    build_s = time.perf_counter() - t0
    exact = vi.ExactIndex(vectors)
    q = queries_global
    exact_top, t_exact, t10, t200, got = [], [], [], [], []
    for i in range(args.warmup + args.queries):
        row = q[i % len(q)][None]
        t0 = time.perf_counter()
        top = exact.search(row, 10)[1]
        t1 = time.perf_counter()
        hit = index.search(row, 10)[1]
        t2 = time.perf_counter()
        index.search(row, PRESELECT_TOP)
        t3 = time.perf_counter()
        if i >= args.warmup:
            t_exact.append(1e3 * (t1 - t0))
            t10.append(1e3 * (t2 - t1))
            t200.append(1e3 * (t3 - t2))
    exact_top = exact.search(q, 10)[1].numpy()
    got = index.search(q, 10)[1].numpy()
    return {"cells": n, "faiss_build_s": build_s, "nlist": index.nlist, "nprobe": index.nprobe,
            "faiss_p50_ms": pct(t10, 50), "faiss_p99_ms": pct(t10, 99),
            "faiss_top200_p50_ms": pct(t200, 50), "faiss_top200_p99_ms": pct(t200, 99),
            "exact_p50_ms": pct(t_exact, 50), "recall_at_10": recall_at(got, exact_top),
            "index_bytes_per_cell": index.nbytes / n, "copies_sigma": copies_sigma}


def copy_spread(loc: Localizer, n_real: int) -> float:
    """Per-dimension standard deviation between real cells' descriptors and their jittered copies."""
    g = loc._index.global_.cpu()
    n = len(g)
    if n <= n_real:
        return 0.01
    idx = torch.arange(n_real, n)
    diff = g[idx] - g[idx % n_real]
    return float(diff.std())


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base_path
    if base is None:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    data = load_split(base, "test")
    source = all_cells(base)
    texts = [query_text(p) for p in data.poses]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    loc_args = dict(coarse_path=args.path_coarse, fine_path=args.path_fine, device=args.device,
                    fixed_embedding=False, batch_size=args.batch_size)
    probe = Localizer.from_checkpoints(**loc_args)
    if probe.device_note:
        print(f"[device] {probe.device_note}")
    probe.set_map(data.cells[:1], progress=False)
    queries_global = text_descriptors(probe, texts)
    print(f"device {probe.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{len(source)} real cells (all splits) replicated, {len(texts)} test queries; top-{args.top_k}, "
          f"sentence cache off")
    del probe
    results = {"full": [], "index_only": []}
    tmp = None
    cache_dir = args.cache_dir
    if cache_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="spatialoc_latency_")
        cache_dir = tmp.name
    largest = None
    print(f"{'cells':>9} | {'embed/s':>8} {'geom s':>7} {'set_map s':>9} {'restart s':>9} | {'KB/cell':>7} | "
          f"{'exact retr p50/p99':>19} {'total p50':>9} | {'faiss retr p50/p99':>19} {'total p50':>9} {'R@10':>5}")
    for n in args.cells:
        row, loc = full_map(loc_args, source, n, texts, queries_global, cache_dir, args)
        results["full"].append(row)
        print(f"{n:9d} | {row['embed_cells_per_s']:8.0f} {row['geometry_s']:7.1f} {row['set_map_s']:9.1f} "
              f"{row['restart_s']:9.1f} | {row['bytes_per_cell'] / 1024:7.1f} | "
              f"{row['exact_retrieval_p50_ms']:8.1f} / {row['exact_retrieval_p99_ms']:8.1f} {row['exact_total_p50_ms']:9.1f} | "
              f"{row['faiss_retrieval_p50_ms']:8.1f} / {row['faiss_retrieval_p99_ms']:8.1f} {row['faiss_total_p50_ms']:9.1f} "
              f"{row['faiss_recall_at_10']:5.3f}", flush=True)
        if largest is None or n >= largest[0]:
            largest = (n, loc._index.global_.cpu().clone(), copy_spread(loc, len(source)))
        del loc
    if args.index_only:
        if largest is None:
            probe = Localizer.from_checkpoints(**loc_args)
            probe.set_map(source, progress=False)
            largest = (len(source), probe._index.global_.cpu().clone(), 0.01)
        print(f"\nindex only (descriptors of the {largest[0]:,}-cell map, jittered copies with sigma {largest[2]:.4f}):")
        print(f"{'cells':>9} | {'build s':>7} {'lists':>6} {'probe':>5} | {'faiss p50/p99 ms':>17} "
              f"{'top-200 p50':>11} | {'exact p50':>9} | {'R@10':>5} | {'B/cell':>6}")
        for n in args.index_only:
            row = index_only(largest[1], largest[2], n, queries_global.cpu(), args)
            results["index_only"].append(row)
            print(f"{n:9d} | {row['faiss_build_s']:7.1f} {row['nlist']:6d} {row['nprobe']:5d} | "
                  f"{row['faiss_p50_ms']:7.2f} / {row['faiss_p99_ms']:7.2f} {row['faiss_top200_p50_ms']:11.2f} | "
                  f"{row['exact_p50_ms']:9.2f} | {row['recall_at_10']:5.3f} | {row['index_bytes_per_cell']:6.0f}",
                  flush=True)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(results, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
