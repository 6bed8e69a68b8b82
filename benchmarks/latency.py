"""Per-query localisation latency against maps of 1, 2,000 and 100,000 cells.

    python benchmarks/latency.py [--device cpu] [--cells 1 2000 100000] [--queries 30]

Maps larger than the test split are synthesised by replicating its cells with a world offset, new
ids and jittered points (so every copy is a distinct cell for the model). Every query goes through
:meth:`Localizer.localize` (top-10) and the time is split as the Localizer reports it: text
encoding (language model + coarse text side; the sentence cache is OFF unless ``--cache``, so each
query pays its language-model pass), retrieval (multi-level scores, or for maps above
``preselect_above`` cells the global top-200 then the multi-level re-rank) and the fine stage (UGFL on
the top-10 cells in one batch). Map embedding (``set_map``) is timed separately. Medians and 90th
percentiles over the queries, after ``--warmup`` untimed queries.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spatialoc_ros.data.kitti360pose import Cell, Object3d  # noqa: E402
from spatialoc_ros.data.loading import load_split, query_text  # noqa: E402
from spatialoc_ros.inference import PRESELECT_ABOVE, Localizer  # noqa: E402
from spatialoc_ros.cli import device_name  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_path", default=None, help="KITTI360Pose folder (default: the synthetic default city)")
    p.add_argument("--path_coarse", default=None, help="coarse checkpoint (default: shipped)")
    p.add_argument("--path_fine", default=None, help="fine checkpoint (default: shipped)")
    p.add_argument("--device", default="auto", type=device_name, metavar="{auto,cpu,cuda,cuda:N}")
    p.add_argument("--cells", type=int, nargs="+", default=[1, 2000, 100000], help="map sizes")
    p.add_argument("--queries", type=int, default=30, help="timed queries per map size")
    p.add_argument("--warmup", type=int, default=3, help="untimed queries first")
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--cache", action="store_true", help="keep the sentence cache on (fixed_embedding)")
    p.add_argument("--preselect_above", type=int, default=PRESELECT_ABOVE,
                   help="map size from which the global pre-selection is used")
    p.add_argument("--batch_size", type=int, default=256, help="cells per forward pass in set_map")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


def synth_cells(cells: list[Cell], n: int, seed: int = 0) -> list[Cell]:
    """``n`` cells: the real ones, then jittered copies shifted by whole map extents."""
    rng = np.random.default_rng(seed)
    out = list(cells[:n])
    lo = np.min([c.bbox_w[0:2] for c in cells], axis=0)
    hi = np.max([c.bbox_w[3:5] for c in cells], axis=0)
    span = hi - lo + 100.0
    copy_idx = 0
    while len(out) < n:
        copy_idx += 1
        shift = np.array([span[0] * (copy_idx % 50), span[1] * (copy_idx // 50), 0.0])
        for c in cells:
            if len(out) >= n:
                break
            objects = [Object3d(o.id, o.instance_id,
                                o.xyz + rng.normal(0, 0.01, o.xyz.shape), o.rgb, o.label) for o in c.objects]
            bbox = np.asarray(c.bbox_w, dtype=np.float64) + np.concatenate([shift, shift])
            out.append(Cell(f"{c.id}_{copy_idx}", c.scene_name, objects, c.cell_size, bbox))
    return out


def stats(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{np.median(a):8.2f} {np.percentile(a, 90):8.2f}"


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base_path
    if base is None:
        from spatialoc_ros.data.synthetic import ensure_default_city

        base = ensure_default_city(log=print)
    data = load_split(base, "test")
    loc = Localizer.from_checkpoints(args.path_coarse, args.path_fine, device=args.device,
                                     fixed_embedding=args.cache, batch_size=args.batch_size,
                                     preselect_above=args.preselect_above)
    if loc.device_note:
        print(f"[device] {loc.device_note}")
    texts = [query_text(p) for p in data.poses]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    print(f"device {loc.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"sentence cache {'on' if args.cache else 'off'}, top-{args.top_k}; medians / p90 in ms")
    print(f"{'cells':>8} {'set_map s':>10} | {'text':>17} | {'retrieval':>17} | {'fine':>17} | {'total':>17}")
    for n in args.cells:
        cells = synth_cells(data.cells, n)
        t0 = time.perf_counter()
        loc.set_map(cells, progress=False)
        t_map = time.perf_counter() - t0
        rows = {"text_ms": [], "retrieval_ms": [], "fine_ms": [], "total": []}
        for i in range(args.warmup + args.queries):
            text = texts[order[i % len(order)]]
            t0 = time.perf_counter()
            loc.localize(text, top_k=args.top_k)
            total = 1e3 * (time.perf_counter() - t0)
            if i >= args.warmup:
                for k in ("text_ms", "retrieval_ms", "fine_ms"):
                    rows[k].append(loc.timings[k])
                rows["total"].append(total)
        mode = " (pre-selection)" if n > args.preselect_above else ""
        print(f"{n:8d} {t_map:10.1f} | {stats(rows['text_ms'])} | {stats(rows['retrieval_ms'])} | "
              f"{stats(rows['fine_ms'])} | {stats(rows['total'])}{mode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
