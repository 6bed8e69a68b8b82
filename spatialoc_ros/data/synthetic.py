"""A synthetic KITTI360Pose-style city, written in the release's folder layout.

``python -m spatialoc_ros.data.synthetic --out DIR --seed N [--scale small|default|large]``

The real KITTI360Pose cannot be downloaded here, so this module builds a stand-in that goes through
the same preparation steps as the release (see shared/docs/kitti360pose.md):

1. **World.** Per scene (the nine KITTI-360 drive names) a street network on a rotated, jittered
   lattice and a drive (route) through it. Along every driven street: the road (a long "stuff"
   object), sidewalks with driveway cuts, parking lanes and lots, terrain and vegetation patches, tree
   rows, buildings with garages behind, fences / walls / guard rails, and street furniture (poles,
   lamps, traffic signs and lights, small poles, trash bins, boxes); rarely a bus stop, a vending
   machine, a bridge over the street or a tunnel. Every object is a small coloured point set
   (30..300 points, scaled with its size); its rgb is drawn around one of the eight colour centres
   so that :meth:`Object3d.get_color_text` names the intended colour.
2. **Cells.** 30 m squares on a 10 m grid near the drive. Stuff objects are cropped to the cell and
   split into spatially connected pieces (sharing their instance id); instance objects are kept
   whole when at least a third of their points is inside. Points are normalised to the cell, ids
   reset to 0..n-1, and cells with fewer than six objects dropped.
3. **Poses.** Positions every 10 m along the drive, each repeated four times with a random shift.
   The best cell is the database cell with the closest centre (kept within 15 m). A "pose cell"
   centred on the position is described three ways (closest / class / direction, six hints each,
   candidates within half a cell), the hints are grounded in the best cell by instance id and
   offset (unmatched -> ``is_matched`` False) and repeated object sets are dropped.

The hard part of the real data is kept on purpose: every class draws its colour from a small
palette and the same street furniture repeats along a street, so the same class + colour pairs occur
in many cells and only the spatial layout tells cells apart.

Same seed and scale -> byte-identical files (per-scene random streams, sorted iteration, pickle
protocol 4, JSON with sorted keys).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from spatialoc_ros.data.cell_cutting import WorldIndex
from spatialoc_ros.data.constants import (
    CLASS_TO_INDEX as CLASS_INDEX,
    COLOR_CENTERS,
    NUM_MENTIONED,
    SCENES_ALL,
    SPLITS,
    STUFF_CLASSES,
    short_scene_name,
)
from spatialoc_ros.data.kitti360pose import Cell, DescriptionBestCell, Object3d, Pose, direction_of

GENERATOR_VERSION = 1

# --- preparation constants (the release's values unless noted) -------------------------------------
CELL_SIZE = 30.0
CELL_STRIDE = 10.0
#: grid centres are kept within this distance of the drive (the release: one cell size).
CELL_KEEP_DIST = CELL_SIZE
MAX_POSE_CELL_DIST = CELL_SIZE / 2
POSE_DIST = 10.0
POSE_COUNT = 4
#: positions are shifted by up to this much in x and y (uniform, both signs).
POSE_SHIFT = 10.0
MIN_CELL_OBJECTS = NUM_MENTIONED
CANDIDATE_DIST = 0.5
MATCH_TOLERANCE = float(np.sqrt(2.0) / 2.0)
STRATEGIES = ("closest", "class", "direction")
# Cells are cut by spatialoc_ros.data.cell_cutting (shared with user clouds): instances kept whole
# when a third of their points is inside, stuff clipped and split into pieces on a 2 m x-y grid
# (the release: DBSCAN eps 0.75 m, 250 points, on dense clouds).
SENSOR_HEIGHT = 1.7

# colour centre indices (constants.COLOR_CENTERS order)
_DG, _G1, _GG, _BG, _G2, _BK, _GR, _BE = range(8)
#: a small palette per class: (colour centre index, weight)
PALETTES: dict[str, tuple[tuple[int, float], ...]] = {
    "building": ((_BE, 0.35), (_BG, 0.25), (_G1, 0.2), (_GG, 0.1), (_G2, 0.1)),
    "pole": ((_G1, 0.5), (_G2, 0.3), (_BK, 0.2)),
    "traffic light": ((_BK, 0.6), (_DG, 0.4)),
    "traffic sign": ((_G1, 0.4), (_BG, 0.4), (_G2, 0.2)),
    "garage": ((_BE, 0.5), (_GG, 0.3), (_G1, 0.2)),
    "stop": ((_G1, 0.5), (_BG, 0.5)),
    "smallpole": ((_G1, 0.5), (_BE, 0.3), (_G2, 0.2)),
    "lamp": ((_DG, 0.4), (_G2, 0.4), (_BK, 0.2)),
    "trash bin": ((_DG, 0.4), (_BK, 0.3), (_G2, 0.3)),
    "vending machine": ((_BK, 0.5), (_G1, 0.5)),
    "box": ((_G1, 0.4), (_BG, 0.3), (_BE, 0.3)),
    "road": ((_G2, 0.45), (_GG, 0.35), (_G1, 0.2)),
    "sidewalk": ((_G1, 0.45), (_BG, 0.25), (_G2, 0.3)),
    "parking": ((_G2, 0.5), (_GG, 0.5)),
    "wall": ((_BE, 0.4), (_G1, 0.4), (_BG, 0.2)),
    "fence": ((_GG, 0.4), (_G2, 0.3), (_DG, 0.3)),
    "guard rail": ((_G1, 0.6), (_BG, 0.4)),
    "bridge": ((_G1, 0.5), (_BE, 0.5)),
    "tunnel": ((_GG, 0.5), (_DG, 0.5)),
    "vegetation": ((_DG, 0.45), (_GR, 0.35), (_BK, 0.2)),
    "terrain": ((_GG, 0.4), (_GR, 0.35), (_DG, 0.25)),
}
BASE_COLOR_JITTER = 0.006
POINT_COLOR_NOISE = 0.025

#: drive length per scene in metres at the default scale (scene sizes differ as in KITTI-360).
_DEFAULT_ROUTE = {
    "2013_05_28_drive_0000_sync": 640.0,
    "2013_05_28_drive_0002_sync": 700.0,
    "2013_05_28_drive_0003_sync": 500.0,
    "2013_05_28_drive_0004_sync": 760.0,
    "2013_05_28_drive_0005_sync": 480.0,
    "2013_05_28_drive_0006_sync": 620.0,
    "2013_05_28_drive_0007_sync": 860.0,
    "2013_05_28_drive_0009_sync": 480.0,
    "2013_05_28_drive_0010_sync": 640.0,
}
SCALES: dict[str, dict] = {
    "small": {"route": {s: 45.0 for s in SCENES_ALL}},
    "default": {"route": dict(_DEFAULT_ROUTE)},
    "large": {"route": {s: 3.0 * v for s, v in _DEFAULT_ROUTE.items()}},
}
#: scenes that get the rare structures (chosen once per seed from a city-level stream)
_RARE_SCENE_COUNTS = {"tunnel": 2, "bridge": 3, "vending machine": 4, "stop": 5}


# ==================================================================================================
# Variation: other world models from the same rules (new options; the defaults change nothing)
# ==================================================================================================
@dataclass(frozen=True)
class Variation:
    """Settings that change the world model while keeping the data set's preparation rules.

    The defaults reproduce the original generator exactly (same random streams, same bytes); any
    other value draws its randomness from a stream of its own.

    * ``block_scale``: street-block sizes (default 70..130 m) multiplied by this (layouts);
    * ``node_jitter``: street-node jitter in metres (default 4; larger = less regular streets);
    * ``density``: share of every object's points kept (0 < d <= 1; point densities);
    * ``palette_mix``: probability that an object's colour is drawn from all eight centres instead
      of its class's palette (class / colour mix);
    * ``drop_objects``: probability that a non-road object is left out of the world (class mix);
    * ``size_jitter``: instance objects (not stuff) are scaled in x-y about their centre by a
      factor uniform in [1 - j, 1 + j] (object sizes).
    """

    block_scale: float = 1.0
    node_jitter: float = 4.0
    density: float = 1.0
    palette_mix: float = 0.0
    drop_objects: float = 0.0
    size_jitter: float = 0.0

    RANGES = {"block_scale": (0.5, 2.0), "node_jitter": (0.0, 20.0), "density": (0.05, 1.0),
              "palette_mix": (0.0, 1.0), "drop_objects": (0.0, 0.5), "size_jitter": (0.0, 0.6)}

    def __post_init__(self) -> None:
        for name, (lo, hi) in self.RANGES.items():
            value = float(getattr(self, name))
            if not (np.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"variation {name} must be in {lo:g}..{hi:g}, got {value}")
        if self.density <= 0:
            raise ValueError("variation density must be > 0")

    @property
    def is_default(self) -> bool:
        return self == Variation()

    def as_dict(self) -> dict:
        return {name: float(getattr(self, name)) for name in self.RANGES}

    @staticmethod
    def random(rng: np.random.Generator) -> "Variation":
        """A setting drawn from every option's range (for training on a family of cities)."""
        return Variation(block_scale=float(rng.uniform(0.6, 1.6)), node_jitter=float(rng.uniform(0.0, 12.0)),
                         density=float(rng.uniform(0.3, 1.0)), palette_mix=float(rng.uniform(0.0, 0.4)),
                         drop_objects=float(rng.uniform(0.0, 0.3)), size_jitter=float(rng.uniform(0.0, 0.4)))


