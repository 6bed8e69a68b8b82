"""Statistics of a KITTI360Pose folder (the release, or a synthetic city).

``python -m spatialoc_ros.data.stats --base_path DIR [--split all|train|val|test] [--json]``

Per scene: cells, poses (queries), objects and the first pose's first hint; totals; the class
histogram; hints per query; the share of "on-top" hints and of hints matched in the best cell;
the selection strategies; and the class + colour pairs that recur in the most cells (the reason
why text-to-cell retrieval is hard: many cells hold a "gray pole" or a "beige building").

Files are read with the restricted unpickler; an unreadable or unsafe file ends the program with
exit status 2 and a single ``error: ...`` line on stderr.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections import Counter
from typing import Optional

from spatialoc_ros.data.constants import CLASSES, PAD_LABEL, SPLITS
from spatialoc_ros.data.loading import DataFormatError, hint_texts, load_scene, scenes_of_split
from spatialoc_ros.data.safe_pickle import UnsafePickleError

TOP_PAIRS = 10


def _scene_counts(data, classes, pair_cells, hints_per_query, described_by, directions, positions, scene,
                  tally: Counter) -> int:
    """Add one scene to the histograms; returns its number of objects."""
    objects = 0
    for cell in data.cells:
        objects += len(cell.objects)
        pairs = set()
        for obj in cell.objects:
            classes[obj.label] += 1
            pairs.add((obj.label, obj.get_color_text()))
        pair_cells.update(pairs)
    for pose in data.poses:
        hints_per_query[len(pose.descriptions)] += 1
        described_by[str(pose.described_by)] += 1
        positions.add((scene, tuple(round(float(v), 3) for v in list(pose.pose_w)[:3])))
        for d in pose.descriptions:
            directions[d.direction] += 1
            tally["hints"] += 1
            tally["on_top"] += d.direction == "on-top"
            tally["matched"] += bool(getattr(d, "is_matched", False))
    return objects


def compute_stats(base_path: str, split: str = "all", top_pairs: int = TOP_PAIRS) -> dict:
    """All statistics as a JSON-ready dict (see the module docstring)."""
    scenes = scenes_of_split(base_path, split)
    out: dict = {"base_path": base_path, "split": split, "scenes": {}}
    classes: Counter = Counter()
    hints_per_query: Counter = Counter()
    described_by: Counter = Counter()
    directions: Counter = Counter()
    pair_cells: Counter = Counter()
    tally: Counter = Counter()
    n_cells = n_poses = n_objects = 0
    positions = set()
    for scene in scenes:
        data = load_scene(base_path, scene)
        try:
            objects = _scene_counts(data, classes, pair_cells, hints_per_query, described_by, directions,
                                    positions, scene, tally)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
            raise DataFormatError(
                f"{base_path}: scene {scene} holds malformed KITTI360Pose objects ({type(e).__name__}: {e})"
            ) from e
        first_hint = hint_texts(data.poses[0])[0] if data.poses else None
        out["scenes"][scene] = {
            "cells": len(data.cells),
            "poses": len(data.poses),
            "objects": objects,
            "first_hint": first_hint,
            "direction_map": data.direction_map is not None,
        }
        n_cells += len(data.cells)
        n_poses += len(data.poses)
        n_objects += objects
    n_hints, n_on_top, n_matched = tally["hints"], tally["on_top"], tally["matched"]
    known = [c for c in CLASSES if c != PAD_LABEL]
    out["cells"] = n_cells
    out["poses"] = n_poses
    out["positions"] = len(positions)
    out["objects"] = n_objects
    out["objects_per_cell"] = round(n_objects / n_cells, 2) if n_cells else 0.0
    out["classes"] = {c: classes.get(c, 0) for c in known}
    out["classes"].update({c: n for c, n in sorted(classes.items()) if c not in out["classes"]})
    out["classes_present"] = sum(1 for c in known if classes.get(c, 0) > 0)
    out["hints_per_query"] = {str(k): v for k, v in sorted(hints_per_query.items())}
    out["hints"] = n_hints
    out["on_top_share"] = round(n_on_top / n_hints, 4) if n_hints else 0.0
    out["matched_share"] = round(n_matched / n_hints, 4) if n_hints else 0.0
    out["directions"] = dict(sorted(directions.items()))
    out["described_by"] = dict(sorted(described_by.items()))
    ranked = sorted(pair_cells.items(), key=lambda kv: (-kv[1], kv[0]))
    out["distinct_pairs"] = len(ranked)
    out["recurring_pairs"] = [
        {"class": lbl, "color": col, "cells": n, "cell_share": round(n / n_cells, 4) if n_cells else 0.0}
        for (lbl, col), n in ranked[:top_pairs]
    ]
    return out


def format_text(st: dict) -> str:
    lines = [f"KITTI360Pose folder {st['base_path']} (split {st['split']})", "", "per scene:"]
    width = max(len(s) for s in st["scenes"]) if st["scenes"] else 10
    for scene, e in st["scenes"].items():
        lines.append(f"  {scene:{width}s}  cells {e['cells']:6d}  poses {e['poses']:6d}  "
                     f"objects {e['objects']:7d}  first hint: {e['first_hint']}")
    lines += [
        "",
        f"total: {st['cells']} cells, {st['poses']} poses (queries) from {st['positions']} positions, "
        f"{st['objects']} objects ({st['objects_per_cell']} per cell)",
        f"hints per query: " + ", ".join(f"{k}: {v}" for k, v in st["hints_per_query"].items()),
        f"on-top share: {st['on_top_share']:.3f}   matched share: {st['matched_share']:.3f}",
        "directions: " + ", ".join(f"{k} {v}" for k, v in st["directions"].items()),
        "described by: " + ", ".join(f"{k} {v}" for k, v in st["described_by"].items()),
        "",
        f"classes ({st['classes_present']} of {len(CLASSES) - 1} present), objects per class:",
    ]
    for cls, n in st["classes"].items():
        lines.append(f"  {cls:16s} {n:7d}")
    lines += ["", f"most recurring class + colour pairs ({st['distinct_pairs']} distinct), cells holding each:"]
    for p in st["recurring_pairs"]:
        lines.append(f"  {p['color'] + ' ' + p['class']:28s} {p['cells']:6d} cells ({100 * p['cell_share']:.1f}%)")
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spatialoc_ros.data.stats",
                                     description="Statistics of a KITTI360Pose folder (cells/, poses/).")
    parser.add_argument("--base_path", required=True, help="folder holding cells/ and poses/")
    parser.add_argument("--split", default="all", choices=sorted(SPLITS))
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--top_pairs", type=int, default=TOP_PAIRS, help="how many recurring pairs to list")
    args = parser.parse_args(argv)
    try:
        st = compute_stats(args.base_path, args.split, args.top_pairs)
    except UnsafePickleError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (DataFormatError, pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=1) if args.json else format_text(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
