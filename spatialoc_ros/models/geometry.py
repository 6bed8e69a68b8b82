"""Geometric hint binding: does a cell hold objects where the text says they are?

The data set writes a hint ``The pose is {direction} of a {colour} {label}.`` from the vector
between the named object's closest point and the position: shorter than
:data:`~spatialoc_ros.data.constants.ON_TOP_DISTANCE` (cell units, x-y) gives ``on-top``, otherwise
the dominant axis gives east / west (x) or north / south (y). The query's best cell is the one whose
centre is nearest to the position, so the position lies within half the cell stride of the centre.

This module evaluates that rule directly, without learning, as one more retrieval level:

* **Per cell, once (map time)** -- :func:`cell_relations`: on a square grid of candidate positions
  around the cell centre (:data:`GRID_HALF_WIDTH` either side, :data:`GRID_STEPS` per axis), the
  direction class of every object as the data set's rule would state it (vector from the object's
  closest point to the candidate position; the closest point is taken in x-y, where the release
  takes it in 3-D from the sensor height: the same point for walls, poles and the ground under
  the position), plus each object's class and colour name.
* **Per query** -- :func:`binding_scores`: a hint is satisfied at a candidate position when some
  object of its class, and of its colour (any colour when the hint gives none), lies in the stated
  direction there. A cell's score is a soft maximum over its candidate positions of the share of
  hints satisfied there (the position marginalised out): 1 when every position explains every
  hint, about 1 - log(G) / sharpness when one does, lower when none does.

* **The selection rule** -- :func:`selection_matches` / :func:`with_selection`: one of the data set's
  three selection strategies names the six objects nearest the position, so a candidate position at
  which the hints are exactly (a subset of) the cell's six nearest objects explains the text far
  better than one where they merely lie in the stated directions; such positions get ``1 +
  selection_weight`` times the weight (map time: the six nearest objects' keys per candidate,
  ``CellRelations.nearest``).

The score reads the words the learned levels ignore: flipping every direction word changes it. It
depends on nothing but the map and the hints, so it carries over to cities of other generators
as long as they follow the data set's rule. :meth:`Localizer` adds it to the learned levels with a
weight fitted on the val split (see :mod:`spatialoc_ros.models.calibration`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from spatialoc_ros.data.constants import (
    CLASS_TO_INDEX, COLOR_CENTERS, COLOR_NAMES, DIRECTIONS, NUM_MENTIONED, ON_TOP_DISTANCE, PAD_INDEX,
    PAD_LABEL, UNIQUE_COLOR_NAMES,
)

#: Candidate positions span this many cell units either side of the cell centre (5 m of a 30 m cell:
#: the 10 m stride puts the position within 5 m of its best cell's centre on each axis, and a wider
#: grid lets a neighbouring cell explain the hints at positions that belong to another cell).
GRID_HALF_WIDTH = 1.0 / 6.0
#: Candidate positions per axis (11 -> a 1 m grid on a 30 m cell).
GRID_STEPS = 11
#: Points per object used for the closest point (evenly spaced subset; all when fewer).
MAX_POINTS = 256
#: Sharpness of the soft maximum over candidate positions in :func:`binding_scores` (fitted once on
#: the default city's val split over 3..6-hint queries: 8 beats the hard maximum by 2-7 points of
#: recall@1 with 3-4 hints and matches it with 6).
SHARPNESS = 8.0
#: Index of 'no colour given' in a query's colour tensor.
ANY_COLOUR = -1
DIRECTION_TO_INDEX = {d: i for i, d in enumerate(DIRECTIONS)}
COLOUR_TO_INDEX = {c: i for i, c in enumerate(UNIQUE_COLOR_NAMES)}
#: colour centre index -> index of its (unique) colour name.
_CENTRE_TO_NAME = np.array([COLOUR_TO_INDEX[n] for n in COLOR_NAMES], dtype=np.int64)
_ON_TOP = DIRECTION_TO_INDEX["on-top"]


def candidate_grid(half_width: float = GRID_HALF_WIDTH, steps: int = GRID_STEPS) -> np.ndarray:
    """(G, 2) candidate positions in cell units around the centre (0.5, 0.5)."""
    axis = 0.5 + np.linspace(-half_width, half_width, steps)
    gx, gy = np.meshgrid(axis, axis, indexing="xy")
    return np.stack([gx.reshape(-1), gy.reshape(-1)], axis=1)


def direction_classes(offsets: np.ndarray) -> np.ndarray:
    """The data set's direction rule on (..., 2) offsets object -> position (cell units) -> (...)
    indices into :data:`DIRECTIONS`."""
    dx, dy = offsets[..., 0], offsets[..., 1]
    horizontal = np.abs(dx) > np.abs(dy)  # a tie goes to north / south, as in the release
    out = np.where(horizontal, np.where(dx >= 0, DIRECTION_TO_INDEX["east"], DIRECTION_TO_INDEX["west"]),
                   np.where(dy >= 0, DIRECTION_TO_INDEX["north"], DIRECTION_TO_INDEX["south"]))
    on_top = np.hypot(dx, dy) < ON_TOP_DISTANCE
    return np.where(on_top, _ON_TOP, out).astype(np.uint8)


def colour_index(rgb_mean: np.ndarray) -> np.ndarray:
    """(..., 3) mean rgb in [0, 1] -> index into UNIQUE_COLOR_NAMES of the nearest centre."""
    d = np.linalg.norm(np.asarray(rgb_mean, dtype=np.float64)[..., None, :3] - COLOR_CENTERS, axis=-1)
    return _CENTRE_TO_NAME[np.argmin(d, axis=-1)]


#: Bits used per int64 word when packing the candidate positions (the sign bit stays clear).
_WORD_BITS = 63


def _pack_bits(flags: np.ndarray) -> np.ndarray:
    """(..., G) bool -> (..., W) int64, bit g % 63 of word g // 63 set where flags[..., g]."""
    G = flags.shape[-1]
    W = -(-G // _WORD_BITS)
    padded = np.zeros(flags.shape[:-1] + (W * _WORD_BITS,), dtype=np.int64)
    padded[..., :G] = flags
    weights = np.left_shift(np.int64(1), np.arange(_WORD_BITS, dtype=np.int64))
    return (padded.reshape(flags.shape[:-1] + (W, _WORD_BITS)) * weights).sum(axis=-1)


def _unpack_bits(words: torch.Tensor, G: int) -> torch.Tensor:
    """(..., W) int64 -> (..., G) bool (inverse of :func:`_pack_bits`)."""
    shifts = torch.arange(_WORD_BITS, device=words.device, dtype=torch.int64)
    bits = (words[..., None] >> shifts) & 1  # (..., W, 63)
    return bits.reshape(words.shape[:-1] + (-1,))[..., :G].bool()


@dataclass
class CellRelations:
    """Precomputed hint geometry of N cells (O object slots, G candidate positions).

    ``placed`` (N, O, 5, W) int64: bit g set where the data set's rule puts candidate position g
    in that direction (index into DIRECTIONS) of the object; ``label`` (N, O) long class indices
    (PAD_INDEX for empty slots); ``colour`` (N, O) long colour-name indices; ``mask`` (N, O) bool;
    ``nearest`` (N, G, NEAREST) int16: at each candidate position, the :func:`hint_key` (class,
    colour, direction seen from there) of the cell's NEAREST objects there, nearest first, -1 where
    the cell has fewer objects (:func:`selection_matches`).
    """

    placed: torch.Tensor
    label: torch.Tensor
    colour: torch.Tensor
    mask: torch.Tensor
    nearest: torch.Tensor

    def to(self, device) -> "CellRelations":
        return CellRelations(*[getattr(self, f.name).to(device) for f in fields(self)])

    def index(self, idx) -> "CellRelations":
        return CellRelations(*[getattr(self, f.name)[idx] for f in fields(self)])

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @staticmethod
    def cat(parts: Sequence["CellRelations"]) -> "CellRelations":
        return CellRelations(*[torch.cat([getattr(p, f.name) for p in parts]) for f in fields(CellRelations)])


def _object_points(xyz: np.ndarray, max_points: int) -> np.ndarray:
    pts = np.asarray(xyz, dtype=np.float64)[:, 0:2]
    if len(pts) > max_points:
        pts = pts[np.round(np.linspace(0, len(pts) - 1, max_points)).astype(np.int64)]
    return pts


#: Objects the data set's 'closest' selection names: the NUM_MENTIONED nearest to the position.
NEAREST = NUM_MENTIONED
#: Cells whose relations :func:`cell_relations` computes at once (bounds its (cells, objects,
#: positions) distance table).
CELL_CHUNK = 4096


def hint_key(label, colour, direction):
    """One integer per (class, colour-name, direction) index triple (arrays or tensors work too)."""
    return (label * len(UNIQUE_COLOR_NAMES) + colour) * len(DIRECTIONS) + direction


#: Float64 elements of one block of the (objects, positions, points) distance tensor in
#: :func:`cell_relations` (32 MB: the work is split in blocks of about this size).
BLOCK_ELEMENTS = 1 << 22
DISTANCE_DTYPE = np.float32


def _squared_distances(points: np.ndarray, valid: np.ndarray, ux: np.ndarray, uy: np.ndarray,
                       lattice: bool, gix: np.ndarray, giy: np.ndarray) -> np.ndarray:
    """(M, P, 2) points (``valid`` (M, P) marks real ones) -> (M, G, P) squared x-y distances to the
    candidate positions, +inf at padded points. Built from the per-axis terms: (x - px)^2 for the
    grid's distinct x values plus (y - py)^2 for its distinct y values (the same sums as the
    position-by-position formula)."""
    ax = np.square(ux[None, :, None] - points[:, None, :, 0]).astype(DISTANCE_DTYPE)  # (M, Gx, P)
    ay = np.square(uy[None, :, None] - points[:, None, :, 1]).astype(DISTANCE_DTYPE)  # (M, Gy, P)
    ax[~np.broadcast_to(valid[:, None, :], ax.shape)] = np.inf
    if lattice:  # positions ordered y-major, x fastest (candidate_grid's order)
        d2 = ay[:, :, None, :] + ax[:, None, :, :]
        return d2.reshape(len(points), len(uy) * len(ux), points.shape[1])
    return ay[:, giy, :] + ax[:, gix, :]


def cell_relations(cells: Sequence, max_objects: int = 28, grid: Optional[np.ndarray] = None,
                   max_points: int = MAX_POINTS, progress: bool = False) -> CellRelations:
    """Direction classes of every object of ``cells`` (Cell objects) at every candidate position.

    The objects kept are those of :func:`spatialoc_ros.models.cell_tensors.cells_to_batch` (the
    ``max_objects`` largest when a cell has more), so the slots line up with the learned levels'.
    All objects are processed together: sorted by point count and cut into blocks of similar
    counts (padded to the block's largest), the nearest point per position is one argmin.
    """
    grid = candidate_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if len(cells) > CELL_CHUNK:
        return CellRelations.cat([_cell_relations(cells[s:s + CELL_CHUNK], max_objects, grid, max_points, progress)
                                  for s in range(0, len(cells), CELL_CHUNK)])
    return _cell_relations(cells, max_objects, grid, max_points, progress)


def _cell_relations(cells: Sequence, max_objects: int, grid: np.ndarray, max_points: int,
                    progress: bool) -> CellRelations:
    from spatialoc_ros.models.cell_tensors import _kept_objects

    N, G, O = len(cells), len(grid), max_objects
    W = -(-G // _WORD_BITS)
    placed = np.zeros((N, O, len(DIRECTIONS), W), dtype=np.int64)
    label = np.full((N, O), PAD_INDEX, dtype=np.int64)
    colour = np.zeros((N, O), dtype=np.int64)
    mask = np.zeros((N, O), dtype=bool)
    near_d2 = np.full((N, O, G), np.inf, dtype=DISTANCE_DTYPE)  # squared distance of each slot's closest point
    seen_dir = np.zeros((N, O, G), dtype=np.uint8)
    slot_n, slot_o, labels, xyz_list, rgb_list = [], [], [], [], []
    for n, cell in enumerate(cells):
        for o, obj in enumerate(_kept_objects([x for x in cell.objects if x.label != PAD_LABEL], O)):
            slot_n.append(n)
            slot_o.append(o)
            labels.append(CLASS_TO_INDEX[obj.label])
            xyz_list.append(obj.xyz)
            rgb_list.append(obj.rgb)
    if xyz_list:
        ni, oi = np.asarray(slot_n), np.asarray(slot_o)
        raw = np.array([len(x) for x in xyz_list], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(raw)[:-1]])
        all_rgb = np.concatenate([np.asarray(c) for c in rgb_list])
        label[ni, oi] = labels
        colour[ni, oi] = colour_index(np.add.reduceat(all_rgb, starts, axis=0, dtype=np.float64) / raw[:, None])
        mask[ni, oi] = True
        all_xy = np.concatenate([np.asarray(x)[:, 0:2] for x in xyz_list]).astype(np.float64)
        counts = np.minimum(raw, max_points)  # points used per object (_object_points' subset)
        ux, gix = np.unique(grid[:, 0], return_inverse=True)
        uy, giy = np.unique(grid[:, 1], return_inverse=True)
        lattice = len(ux) * len(uy) == G and np.array_equal(
            grid, np.stack(np.meshgrid(ux, uy, indexing="xy"), axis=-1).reshape(-1, 2))
        order = np.argsort(counts, kind="stable")
        sorted_counts = counts[order]
        one_hot = np.eye(len(DIRECTIONS), dtype=bool)
        bar = tqdm(total=len(order), desc="map geometry", unit="object", disable=not progress, leave=False)
        start = 0
        while start < len(order):
            # A block of objects with similar point counts (sorted, so the last is the widest),
            # as many as fit in BLOCK_ELEMENTS once padded to the widest.
            window = sorted_counts[start:start + max(BLOCK_ELEMENTS // G, 1)]
            cost = np.arange(1, len(window) + 1) * G * window
            stop = start + max(int(np.searchsorted(cost, BLOCK_ELEMENTS, side="right")), 1)
            members = order[start:stop]
            width = int(counts[members[-1]])
            local = np.arange(width)[None, :]
            n_used, n_raw = counts[members][:, None], raw[members][:, None]
            # Evenly spaced subset (np.linspace's arithmetic) where an object has more points
            # than max_points; its own points otherwise; padding repeats the last point.
            spread = np.round(local * ((n_raw - 1) / max(max_points - 1, 1))).astype(np.int64)
            take = np.where(n_raw > max_points, spread, np.minimum(local, n_used - 1))
            if max_points > 1:
                take = np.where((n_raw > max_points) & (local == max_points - 1), n_raw - 1, take)
            pts = all_xy[starts[members][:, None] + take]  # (M, width, 2)
            valid = local < n_used
            d2 = _squared_distances(pts, valid, ux, uy, lattice, gix, giy)  # (M, G, width)
            nearest = np.argmin(d2, axis=2)  # (M, G)
            closest = np.take_along_axis(pts, nearest[..., None], axis=1)  # (M, G, 2)
            dirs = direction_classes(grid[None, :, :] - closest)  # (M, G)
            near_d2[ni[members], oi[members]] = np.take_along_axis(d2, nearest[..., None], axis=2)[..., 0]
            seen_dir[ni[members], oi[members]] = dirs
            placed[ni[members], oi[members]] = _pack_bits(one_hot[dirs].transpose(0, 2, 1))  # (M, 5, W)
            bar.update(stop - start)
            start = stop
        bar.close()
    # the NEAREST slots at each position (ties: the lower slot), as hint keys; -1 past the cell's objects
    k = min(NEAREST, O)
    order = np.argsort(near_d2, axis=1, kind="stable")[:, :k, :]  # (N, k, G)
    slots_label = np.take_along_axis(np.broadcast_to(label[:, :, None], (N, O, G)), order, axis=1)
    slots_colour = np.take_along_axis(np.broadcast_to(colour[:, :, None], (N, O, G)), order, axis=1)
    slots_dir = np.take_along_axis(seen_dir, order, axis=1).astype(np.int64)
    keys = hint_key(slots_label, slots_colour, slots_dir)
    keys[~np.isfinite(np.take_along_axis(near_d2, order, axis=1))] = -1
    nearest_keys = np.full((N, G, NEAREST), -1, dtype=np.int16)
    nearest_keys[:, :, :k] = keys.transpose(0, 2, 1)
    return CellRelations(torch.from_numpy(placed), torch.from_numpy(label), torch.from_numpy(colour),
                         torch.from_numpy(mask), torch.from_numpy(nearest_keys))


def hint_tensors(hints: Sequence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hints (objects with .direction, .colour (None = any), .label) -> direction, colour, label
    index tensors (H,) each; colour ANY_COLOUR where none was given."""
    d = torch.tensor([DIRECTION_TO_INDEX[h.direction] for h in hints], dtype=torch.long)
    c = torch.tensor([ANY_COLOUR if h.colour is None else COLOUR_TO_INDEX[h.colour] for h in hints],
                     dtype=torch.long)
    lab = torch.tensor([CLASS_TO_INDEX[h.label] for h in hints], dtype=torch.long)
    return d, c, lab


def _valid_bits(grid_size: int, words: int, device) -> torch.Tensor:
    """(W,) int64 words with exactly the bits of the ``grid_size`` candidate positions set."""
    tail = grid_size - (words - 1) * _WORD_BITS
    if not 0 < tail <= _WORD_BITS:
        raise ValueError(f"{grid_size} candidate positions do not fit {words} words of {_WORD_BITS} bits")
    full = torch.full((words,), (1 << _WORD_BITS) - 1, dtype=torch.int64)
    full[-1] = (1 << tail) - 1
    return full.to(device)


def _popcount(words: torch.Tensor) -> torch.Tensor:
    """(...) int64 with the sign bit clear -> (...) int64 number of set bits (SWAR: bit counts of
    2, 4, 8 bits, then the bytes summed by shifts; no multiply, so nothing overflows)."""
    x = words - ((words >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def _hint_words(hints: Sequence, rel: CellRelations) -> torch.Tensor:
    """(N, H, W) int64: bit g of cell n, hint h set where hint h holds at candidate position g (some
    object of its class and colour lies in its direction there), packed as ``rel.placed``."""
    if len(hints) == 0:
        raise ValueError("satisfied_hints needs at least one hint")
    d, c, lab = (t.to(rel.mask.device) for t in hint_tensors(hints))
    named = (rel.label[:, None, :] == lab[None, :, None]) & rel.mask[:, None, :]  # (N, H, O)
    named &= (c[None, :, None] == ANY_COLOUR) | (rel.colour[:, None, :] == c[None, :, None])
    N, H = named.shape[0], named.shape[1]
    W = rel.placed.shape[-1]
    out = torch.zeros(N * H, W, dtype=torch.int64, device=named.device)
    # Few objects are named by a hint: take only those (cell, hint, object) triples. They come in
    # (cell, hint) order, so a triple's rank inside its (cell, hint) group says which OR round it
    # joins; each round writes every group at most once.
    n, h, o = named.nonzero(as_tuple=True)
    if len(n):
        words = rel.placed[n, o, d[h]]  # (M, W)
        group = n * H + h
        pos = torch.arange(len(group), device=group.device)
        first = torch.ones_like(group, dtype=torch.bool)
        first[1:] = group[1:] != group[:-1]
        rank = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=0).values
        for r in range(int(rank.max()) + 1):
            sel = (rank == r).nonzero(as_tuple=True)[0]
            rows = group[sel]
            out[rows] = out[rows] | words[sel]
    return out.view(N, H, W)


@dataclass
class HintLookup:
    """The hint flags of a whole map, ready for one query against every cell.

    For every (cell, class, colour) and every (cell, class) that occurs, the union over the
    cell's objects of that class (and colour) of ``placed`` (E, 5, W): where such an object lies in
    each direction. Rows are sorted by (class, colour, cell) and (class, cell), so a hint's rows
    are one contiguous range, found by binary search; no per-cell scan at query time.
    Built once per map by :meth:`build` (:meth:`Localizer.set_map`).
    """

    num_cells: int
    colour_keys: torch.Tensor  # (E1,) sorted (class * C + colour) * N + cell
    colour_words: torch.Tensor  # (E1, 5, W)
    class_keys: torch.Tensor  # (E2,) sorted class * N + cell
    class_words: torch.Tensor  # (E2, 5, W)

    @staticmethod
    def build(rel: CellRelations) -> "HintLookup":
        N = len(rel)
        n, o = (t.cpu().numpy() for t in rel.mask.nonzero(as_tuple=True))
        label = rel.label.cpu().numpy()[n, o]
        colour = rel.colour.cpu().numpy()[n, o]
        placed = rel.placed.cpu().numpy()[n, o]  # (R, 5, W)
        W = rel.placed.shape[-1]
        device = rel.mask.device

        def unions(keys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            if not len(keys):
                return (torch.zeros(0, dtype=torch.int64, device=device),
                        torch.zeros(0, len(DIRECTIONS), W, dtype=torch.int64, device=device))
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            words = np.bitwise_or.reduceat(placed[order], starts, axis=0)
            return torch.from_numpy(keys[starts]).to(device), torch.from_numpy(words).to(device)

        colour_keys, colour_words = unions((label * len(UNIQUE_COLOR_NAMES) + colour) * N + n)
        class_keys, class_words = unions(label.astype(np.int64) * N + n)
        return HintLookup(N, colour_keys, colour_words, class_keys, class_words)

    def __len__(self) -> int:
        return self.num_cells

    def hint_words(self, hints: Sequence) -> torch.Tensor:
        """(N, H, W) int64: as :func:`satisfied_hints`, packed."""
        if len(hints) == 0:
            raise ValueError("HintLookup.hint_words needs at least one hint")
        N, H = self.num_cells, len(hints)
        device = self.class_keys.device
        out = torch.zeros(N, H, self.class_words.shape[-1], dtype=torch.int64, device=device)
        d, c, lab = hint_tensors(hints)
        for h in range(H):
            if int(c[h]) == ANY_COLOUR:
                keys, words, first = self.class_keys, self.class_words, int(lab[h]) * N
            else:
                keys, words = self.colour_keys, self.colour_words
                first = (int(lab[h]) * len(UNIQUE_COLOR_NAMES) + int(c[h])) * N
            lo, hi = (int(torch.searchsorted(keys, torch.tensor(v, device=device))) for v in (first, first + N))
            if hi > lo:
                out[keys[lo:hi] - first, h] = words[lo:hi, int(d[h])]
        return out


@torch.no_grad()
def satisfied_hints(hints: Sequence, rel: CellRelations, grid_size: int = GRID_STEPS ** 2) -> torch.Tensor:
    """(N, H, G) bool: hint h holds at candidate position g of cell n (some object of its class and
    colour lies in its direction there). ``grid_size``: the number of candidate positions the
    relations were computed on (the default grid's unless :func:`cell_relations` got another)."""
    return _unpack_bits(_hint_words(hints, rel), grid_size)


@torch.no_grad()
def selection_matches(hints: Sequence, rel: CellRelations) -> torch.Tensor:
    """(N, G) bool: at candidate position g of cell n the hints can name distinct objects among the
    cell's :data:`NEAREST` objects there (class, colour unless the hint gives none, and the direction
    seen from g), as the data set's 'closest' selection writes them (the six nearest objects; a
    subset of them when hints were dropped). Where it holds, every hint also holds
    (:func:`satisfied_hints`), since a matched object lies in the hint's direction.

    Exact-colour hints need that many slots of their own key; hints without colour then need that
    many of the remaining slots of their (class, direction): the greedy order is optimal since an
    exact hint can use no other slot."""
    if len(hints) == 0:
        raise ValueError("selection_matches needs at least one hint")
    keys = rel.nearest.long()  # (N, G, K)
    per_colour = len(DIRECTIONS) * len(UNIQUE_COLOR_NAMES)
    class_dir = torch.where(keys >= 0, (keys // per_colour) * len(DIRECTIONS) + keys % len(DIRECTIONS), -1)
    exact: dict = {}
    loose: dict = {}
    exact_class_dir: dict = {}
    for d, c, lab in zip(*(t.tolist() for t in hint_tensors(hints))):
        cd = lab * len(DIRECTIONS) + d
        if c == ANY_COLOUR:
            loose[cd] = loose.get(cd, 0) + 1
        else:
            k = hint_key(lab, c, d)
            exact[k] = exact.get(k, 0) + 1
            exact_class_dir[cd] = exact_class_dir.get(cd, 0) + 1
    ok = torch.ones(keys.shape[:2], dtype=torch.bool, device=keys.device)
    for k, n in exact.items():
        ok &= (keys == k).sum(dim=-1) >= n
    for cd, n in loose.items():
        ok &= (class_dir == cd).sum(dim=-1) >= n + exact_class_dir.get(cd, 0)
    return ok


def with_selection(geometric: torch.Tensor, match_share: torch.Tensor, selection: float,
                   sharpness: float = SHARPNESS) -> torch.Tensor:
    """Binding scores (:func:`binding_scores`, same sharpness) with the 'closest' selection term
    added: ``1 + log(exp(sharpness * (geometric - 1)) + selection * match_share) / sharpness``,
    where ``match_share`` is the share of candidate positions at which :func:`selection_matches`
    holds. The data set names the nearest objects for one of its three selection strategies, so a
    position where the hints are exactly the nearest objects gets ``1 + selection`` times the weight
    of one that merely satisfies every hint. ``selection`` 0 returns ``geometric``."""
    if selection < 0 or not math.isfinite(selection):
        raise ValueError(f"selection weight must be finite and >= 0, got {selection}")
    if selection == 0:
        return geometric
    g = geometric.double()
    soft = torch.log(torch.exp(sharpness * (g - 1.0)) + selection * match_share.double())
    return (1.0 + soft / sharpness).to(geometric.dtype)


def _count_histogram(words: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(N, H, W) packed hint flags -> (N, H + 1) int64: how many of the ``grid_size`` candidate
    positions of each cell satisfy exactly k hints, k = 0..H.

    The per-position counts are summed in bit-sliced form (slice j holds bit j of every position's
    count, one word per W), so no (N, H, G) tensor is ever unpacked."""
    N, H, W = words.shape
    L = max(H, 1).bit_length()
    slices = [torch.zeros(N, W, dtype=torch.int64, device=words.device) for _ in range(L)]
    for h in range(H):  # ripple-carry add of hint h's flags into the counters
        carry = words[:, h]
        for j in range(L):
            slices[j], carry = slices[j] ^ carry, slices[j] & carry
    sliced = torch.stack(slices)  # (L, N, W)
    k = torch.arange(H + 1, device=words.device)
    pattern = ((k[:, None] >> torch.arange(L, device=words.device)) & 1).bool()  # (H + 1, L): bit j of k
    at_k = torch.where(pattern[:, :, None, None], sliced, ~sliced)  # (H + 1, L, N, W)
    exact = at_k[:, 0]
    for j in range(1, L):
        exact = exact & at_k[:, j]
    exact = exact & _valid_bits(grid_size, W, words.device)
    return _popcount(exact).sum(dim=-1).T  # (N, H + 1)


#: Largest sharpness :func:`binding_scores` takes (exp(-sharpness) must stay a normal float64).
MAX_SHARPNESS = 700.0


@torch.no_grad()
def binding_scores(hints: Sequence, rel, sharpness: float = SHARPNESS,
                   chunk: int = 65536, grid_size: int = GRID_STEPS ** 2) -> torch.Tensor:
    """(N,) float32: how well each cell explains the query's hints, in (-inf, 1].

    With f(g) the share of hints satisfied at candidate position g, the score is
    ``1 + log(mean_g exp(sharpness * (f(g) - 1))) / sharpness``: the log of the hints' likelihood
    with the position marginalised over the cell's candidates, when each unsatisfied hint costs
    ``sharpness / H`` in log-likelihood. It is 1 when every candidate explains every hint, close to
    ``max_g f(g)`` for a large sharpness, and unlike the maximum it prefers a cell where many
    positions explain the hints to one where a single grid point does (which matters most when
    a query has few hints). ``rel``: the cells' CellRelations, or their HintLookup (faster for one
    query against a whole map; the same scores).

    f(g) only takes the values k / H, so the mean runs over the histogram of k (computed on the
    packed words, float64) rather than over the G positions.
    """
    if not 0 < sharpness <= MAX_SHARPNESS:
        raise ValueError(f"sharpness must be in (0, {MAX_SHARPNESS}], got {sharpness}")
    H = len(hints)
    if H == 0:
        raise ValueError("binding_scores needs at least one hint")
    # exp(sharpness * (k / H - 1)) for k = 0..H: the weight of a position satisfying k hints
    weights = torch.exp(sharpness * (torch.arange(H + 1, dtype=torch.float64) / H - 1.0))
    if isinstance(rel, HintLookup):
        parts = [rel.hint_words(hints)]
    else:
        parts = (_hint_words(hints, rel.index(slice(s, s + chunk))) for s in range(0, len(rel), chunk))
    out = []
    for part in parts:
        hist = _count_histogram(part, grid_size)  # (n, H + 1)
        soft = torch.log(hist.double() @ weights.to(hist.device)) - math.log(grid_size)
        out.append((1.0 + soft / sharpness).float())
    return torch.cat(out)


#: Sharpness of the in-cell refinement (:func:`refine_in_cell`): each unsatisfied hint divides a
#: candidate position's weight by exp(REFINE_SHARPNESS / H). Measured on the default city (val and
#: test, fine stage on the top cell when it is right): median error 2.6 m without, 2.2 / 2.0 / 1.8 m
#: at 4 / 8 / 16, with the 1/2-sigma coverage staying at 38-42 / 87-90 %.
REFINE_SHARPNESS = 16.0


def refine_in_cell(share: np.ndarray, grid: np.ndarray, mean: np.ndarray, cov: np.ndarray,
                   sharpness: float = REFINE_SHARPNESS, match: Optional[np.ndarray] = None,
                   selection: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The fine stage's Gaussian updated by where the hints hold (cell units).

    share (K, G): share of hints satisfied at each candidate position (:func:`satisfied_hints`
    averaged over hints); grid (G, 2) the candidate positions; mean (K, 2), cov (K, 2, 2) the
    fine stage's Gaussians. Each candidate gets the weight N(g; mean, cov) * exp(sharpness * share),
    times ``1 + selection`` where ``match`` (K, G) bool (:func:`selection_matches`) holds;
    the result is the weighted mean and covariance of the candidates (plus the grid's own
    quantisation variance), i.e. the moment-matched posterior of the UGFL prior and the geometric
    likelihood on the grid. Rows whose inputs are not finite are returned unchanged (they are left
    out downstream).
    """
    share = np.asarray(share, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    out_mean = np.array(mean, dtype=np.float64, copy=True)
    out_cov = np.array(cov, dtype=np.float64, copy=True)
    spacing = np.abs(np.diff(np.unique(grid[:, 0]))).min() if len(np.unique(grid[:, 0])) > 1 else 0.0
    quant = np.eye(2) * spacing ** 2 / 12.0
    # all rows at once; a row with a non-finite input or a singular covariance stays unchanged
    ok = (np.isfinite(out_mean).all(axis=1) & np.isfinite(out_cov).all(axis=(1, 2)) & np.isfinite(share).all(axis=1))
    if ok.any():
        det = out_cov[:, 0, 0] * out_cov[:, 1, 1] - out_cov[:, 0, 1] * out_cov[:, 1, 0]
        ok &= np.abs(det) > 0
    rows = np.flatnonzero(ok)
    if len(rows):
        mu, sigma = out_mean[rows], out_cov[rows]  # (R, 2), (R, 2, 2)
        d = grid[None, :, :] - mu[:, None, :]  # (R, G, 2)
        try:
            solved = np.linalg.solve(sigma[:, None, :, :], d[..., None])[..., 0]  # (R, G, 2) = sigma^-1 d
        except np.linalg.LinAlgError:  # numerically singular despite det != 0: row by row, such rows unchanged
            solved = np.full_like(d, np.nan)
            for r in range(len(rows)):
                try:
                    solved[r] = np.linalg.solve(sigma[r], d[r].T).T
                except np.linalg.LinAlgError:
                    pass
            keep = np.isfinite(solved).all(axis=(1, 2))
            rows, d, solved = rows[keep], d[keep], solved[keep]
        logw = -0.5 * np.einsum("rgi,rgi->rg", d, solved) + sharpness * share[rows]
        if match is not None and selection > 0:
            logw = logw + np.log1p(selection) * np.asarray(match, dtype=bool)[rows]
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        m = w @ grid  # (R, 2)
        c = grid[None, :, :] - m[:, None, :]
        out_mean[rows] = m
        out_cov[rows] = np.einsum("rg,rgi,rgj->rij", w, c, c) + quant
    return out_mean, out_cov