DEFAULT_VARIATION = Variation()


# ==================================================================================================
# World
# ==================================================================================================
class _World:
    """Accumulates the objects of one scene: label, instance id, world points, rgb."""

    def __init__(self, rng: np.random.Generator, ground: Callable[[np.ndarray], np.ndarray],
                 variation: Variation = DEFAULT_VARIATION, rng_variation: Optional[np.random.Generator] = None):
        self.rng = rng
        self.ground = ground
        self.variation = variation
        self.rng_var = rng_variation
        self.labels: list[str] = []
        self.color_idx: list[int] = []  # intended colour centre of each object
        self.xyz: list[np.ndarray] = []
        self.rgb: list[np.ndarray] = []
        self.footprints: list[np.ndarray] = []  # x-y corners (4, 2) of buildings and garages

    def pick_color(self, label: str) -> int:
        pal = PALETTES[label]
        w = np.array([p[1] for p in pal])
        return pal[int(self.rng.choice(len(pal), p=w / w.sum()))][0]

    def add(self, label: str, xyz: np.ndarray, color: Optional[int] = None) -> None:
        if len(xyz) == 0:
            return
        if not self.variation.is_default:
            xyz = self._vary(label, np.asarray(xyz, dtype=np.float64))
            if xyz is None:
                return
            if self.rng_var.uniform() < self.variation.palette_mix:
                color = int(self.rng_var.integers(0, len(COLOR_CENTERS)))
        ci = self.pick_color(label) if color is None else color
        base = COLOR_CENTERS[ci] + self.rng.normal(0.0, BASE_COLOR_JITTER, 3)
        rgb = np.clip(base[None, :] + self.rng.normal(0.0, POINT_COLOR_NOISE, (len(xyz), 3)), 0.0, 1.0)
        self.labels.append(label)
        self.color_idx.append(ci)
        self.xyz.append(np.asarray(xyz, dtype=np.float64))
        self.rgb.append(rgb.astype(np.float32))


    def _vary(self, label: str, xyz: np.ndarray) -> Optional[np.ndarray]:
        """The variation's changes to one object's points (None = object dropped)."""
        v, rng = self.variation, self.rng_var
        if label != "road" and rng.uniform() < v.drop_objects:
            return None
        if v.size_jitter > 0 and label not in STUFF_CLASSES:
            factor = rng.uniform(1.0 - v.size_jitter, 1.0 + v.size_jitter)
            centre = xyz[:, 0:2].mean(axis=0)
            xyz = xyz.copy()
            xyz[:, 0:2] = centre + (xyz[:, 0:2] - centre) * factor
        if v.density < 1.0:
            keep = max(3, int(round(len(xyz) * v.density)))
            if keep < len(xyz):
                xyz = xyz[np.sort(rng.choice(len(xyz), size=keep, replace=False))]
        return xyz

    def reserve(self, f: "_Frame", a0, o0, length, depth, clearance=0.5) -> bool:
        """Claim a box footprint; False (nothing claimed) when it overlaps an earlier one.

        Footprints are oriented rectangles; overlap is tested on their separating axes."""
        c = clearance
        corners = f.xy(np.array([a0 - c, a0 + length + c, a0 + length + c, a0 - c]),
                       np.array([o0 - c, o0 - c, o0 + depth + c, o0 + depth + c]))
        if self.footprints:
            fp = np.array(self.footprints)  # (K, 4, 2)
            axes = np.concatenate([
                np.broadcast_to(np.stack([f.u, f.n]), (len(fp), 2, 2)),
                np.stack([fp[:, 1] - fp[:, 0], fp[:, 3] - fp[:, 0]], axis=1),
            ], axis=1)  # (K, 4, 2)
            pa = np.einsum("kad,cd->kac", axes, corners)  # candidate projections (K, 4 axes, 4 corners)
            pb = np.einsum("kad,kcd->kac", axes, fp)
            separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
            if (~separated.any(axis=1)).any():
                return False
        self.footprints.append(corners)
        return True

    def finish(self) -> None:
        """Number the instances and order the objects as the release does: by class, then instance id.

        Instance ids are KITTI-360 style (class * 100000 + a per-class number, drawn at random so that
        the order carries no spatial meaning)."""
        class_idx = np.array([CLASS_INDEX[lbl] for lbl in self.labels])
        inst = np.zeros(len(self.labels), dtype=np.int64)
        for c in np.unique(class_idx):
            members = np.flatnonzero(class_idx == c)
            inst[members] = (int(c) + 1) * 100000 + self.rng.permutation(len(members)) + 1
        order = np.lexsort((inst, class_idx))
        self.labels = [self.labels[i] for i in order]
        self.color_idx = [self.color_idx[i] for i in order]
        self.xyz = [self.xyz[i] for i in order]
        self.rgb = [self.rgb[i] for i in order]
        self.instance_ids = [int(inst[i]) for i in order]


class _Frame:
    """A street frame: origin p0, unit direction u, unit normal n (left of u)."""

    def __init__(self, p0: np.ndarray, u: np.ndarray):
        self.p0 = np.asarray(p0, dtype=np.float64)
        self.u = np.asarray(u, dtype=np.float64)
        self.n = np.array([-self.u[1], self.u[0]])

    def xy(self, a: np.ndarray, o: np.ndarray) -> np.ndarray:
        return self.p0[None, :] + np.asarray(a)[:, None] * self.u[None, :] + np.asarray(o)[:, None] * self.n[None, :]


def _stratified(rng, a0, a1, o0, o1, spacing):
    """Jittered-grid samples in [a0,a1] x [o0,o1]: no holes wider than ~1.4 spacing."""
    a0, a1 = min(a0, a1), max(a0, a1)
    o0, o1 = min(o0, o1), max(o0, o1)
    na = max(1, int(round((a1 - a0) / spacing)))
    no = max(1, int(round((o1 - o0) / spacing)))
    sa, so = (a1 - a0) / na, (o1 - o0) / no
    ga, go = np.meshgrid((np.arange(na) + 0.5) * sa + a0, (np.arange(no) + 0.5) * so + o0, indexing="ij")
    ga = ga.ravel() + rng.uniform(-0.4, 0.4, ga.size) * sa
    go = go.ravel() + rng.uniform(-0.4, 0.4, go.size) * so
    return ga, go


def _ground_patch(w: _World, f: _Frame, a0, a1, o0, o1, spacing, z0=0.0, zjit=0.05):
    a, o = _stratified(w.rng, a0, a1, o0, o1, spacing)
    xy = f.xy(a, o)
    z = w.ground(xy) + z0 + w.rng.normal(0.0, zjit, len(a))
    return np.column_stack([xy, z])


def _box_surface(w: _World, f: _Frame, a0, o0, length, depth, height, n, z0=0.0):
    """Points on the four walls and the roof of a box (local frame: along a, across o)."""
    rng = w.rng
    areas = np.array([length * height, length * height, depth * height, depth * height, length * depth])
    face = rng.choice(5, size=n, p=areas / areas.sum())
    s, t = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    a = np.where(face < 2, s * length, np.where(face == 2, 0.0, np.where(face == 3, length, s * length)))
    o = np.where(face == 0, 0.0, np.where(face == 1, depth, np.where(face < 4, s * depth, t * depth)))
    h = np.where(face < 4, t * height, height)
    xy = f.xy(a0 + a, o0 + o)
    z = w.ground(xy) + z0 + h
    return np.column_stack([xy, z])


def _vertical(w: _World, xy0: np.ndarray, h0, h1, n, radius=0.08):
    xy = xy0[None, :] + w.rng.normal(0.0, radius, (n, 2))
    z = w.ground(xy) + w.rng.uniform(h0, h1, n)
    return np.column_stack([xy, z])


def _linear(w: _World, f: _Frame, a0, a1, o, h0, h1, spacing, per_station=2):
    """A thin vertical structure along the street (fence, wall, guard rail)."""
    n_st = max(2, int(round(abs(a1 - a0) / spacing)))
    a = np.repeat(np.linspace(a0, a1, n_st), per_station) + w.rng.uniform(-0.3, 0.3, n_st * per_station) * spacing
    oo = o + w.rng.normal(0.0, 0.06, len(a))
    xy = f.xy(a, oo)
    z = w.ground(xy) + w.rng.uniform(h0, h1, len(a))
    return np.column_stack([xy, z])


def _tree(w: _World, xy0: np.ndarray):
    rng = w.rng
    r = rng.uniform(1.8, 3.2)
    hc = rng.uniform(3.5, 6.0)
    n = int(np.clip(18 * r, 35, 70))
    v = rng.normal(0.0, 1.0, (n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v *= rng.uniform(0.6, 1.0, (n, 1))
    xy = xy0[None, :] + v[:, :2] * r
    z = w.ground(xy) + hc + v[:, 2] * r * 0.8
    trunk = _vertical(w, xy0, 0.0, hc - 0.5 * r, 8, radius=0.1)
    return np.vstack([np.column_stack([xy, z]), trunk])


def _small_box(w: _World, f: _Frame, a, o, length, depth, height, n, z0=0.0):
    return _box_surface(w, f, a - length / 2, o - depth / 2, length, depth, height, n, z0)


def _building_points(length, depth, height):
    return int(np.clip(0.08 * 2 * (length + depth) * height + 0.04 * length * depth, 60, 240))


def _street_furniture(w: _World, f: _Frame, side: float, L: float, lay: dict, colors: dict, extras: dict):
    """Poles, lamps, signs, lights, bins, boxes, small poles, stops, vending machines of one side."""
    rng = w.rng
    curb = side * (lay["rw"] + 0.6)
    back = side * (lay["rw"] + max(lay["sw"], 1.5) - 0.5)
    used: list[float] = []

    def free(a, gap=2.5):
        return 1.0 < a < L - 1.0 and all(abs(a - b) > gap for b in used)

    if rng.uniform() < 0.85:  # street lamps at a regular spacing, one colour per street side
        sp = rng.uniform(16.0, 28.0)
        for a in np.arange(rng.uniform(4.0, sp), L - 3.0, sp):
            if not free(a):
                continue
            used.append(a)
            xy0 = f.xy([a], [curb])[0]
            pts = _vertical(w, xy0, 0.0, rng.uniform(6.5, 8.5), 32)
            head = f.xy(np.full(6, a), np.full(6, curb - side * 1.0)) + rng.normal(0, 0.1, (6, 2))
            hz = w.ground(head) + pts[:, 2].max() - w.ground(xy0[None])[0] + rng.normal(0, 0.1, 6)
            w.add("lamp", np.vstack([pts, np.column_stack([head, hz])]), colors["lamp"])
    for _ in range(int(rng.poisson(1.2))):  # utility poles
        a = rng.uniform(3.0, L - 3.0)
        if free(a):
            used.append(a)
            w.add("pole", _vertical(w, f.xy([a], [curb])[0], 0.0, rng.uniform(5.0, 9.0), 32), colors["pole"])
    sign_at = [rng.uniform(6.0, 12.0) if end == 0 else L - rng.uniform(6.0, 12.0)
               for end in (0, 1) if rng.uniform() < 0.45]
    sign_at += list(rng.uniform(10.0, max(10.5, L - 10.0), int(rng.poisson(0.5))))
    for a in sign_at:  # traffic signs near the intersections and mid-block (plate above a pole)
        if not free(a, 1.5):
            continue
        used.append(a)
        xy0 = f.xy([a], [curb])[0]
        h = rng.uniform(2.2, 2.8)
        if rng.uniform() < 0.7:
            w.add("pole", _vertical(w, xy0, 0.0, h, 30), colors["pole"])
        plate = f.xy(np.full(30, a) + rng.uniform(-0.35, 0.35, 30), np.full(30, curb) + rng.normal(0, 0.03, 30))
        pz = w.ground(plate) + h + rng.uniform(0.0, 0.7, 30)
        w.add("traffic sign", np.column_stack([plate, pz]), colors["traffic sign"])
    for end in (0, 1):  # traffic lights at busy intersections
        if extras["lights"][end] and rng.uniform() < 0.5:
            a = rng.uniform(3.0, 6.0) if end == 0 else L - rng.uniform(3.0, 6.0)
            xy0 = f.xy([a], [curb])[0]
            h = rng.uniform(3.0, 4.5)
            w.add("pole", _vertical(w, xy0, 0.0, h, 30), colors["pole"])
            head = _small_box(w, f, a, curb - side * 0.3, 0.35, 0.35, 1.0, 36, z0=h)
            w.add("traffic light", head, colors["traffic light"])
    for _ in range(int(rng.poisson(1.2))):  # trash bins
        a = rng.uniform(3.0, L - 3.0)
        if free(a, 1.5):
            used.append(a)
            w.add("trash bin", _small_box(w, f, a, side * (lay["rw"] + 1.2), 0.6, 0.6, 1.0, 34), colors["trash bin"])
    for _ in range(int(rng.poisson(1.0))):  # electric boxes near the buildings
        a = rng.uniform(3.0, L - 3.0)
        if free(a, 1.5):
            used.append(a)
            lb, db, hb = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.8), rng.uniform(0.8, 1.6)
            w.add("box", _small_box(w, f, a, back, lb, db, hb, int(30 + 10 * hb)))
    if rng.uniform() < 0.3:  # a row of small poles (bollards)
        a0 = rng.uniform(5.0, max(5.5, L - 12.0))
        for k in range(int(rng.integers(3, 7))):
            a = a0 + 1.5 * k
            w.add("smallpole", _vertical(w, f.xy([a], [curb])[0], 0.0, rng.uniform(0.8, 1.2), 30, 0.05),
                  colors["smallpole"])
    if rng.uniform() < 0.05 or extras.get("stop"):  # bus stop shelter
        a = rng.uniform(8.0, max(8.5, L - 8.0)) if extras.get("stop_at") is None else extras["stop_at"]
        if free(a, 3.0):
            used.append(a)
            w.add("stop", _small_box(w, f, a, side * (lay["rw"] + 1.6), 3.5, 1.5, 2.5, 80))
    if rng.uniform() < 0.03 or extras.get("vending"):
        a = rng.uniform(5.0, max(5.5, L - 5.0)) if extras.get("vending_at") is None else extras["vending_at"]
        if free(a, 1.5):
            used.append(a)
            w.add("vending machine", _small_box(w, f, a, back, 1.0, 0.8, 1.8, 40))


def _lot(w: _World, f: _Frame, side: float, a: float, length: float, front: float, style: str, probs,
         colors: dict, row: int) -> None:
    """One lot beside the street: a building (maybe with a garage), terrain, vegetation or parking."""
    rng = w.rng
    kinds = ("building", "terrain", "vegetation", "parking", "garage")
    kind = kinds[int(rng.choice(5, p=probs))]
    depth = rng.uniform(8.0, 16.0)
    o0 = side * front if side > 0 else side * (front + depth)
    if kind in ("building", "garage"):
        g_len = min(length, 7.0)
        dims = (length, depth) if kind == "building" else (g_len, 6.0)
        go = o0 if kind == "building" else (side * (front + 1.0) if side > 0 else side * (front + 7.0))
        if not w.reserve(f, a, go, dims[0], dims[1]):
            kind = "terrain"
    if kind == "building":
        if style == "residential":
            height = rng.uniform(5.0, 10.0)
        else:
            height = rng.uniform(6.0, 22.0) if row == 0 else rng.uniform(8.0, 28.0)
        w.add("building", _box_surface(w, f, a, o0, length, depth, height, _building_points(length, depth, height)),
              colors["building"] if rng.uniform() < 0.5 else None)
        if style == "residential" and row == 0 and rng.uniform() < 0.35:  # a garage behind it
            go = side * (front + depth + 2.0) if side > 0 else side * (front + depth + 2.0 + 6.0)
            if w.reserve(f, a + 1.0, go, 4.0, 6.0):
                w.add("garage", _box_surface(w, f, a + 1.0, go, 4.0, 6.0, 2.7, 50))
        if rng.uniform() < 0.3:  # a box or a bin by the entrance
            w.add("box" if rng.uniform() < 0.5 else "trash bin",
                  _small_box(w, f, a + rng.uniform(1.0, max(1.5, length - 1.0)), side * (front - 0.6), 0.7, 0.6, 1.1, 34))
        if rng.uniform() < 0.3:  # a hedge or a lawn in front
            w.add("vegetation" if rng.uniform() < 0.5 else "terrain",
                  _ground_patch(w, f, a, a + length, side * (front - 0.2), side * (front - 1.6), 0.9, z0=0.4,
                                zjit=0.2))
    elif kind == "garage":
        w.add("garage", _box_surface(w, f, a, go, g_len, 6.0, 2.7, 55))
        if length - g_len > 3.0:
            w.add("terrain", _ground_patch(w, f, a + g_len, a + length, side * front, side * (front + 10.0), 1.6,
                                           z0=0.05), colors["terrain"])
    elif kind == "terrain":
        w.add("terrain", _ground_patch(w, f, a, a + length, side * front, side * (front + depth), 1.6, z0=0.05),
              colors["terrain"] if rng.uniform() < 0.6 else None)
        if rng.uniform() < 0.4:
            bush = _ground_patch(w, f, a + 1.0, a + length - 1.0, side * (front + depth - 2.5),
                                 side * (front + depth - 1.0), 1.0, z0=0.8, zjit=0.4)
            w.add("vegetation", bush)
        for k in range(int(rng.integers(0, 3))):  # single trees on the lawn
            w.add("vegetation", _tree(w, f.xy([a + (k + 0.5) / 2.0 * length], [side * (front + rng.uniform(0.3, 0.8) * depth)])[0]))
    elif kind == "vegetation":
        w.add("vegetation", _ground_patch(w, f, a, a + length, side * front, side * (front + depth), 1.5,
                                          z0=1.2, zjit=0.8))
    else:
        w.add("parking", _ground_patch(w, f, a, a + length, side * front, side * (front + depth), 1.6, z0=0.03))
        if rng.uniform() < 0.5:
            w.add("lamp", _vertical(w, f.xy([a + 0.5 * length], [side * (front + depth - 0.5)])[0], 0.0, 6.0, 34),
                  colors["lamp"])
        if rng.uniform() < 0.4:
            w.add("smallpole", _vertical(w, f.xy([a + 1.0], [side * (front + 0.5)])[0], 0.0, 1.0, 30, 0.05),
                  colors["smallpole"])


def _street_side(w: _World, f: _Frame, side: float, L: float, lay: dict, style: str, colors: dict,
                 excl: list, extras: dict):
    """Everything on one side of a street segment of length L (side = +1 left, -1 right)."""
    rng = w.rng
    rw, sw = lay["rw"], lay["sw"]
    front = rw + sw + lay["setback"]  # where the lots begin
    # sidewalk with driveway cuts: one instance, several pieces
    if sw > 0:
        cuts = sorted(rng.uniform(8.0, L - 8.0, int(rng.integers(0, 3)))) if L > 20 else []
        a_prev = 0.0
        parts = []
        for c in list(cuts) + [L]:
            if c - a_prev > 2.0:
                parts.append(_ground_patch(w, f, a_prev, c, side * rw, side * (rw + sw), 1.4, z0=0.12))
            a_prev = c + 3.5
        if parts:
            w.add("sidewalk", np.vstack(parts), colors["sidewalk"])
    elif style == "industrial" or rng.uniform() < 0.5:
        w.add("guard rail", _linear(w, f, 2.0, L - 2.0, side * (rw + 0.3), 0.4, 0.8, 1.0), colors["guard rail"])
    if rng.uniform() < 0.2:  # parking lane along the road edge
        a0 = rng.uniform(5.0, max(5.5, L / 2))
        a1 = min(L - 5.0, a0 + rng.uniform(20.0, 50.0))
        if a1 - a0 > 8.0:
            w.add("parking", _ground_patch(w, f, a0, a1, side * (rw - 2.3), side * rw, 1.4, z0=0.02))
    _street_furniture(w, f, side, L, lay, colors, extras)
    if lay["setback"] > 1.2 and rng.uniform() < 0.6:  # a grass verge between sidewalk and lots
        w.add("terrain", _ground_patch(w, f, 4.0, L - 4.0, side * (rw + sw), side * (front - 0.1), 1.2, z0=0.05),
              colors["terrain"])
    if rng.uniform() < (0.7 if style in ("residential", "green") else 0.4):  # a tree row, one instance
        o = side * (rw + max(sw, 1.0) - 0.6 + (1.5 if style == "green" else 0.0))
        sp = rng.uniform(8.0, 12.0)
        trees = [_tree(w, f.xy([a], [o])[0]) for a in np.arange(rng.uniform(3.0, sp), L - 3.0, sp)
                 if not any(e0 - 3 < a < e1 + 3 for e0, e1 in excl)]
        if trees:
            w.add("vegetation", np.vstack(trees), colors["vegetation"])
    if style == "green" and rng.uniform() < 0.6:
        w.add("fence", _linear(w, f, 4.0, L - 4.0, side * (front - 0.3), 0.3, 1.6, 0.9), colors["fence"])
    if style == "industrial" and rng.uniform() < 0.7:
        w.add("wall", _linear(w, f, 6.0, L - 6.0, side * (front - 0.3), 0.0, rng.uniform(2.0, 3.0), 0.8))

    # two rows of lots between the corners (the second one behind the first)
    probs = {
        "urban": (0.72, 0.1, 0.06, 0.12, 0.0),
        "residential": (0.5, 0.2, 0.15, 0.05, 0.1),
        "green": (0.05, 0.5, 0.4, 0.05, 0.0),
        "industrial": (0.4, 0.3, 0.0, 0.3, 0.0),
    }[style]
    for row, (margin, o_front) in enumerate(((16.0, front), (22.0, front + 19.0))):
        a = margin + rng.uniform(0.0, 4.0)
        while a < L - margin - 6.0:
            length = min(rng.uniform(7.0, 24.0), L - margin - a)
            if any(e0 - 6 < a + length and a < e1 + 6 for e0, e1 in excl) and row == 0:
                a += length + 4.0
                continue
            _lot(w, f, side, a, length, o_front, style, probs, colors, row)
            a += length + (rng.uniform(0.0, 3.0) if style == "urban" else rng.uniform(1.0, 8.0))
    # corners: terrain / bushes near the intersections
    margin = 16.0
    for end in (0, 1):
        if rng.uniform() < 0.5:
            a0, a1 = (rw + 4.0, margin - 2.0) if end == 0 else (L - margin + 2.0, L - rw - 4.0)
            if a1 - a0 > 4.0:
                w.add("terrain", _ground_patch(w, f, a0, a1, side * (front + 1.0), side * (front + 12.0), 1.6, z0=0.05),
                      colors["terrain"])
        if rng.uniform() < 0.3:
            a0 = rw + 5.0 if end == 0 else L - margin + 3.0
            w.add("vegetation", _tree(w, f.xy([a0 + 4.0], [side * (front + 6.0)])[0]))


def _street(w: _World, p0: np.ndarray, p1: np.ndarray, extras: dict, stub: bool = False):
    rng = w.rng
    d = p1 - p0
    L = float(np.linalg.norm(d))
    f = _Frame(p0, d / L)
    rw = float(rng.uniform(3.2, 5.0))
    colors = {k: w.pick_color(k) for k in PALETTES}
    ext = 0.0 if stub else rw  # fill the intersections
    w.add("road", _ground_patch(w, f, -ext, L + ext, -rw, rw, 1.7), colors["road"])
    style = str(rng.choice(["urban", "residential", "green", "industrial"], p=[0.5, 0.3, 0.1, 0.1]))
    for side in (1.0, -1.0):
        sw = float(rng.uniform(2.0, 3.5)) if rng.uniform() < 0.9 else 0.0
        lay = {"rw": rw, "sw": sw, "setback": float(rng.uniform(0.0, 3.0))}
        if stub:
            if sw > 0:
                w.add("sidewalk", _ground_patch(w, f, rw + 1.0, L, side * rw, side * (rw + sw), 1.4, z0=0.12),
                      colors["sidewalk"])
            continue
        s_style = style if rng.uniform() < 0.7 else str(rng.choice(["urban", "residential", "green", "industrial"]))
        side_extras = dict(extras.get(side, {}))
        side_extras.setdefault("lights", extras.get("lights", (False, False)))
        _street_side(w, f, side, L, lay, s_style, colors, extras.get("excl", []), side_extras)
    if extras.get("tunnel") and not stub:
        a0, a1 = extras["tunnel"]
        R = rw + 3.5
        arc, ang = _stratified(rng, a0, a1, 0.0, np.pi * R, 1.4)
        phi = ang / R
        xy = f.xy(arc, R * np.cos(phi))
        z = w.ground(xy) + 0.75 * R * np.sin(phi) + 0.3
        w.add("tunnel", np.column_stack([xy, z]))
    if extras.get("bridge") and not stub:
        ab = extras["bridge"]
        deck = _ground_patch(w, f, ab - 5.0, ab + 5.0, -22.0, 22.0, 1.7, z0=rng.uniform(6.0, 7.5), zjit=0.15)
        w.add("bridge", deck)
        for s in (-1.0, 1.0):
            rail = _ground_patch(w, f, ab + s * 5.0 - 0.2, ab + s * 5.0 + 0.2, -22.0, 22.0, 1.2,
                                 z0=float(np.median(deck[:, 2] - w.ground(deck[:, :2]))) + 0.8, zjit=0.2)
            w.add("guard rail", rail)
    return L


# ==================================================================================================
# Route (the drive) on a jittered, rotated lattice
# ==================================================================================================
def _make_route(rng: np.random.Generator, target_len: float, variation: Variation = DEFAULT_VARIATION):
    n = 15
    lo, hi = 70.0 * variation.block_scale, 130.0 * variation.block_scale
    bx = np.concatenate([[0.0], np.cumsum(rng.uniform(lo, hi, n - 1))])
    by = np.concatenate([[0.0], np.cumsum(rng.uniform(lo, hi, n - 1))])
    jit = variation.node_jitter
    nodes = np.stack(np.meshgrid(bx, by, indexing="ij"), axis=-1) + rng.uniform(-jit, jit, (n, n, 2))
    theta = rng.uniform(0.0, np.pi / 2)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    origin = rng.uniform([-2000.0, -2000.0], [4000.0, 4000.0])
    nodes = (nodes - nodes[n // 2, n // 2]) @ rot.T + origin
    moves = ((1, 0), (-1, 0), (0, 1), (0, -1))
    cur = (n // 2, n // 2)
    heading = int(rng.integers(0, 4))
    path = [cur]
    edges: list[tuple] = []
    visited: set = set()
    length = 0.0
    while length < target_len:
        options, weights = [], []
        for k, (di, dj) in enumerate(moves):
            nxt = (cur[0] + di, cur[1] + dj)
            if not (1 <= nxt[0] < n - 1 and 1 <= nxt[1] < n - 1):
                continue
            if moves[heading] == (-di, -dj) and len(path) > 1:
                continue
            e = tuple(sorted((cur, nxt)))
            wgt = (2.0 if k == heading else 1.0) * (0.05 if e in visited else 1.0)
            options.append((k, nxt, e))
            weights.append(wgt)
        wts = np.array(weights) / np.sum(weights)
        k, nxt, e = options[int(rng.choice(len(options), p=wts))]
        length += float(np.linalg.norm(nodes[nxt] - nodes[cur]))
        visited.add(e)
        edges.append(e)
        heading, cur = k, nxt
        path.append(cur)
    return nodes, path


def _polyline_samples(points: np.ndarray, step: float, total: float):
    """Points every ``step`` metres along a polyline, up to length ``total``."""
    seg = np.diff(points, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    s = np.arange(0.0, min(total, cum[-1]) + 1e-9, step)
    i = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
    t = (s - cum[i]) / seg_len[i]
    return points[i] + t[:, None] * seg[i]


# ==================================================================================================
# Cells and poses
# ==================================================================================================
def _closest(obj: Object3d, anchor: np.ndarray) -> tuple[np.ndarray, float]:
    d = np.linalg.norm(obj.xyz - anchor[None, :], axis=1)
    i = int(np.argmin(d))
    return obj.xyz[i].astype(np.float64), float(d[i])


def _round_robin(keys: list, count: int) -> list[int]:
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out, offset = [], 0
    while len(out) < count:
        for members in groups.values():
            if len(members) > offset:
                out.append(members[offset])
        offset += 1
    return out[:count]


def _select(strategy: str, cands: list[int], dists: np.ndarray, labels: list[str], directions: list[str]):
    if strategy == "closest":
        order = np.argsort(dists[cands], kind="stable")[:NUM_MENTIONED]
        return [cands[i] for i in order]
    if strategy == "class":
        return [cands[i] for i in _round_robin([labels[c] for c in cands], NUM_MENTIONED)]
    if strategy == "direction":
        return [cands[i] for i in _round_robin([directions[c] for c in cands], NUM_MENTIONED)]
    raise ValueError(f"unknown selection strategy {strategy!r}")


def _cell_bbox(center: np.ndarray) -> np.ndarray:
    return np.concatenate([center - CELL_SIZE / 2, center + CELL_SIZE / 2]).astype(np.float64)


def _build_scene(scene: str, seed: int, route_len: float, rare: dict,
                 variation: Variation = DEFAULT_VARIATION) -> tuple[list, list, dict, dict]:
    short = short_scene_name(scene)
    num = int(short)
    rng_world = np.random.default_rng([seed, num, 1])
    rng_pose = np.random.default_rng([seed, num, 2])
    rng_var = np.random.default_rng([seed, num, 3])

    # --- world ---------------------------------------------------------------------------------
    nodes, path = _make_route(rng_world, route_len, variation)
    z0 = rng_world.uniform(100.0, 140.0)
    grad = rng_world.uniform(-0.01, 0.01, 2)
    origin = nodes[path[0]].copy()

    def ground(xy: np.ndarray) -> np.ndarray:
        return z0 + (np.asarray(xy) - origin) @ grad

    world = _World(rng_world, ground, variation, rng_var)
    route_pts = np.array([nodes[p] for p in path])
    drive = _polyline_samples(route_pts, 2.0, route_len)  # the driven trajectory (x-y)
    # along-range of each driven edge actually covered by the (truncated) drive
    covered: dict = {}
    cum = 0.0
    for a, b in zip(path[:-1], path[1:]):
        seg = float(np.linalg.norm(nodes[b] - nodes[a]))
        e = tuple(sorted((a, b)))
        reach = min(seg, max(0.0, route_len - cum))
        if reach > 0:
            lo, hi = (0.0, reach) if e[0] == a else (seg - reach, seg)
            old = covered.get(e, (seg, 0.0))
            covered[e] = (min(old[0], lo), max(old[1], hi))
        cum += seg
    edges = sorted(covered)
    degree: dict = {}
    for e in edges:
        for v in e:
            degree[v] = degree.get(v, 0) + 1
    # rare structures of this scene on the longest covered stretch
    best_e = max(edges, key=lambda e: (covered[e][1] - covered[e][0], e))
    lo, hi = covered[best_e]
    special: dict = {e: {} for e in edges}
    if rare.get("tunnel") and hi - lo >= 40.0:
        mid = 0.5 * (lo + hi)
        half = min(20.0, 0.5 * (hi - lo) - 5.0)
        special[best_e]["tunnel"] = (mid - half, mid + half)
        special[best_e].setdefault("excl", []).append((mid - half, mid + half))
    if rare.get("bridge"):
        # over the longest covered stretch that has no tunnel
        free_edges = [e for e in sorted(edges, key=lambda e: (-(covered[e][1] - covered[e][0]), e))
                      if "tunnel" not in special[e] and covered[e][1] - covered[e][0] >= 30.0]
        if free_edges:
            tlo, thi = covered[free_edges[0]]
            ab = 0.5 * (tlo + thi)
            special[free_edges[0]]["bridge"] = ab
            special[free_edges[0]].setdefault("excl", []).append((ab - 6.0, ab + 6.0))
    for kind in ("stop", "vending machine"):
        if rare.get(kind):
            side = 1.0 if rng_world.uniform() < 0.5 else -1.0
            key = "stop" if kind == "stop" else "vending"
            special[best_e].setdefault(side, {})[key] = True
            special[best_e][side][key + "_at"] = float(rng_world.uniform(lo + 2.0, max(lo + 2.5, hi - 2.0)))
    for e in edges:
        special[e]["lights"] = (degree.get(e[0], 0) >= 2 or rng_world.uniform() < 0.3,
                                degree.get(e[1], 0) >= 2 or rng_world.uniform() < 0.3)
        _street(world, nodes[e[0]], nodes[e[1]], special[e])
    # stubs of the crossing streets that the drive passes
    edge_set = set(edges)
    n = nodes.shape[0]
    for v in sorted(degree):
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            u = (v[0] + di, v[1] + dj)
            if 0 <= u[0] < n and 0 <= u[1] < n and tuple(sorted((v, u))) not in edge_set:
                if rng_world.uniform() < 0.6:
                    d = nodes[u] - nodes[v]
                    _street(world, nodes[v], nodes[v] + d / np.linalg.norm(d) * 25.0, {}, stub=True)
    world.finish()
    index = WorldIndex(world.labels, world.instance_ids, world.xyz, world.rgb)

    # --- database cells on a 10 m grid near the drive ------------------------------------------
    drive_z = ground(drive) + SENSOR_HEIGHT
    tree = cKDTree(drive)
    x0, y0 = np.floor(drive.min(axis=0) - CELL_KEEP_DIST).astype(np.int64)
    x1, y1 = np.ceil(drive.max(axis=0) + CELL_KEEP_DIST).astype(np.int64)
    gx, gy = np.mgrid[x0: x1: int(CELL_STRIDE), y0: y1: int(CELL_STRIDE)]
    centers = np.column_stack([gx.ravel(), gy.ravel()]).astype(np.float64)
    grid_ij = np.column_stack([((gx - x0) // int(CELL_STRIDE)).ravel(), ((gy - y0) // int(CELL_STRIDE)).ravel()])
    dist, nearest = tree.query(centers)
    keep = dist <= CELL_KEEP_DIST
    centers, grid_ij, nearest = centers[keep], grid_ij[keep], nearest[keep]
    centers = np.column_stack([centers, drive_z[nearest]])
    cells: list[Cell] = []
    cell_grid: dict = {}
    for idx in range(len(centers)):
        bbox = _cell_bbox(centers[idx])
        objects = index.crop(bbox, CELL_SIZE)
        if len(objects) < MIN_CELL_OBJECTS:
            continue
        cell = Cell(f"{short}_{idx:05d}", short, objects, float(CELL_SIZE), bbox)
        cells.append(cell)
        cell_grid[(int(grid_ij[idx, 0]), int(grid_ij[idx, 1]))] = cell.id
    direction_map = {}
    for (i, j), cid in sorted(cell_grid.items()):
        direction_map[cid] = {
            "east": cell_grid.get((i + 1, j)),
            "west": cell_grid.get((i - 1, j)),
            "north": cell_grid.get((i, j + 1)),
            "south": cell_grid.get((i, j - 1)),
        }

    # --- poses ---------------------------------------------------------------------------------
    cand_locs = _polyline_samples(route_pts, POSE_DIST, route_len)
    locs: list[np.ndarray] = []
    for p in cand_locs:  # as the release: keep a location only when >= POSE_DIST from all kept ones
        if not locs or np.min(np.linalg.norm(np.array(locs) - p, axis=1)) >= POSE_DIST - 1e-6:
            locs.append(p)
    cell_centers = np.array([c.get_center() for c in cells])
    cell_inst = [np.array([o.instance_id for o in c.objects]) for c in cells]
    poses: list[Pose] = []
    counters = {"positions": 0, "rejected": 0, "duplicates": 0, "too_far": 0}
    for loc in locs:
        for _ in range(POSE_COUNT):
            xy = loc + rng_pose.uniform(-POSE_SHIFT, POSE_SHIFT, 2)
            pose_w = np.array([xy[0], xy[1], float(ground(loc[None])[0]) + SENSOR_HEIGHT])
            if not cells:
                counters["too_far"] += 1
                continue
            dxy = np.linalg.norm(cell_centers[:, 0:2] - pose_w[None, 0:2], axis=1)
            b = int(np.argmin(dxy))
            if dxy[b] > MAX_POSE_CELL_DIST:
                counters["too_far"] += 1
                continue
            new = _describe_position(index, pose_w, cells[b], cell_inst[b], counters)
            if new:
                counters["positions"] += 1
                poses.extend(new)
    return cells, poses, direction_map, {"world_objects": len(world.labels), **counters}


def _describe_position(index: WorldIndex, pose_w: np.ndarray, best: Cell, best_inst: np.ndarray,
                       counters: dict) -> list[Pose]:
    pbbox = _cell_bbox(pose_w)
    objs = index.crop(pbbox, CELL_SIZE)
    if len(objs) < MIN_CELL_OBJECTS:
        counters["rejected"] += 1
        return []
    pose_n = (pose_w - pbbox[0:3]) / CELL_SIZE
    closest, dists = [], np.zeros(len(objs))
    for i, o in enumerate(objs):
        cp, d = _closest(o, pose_n)
        closest.append(cp)
        dists[i] = d
    cands = [i for i in range(len(objs)) if dists[i] <= CANDIDATE_DIST]
    if len(cands) < NUM_MENTIONED:
        counters["rejected"] += 1
        return []
    labels = [o.label for o in objs]
    directions = [direction_of(closest[i], pose_n) for i in range(len(objs))]
    pose_b = (pose_w - np.asarray(best.bbox_w[0:3])) / best.cell_size
    best_closest: dict = {}
    out: list[Pose] = []
    mentioned: list[list[int]] = []
    for strategy in STRATEGIES:
        chosen = _select(strategy, cands, dists, labels, directions)
        descriptions = []
        matched: set = set()
        for i in chosen:
            o = objs[i]
            rgb = o.get_color_rgb()
            off_center = (pose_n - o.get_center())[0:2].astype(np.float64)
            off_closest = (pose_n - closest[i])[0:2]
            d = DescriptionBestCell(
                object_id=None, object_instance_id=o.instance_id, object_label=o.label,
                object_color_rgb=rgb, object_color_text=o.get_color_text(), direction=directions[i],
                offset_center=off_center, offset_closest=off_closest, closest_point=closest[i][0:2].copy(),
                is_matched=False,
            )
            js = [int(j) for j in np.flatnonzero(best_inst == o.instance_id) if int(j) not in matched]
            if js:
                for j in js:
                    if j not in best_closest:
                        best_closest[j] = _closest(best.objects[j], pose_b)[0]
                offs = np.array([(pose_b - best_closest[j])[0:2] for j in js])
                k = int(np.argmin(np.linalg.norm(offs - off_closest[None, :], axis=1)))
                if np.linalg.norm(offs[k] - off_closest) <= MATCH_TOLERANCE:
                    j = js[k]
                    matched.add(j)
                    d.object_id = j
                    d.closest_point = best_closest[j][0:2].copy()
                    d.best_offset_center = (pose_b - best.objects[j].get_center())[0:2].astype(np.float64)
                    d.best_offset_closest = offs[k].copy()
                    d.is_matched = True
            descriptions.append(d)
        ids = sorted(d.object_id for d in descriptions if d.is_matched)
        if ids in mentioned:
            counters["duplicates"] += 1
            continue
        mentioned.append(ids)
        out.append(Pose(pose_b.copy(), pose_w.copy(), best.id, best.scene_name, descriptions, strategy))
    return out


# ==================================================================================================
# City
# ==================================================================================================
def _rare_assignment(seed: int) -> dict[str, dict]:
    rng = np.random.default_rng([seed, 9999])
    out: dict[str, dict] = {s: {} for s in SCENES_ALL}
    for kind, count in sorted(_RARE_SCENE_COUNTS.items()):
        for i in rng.choice(len(SCENES_ALL), size=count, replace=False):
            out[SCENES_ALL[int(i)]][kind] = True
    return out


def _split_of(scene: str) -> str:
    for split in ("train", "val", "test"):
        if scene in SPLITS[split]:
            return split
    return "other"


def generate_city(out_dir: str, seed: int = 0, scale: str = "default", scenes: Optional[Iterable[str]] = None,
                  log: Optional[Callable[[str], None]] = None, variation: Variation = DEFAULT_VARIATION) -> dict:
    """Write a synthetic city under ``out_dir`` (cells/, poses/, direction/) and return its stats.

    ``scenes`` restricts generation to some of the nine scenes (each scene depends only on the seed
    and scale, so a subset is byte-identical to the same scenes of a full run). ``variation``
    changes the world model (:class:`Variation`); the default writes the original bytes.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    scene_list = sorted(SCENES_ALL if scenes is None else set(scenes))
    unknown = [s for s in scene_list if s not in SCENES_ALL]
    if unknown:
        raise ValueError(f"unknown scene(s) {unknown}; the synthetic city has {list(SCENES_ALL)}")
    t_start = time.perf_counter()
    rare = _rare_assignment(seed)
    for sub in ("cells", "poses", "direction"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    stats: dict = {"seed": seed, "scale": scale, "version": GENERATOR_VERSION, "scenes": {}, "splits": {}}
    if not variation.is_default:
        stats["variation"] = variation.as_dict()
    for scene in scene_list:
        t0 = time.perf_counter()
        cells, poses, dmap, info = _build_scene(scene, seed, SCALES[scale]["route"][scene], rare[scene], variation)
        with open(os.path.join(out_dir, "cells", f"{scene}.pkl"), "wb") as f:
            pickle.dump(cells, f, protocol=4)
        with open(os.path.join(out_dir, "poses", f"{scene}.pkl"), "wb") as f:
            pickle.dump(poses, f, protocol=4)
        with open(os.path.join(out_dir, "direction", f"{scene}.json"), "w", encoding="utf-8") as f:
            json.dump(dmap, f, sort_keys=True, indent=1)
            f.write("\n")
        entry = {
            "cells": len(cells), "poses": len(poses), "objects": sum(len(c.objects) for c in cells),
            **info, "seconds": round(time.perf_counter() - t0, 2),
        }
        stats["scenes"][scene] = entry
        if log:
            log(f"  {scene} ({_split_of(scene)}): {entry['cells']} cells, {entry['poses']} queries from "
                f"{entry['positions']} positions, {entry['seconds']:.1f} s")
    for split in ("train", "val", "test"):
        present = [s for s in SPLITS[split] if s in stats["scenes"]]
        stats["splits"][split] = {
            "scenes": len(present),
            "queries": sum(stats["scenes"][s]["poses"] for s in present),
            "positions": sum(stats["scenes"][s]["positions"] for s in present),
            "cells": sum(stats["scenes"][s]["cells"] for s in present),
            "objects": sum(stats["scenes"][s]["objects"] for s in present),
        }
    info = {k: v for k, v in stats.items() if k != "scenes"}
    info["scenes"] = {s: {k: v for k, v in e.items() if k != "seconds"} for s, e in stats["scenes"].items()}
    with open(os.path.join(out_dir, "synthetic_city.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, sort_keys=True, indent=1)
        f.write("\n")
    stats["seconds"] = round(time.perf_counter() - t_start, 2)
    return stats


def default_city_path() -> str:
    """$SPATIALOC_DATA_DIR/default_city_seed0, else ~/.cache/spatialoc_ros/default_city_seed0."""
    root = os.environ.get("SPATIALOC_DATA_DIR")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "spatialoc_ros")
    return os.path.join(root, "default_city_seed0")


def _city_version(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, "synthetic_city.json"), encoding="utf-8") as f:
            return int(json.load(f).get("version", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _make_shareable(folder: str) -> None:
    """Folders 0755 and files 0644 under ``folder`` (mkdtemp makes its folder 0700): the default
    city is a cache other users and services (a ROS node under another account) read."""
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def ensure_default_city(log: Optional[Callable[[str], None]] = print) -> str:
    """Path of the default synthetic city (seed 0, scale default), generated there when missing.

    It is written to a temporary folder beside the target and renamed into place, so a partly
    written city is never mistaken for a complete one. A city written by another version of this
    generator is replaced.
    """
    path = default_city_path()
    present = os.path.isdir(os.path.join(path, "cells"))
    if present and _city_version(path) == GENERATOR_VERSION:
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if log:
        reason = "an older generator's city is" if present else "nothing is"
        log(f"generating the default synthetic city (seed 0) in {path} ({reason} there) ...")
    tmp = tempfile.mkdtemp(prefix=".default_city_seed0.", dir=parent)
    old = None
    try:
        stats = generate_city(tmp, seed=0, scale="default", log=log)
        if os.path.isdir(path):
            if _city_version(path) == GENERATOR_VERSION:  # a concurrent run finished first
                return path
            old = tempfile.mkdtemp(prefix=".default_city_seed0.old.", dir=parent)
            os.rename(path, os.path.join(old, "city"))
        _make_shareable(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if _city_version(path) != GENERATOR_VERSION:  # not a concurrent writer: a real failure
                raise
            if log:
                log(f"another process created {path} meanwhile; using it")
            return path
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover)
    if log:
        log(_summary(stats))
    return path


def _summary(stats: dict) -> str:
    lines = [f"synthetic city (seed {stats['seed']}, scale {stats['scale']}) written in {stats['seconds']:.1f} s"]
    for split in ("train", "val", "test"):
        s = stats["splits"][split]
        lines.append(f"  {split:5s}: {s['queries']:6d} queries from {s['positions']:5d} positions, "
                     f"{s['cells']:5d} cells, {s['objects']:6d} objects ({s['scenes']} scenes)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m spatialoc_ros.data.synthetic",
        description="Write a synthetic KITTI360Pose-style city (cells/, poses/, direction/) for the nine "
                    "KITTI-360 scene names.",
    )
    parser.add_argument("--out", required=True, help="output folder (created; existing scene files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="random seed, 0 .. 2**32 - 1 (same seed, same bytes)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="small: a few cells per scene (tests); default: >= 3000/500/1000 "
                             "train/val/test queries; large: about 3x default")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    g = parser.add_argument_group("variation (other world models, same preparation rules; defaults = the original bytes)")
    for name, (lo, hi) in Variation.RANGES.items():
        g.add_argument(f"--{name}", type=float, default=getattr(DEFAULT_VARIATION, name),
                       help=f"{lo:g}..{hi:g} (default {getattr(DEFAULT_VARIATION, name):g}); see Variation")
    args = parser.parse_args(argv)
    from spatialoc_ros.cli import check_number, check_output_dir

    check_number(parser, "--seed", args.seed, low=0, high=2**32 - 1)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} exists and is not a folder")
    check_output_dir(parser, "--out", args.out)
    for name, (lo, hi) in Variation.RANGES.items():
        check_number(parser, f"--{name}", getattr(args, name), lo, hi, low_open=(name == "density"))
    variation = Variation(**{name: getattr(args, name) for name in Variation.RANGES})
    stats = generate_city(args.out, seed=args.seed, scale=args.scale, log=None if args.quiet else print,
                          variation=variation)
    print(_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
