"""Training datasets: (query hints, cell) pairs with augmentation and prototype-based map cloning.

A sample is a plain :class:`QuerySample`; :class:`CellCollator` turns a list of samples into a
:class:`~spatialoc_ros.models.cell_tensors.CellBatch` plus the hint lists, the cell keys and the
fine targets. Text is encoded later, in the training loop, by the (cached) ``HintEncoder``.

Augmentation (training only, unless ``--no_pc_augment``):

* the order of the hints is shuffled;
* hint dropout (``--hint_dropout_min K``): only the first k of the shuffled hints are kept, k drawn
  uniformly from [K, n] (n hints in the query; K >= n keeps all), so the model also learns from the
  3-4 hints people type;
* colour dropout (``--colour_dropout P``): each kept hint loses its colour word with probability P
  and reads ``The pose is {direction} of a {label}.``, rendered by
  :func:`spatialoc_ros.language.parser.render_hint` exactly as the instruction parser renders a hint
  whose colour the user left out (a hint whose direction or class the parser does not know keeps its
  colour);
* the cell is mirrored horizontally (x -> 1 - x, 'east' <-> 'west' in every hint), vertically
  (y -> 1 - y, 'north' <-> 'south'), both, or left as it is, each with probability 1/4; a
  flipped sentence is just another sentence for the text cache;
* every real point is jittered with N(0, jitter^2) in cell units (in the collator).

Prototype-based map cloning (fine stage, ``--pmc_prob``): with that probability the query's cell
is swapped for a neighbour named in ``direction/<scene>.json``. A neighbour qualifies when the
position, re-normalised in it, lies inside [0, 1]^2 and at most ``max_missing`` (1) of the
described instances cannot be found there with the same class, instance id and hint direction.
Qualifying neighbours are drawn with probability proportional to 1 / d^2, d being the distance of
the position from the neighbour's centre in cell units. The qualifying list of each query is
computed once and cached.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from spatialoc_ros.data.kitti360pose import Cell, Pose, direction_of
from spatialoc_ros.data.loading import SceneData, hint_texts
from spatialoc_ros.language.parser import Hint, render_hint

log = logging.getLogger(__name__)

from spatialoc_ros.models.cell_tensors import FLIPS  # noqa: E402  (one source)
_SWAPS = {"x": ("east", "west"), "y": ("north", "south")}


def flip_hint(hint: str, flip: Optional[str]) -> str:
    """Swap the direction words that mirroring the cell reverses: 'x' swaps east/west, 'y'
    north/south, 'xy' both."""
    if flip is None:
        return hint
    for axis in flip:
        a, b = _SWAPS[axis]
        hint = re.sub(rf"\b({a}|{b})\b", lambda m, a=a, b=b: b if m.group(1) == a else a, hint)
    return hint


def flip_position(pos: np.ndarray, flip: Optional[str]) -> np.ndarray:
    """Mirror a cell-normalised x-y position the way the cell's points are mirrored."""
    out = np.array(pos[0:2], dtype=np.float64)
    if flip is not None and "x" in flip:
        out[0] = 1.0 - out[0]
    if flip is not None and "y" in flip:
        out[1] = 1.0 - out[1]
    return out


def colourless_hint(direction: str, label: str) -> Optional[str]:
    """The hint sentence without a colour, as the instruction parser renders it ('The pose is north
    of a building.'); None when ``direction`` or ``label`` is outside the parser's vocabulary."""
    try:
        return render_hint(Hint(direction, None, label))
    except ValueError:
        return None


def position_in_cell(pose: Pose, cell: Cell) -> np.ndarray:
    """x-y of ``pose`` normalised in ``cell``: (pose_w - bbox_w[0:2]) / cell_size."""
    bbox = np.asarray(cell.bbox_w, dtype=np.float64)
    return (np.asarray(pose.pose_w, dtype=np.float64)[0:2] - bbox[0:2]) / float(cell.cell_size)


@dataclass
class QuerySample:
    """One training query: its hints, the cell it is paired with, the flip applied to both."""

    hints: list[str]
    cell: Cell
    flip: Optional[str]
    target: np.ndarray  # (2,) position normalised in ``cell`` (flip applied)
    cloned: bool = False
    #: index into ``pose.descriptions`` of each hint in ``hints`` (same order): the alignment any
    #: per-hint target must follow after shuffling and hint dropout
    hint_ids: Optional[list[int]] = None

    @property
    def cell_key(self) -> str:
        """Identity of the (possibly flipped) cell, used to keep in-batch negatives distinct."""
        return self.cell.id if self.flip is None else f"{self.cell.id}|{self.flip}"


class QueryDataset(Dataset):
    """Queries of a split paired with their best cell (coarse and fine training, validation).

    Args:
        data: the loaded split.
        augment: shuffle hints and flip cells, and apply hint / colour dropout (see module docstring).
        pmc_prob: probability of prototype-based map cloning (0 disables it).
        max_missing: described instances allowed to be missing in a cloned cell.
        seed: seed of this dataset's random generator (re-seeded per DataLoader worker).
        hint_dropout_min: when augmenting, keep k hints, k uniform in [hint_dropout_min, n]
            (None, or >= n, keeps all n).
        colour_dropout: when augmenting, probability that a kept hint loses its colour word.
    """

    def __init__(
        self,
        data: SceneData,
        augment: bool,
        pmc_prob: float = 0.0,
        max_missing: int = 1,
        seed: int = 0,
        hint_dropout_min: Optional[int] = None,
        colour_dropout: float = 0.0,
    ) -> None:
        if not data.poses:
            raise ValueError(f"no queries in scenes {', '.join(data.scenes)}")
        if not 0.0 <= pmc_prob <= 1.0:
            raise ValueError(f"pmc_prob must be in [0, 1], got {pmc_prob}")
        if hint_dropout_min is not None and (isinstance(hint_dropout_min, bool)
                                             or not isinstance(hint_dropout_min, (int, np.integer))
                                             or hint_dropout_min < 1):
            raise ValueError(f"hint_dropout_min must be an integer >= 1 or None, got {hint_dropout_min!r}")
        if not 0.0 <= colour_dropout <= 1.0:
            raise ValueError(f"colour_dropout must be in [0, 1], got {colour_dropout}")
        self.hint_dropout_min = None if hint_dropout_min is None else int(hint_dropout_min)
        self.colour_dropout = float(colour_dropout)
        self.data = data
        self.augment = augment
        self.max_missing = max_missing
        self.rng = np.random.default_rng(seed)
        self._clone_candidates: dict[int, list[tuple[str, float]]] = {}
        self.pmc_prob = pmc_prob
        if pmc_prob > 0 and data.direction_map is None:
            log.warning(
                "--pmc_prob %.2f given but %s have no direction/<scene>.json: map cloning is off",
                pmc_prob, ", ".join(data.scenes),
            )
            self.pmc_prob = 0.0
        self.hints = [hint_texts(p) for p in data.poses]
        # the same hints without their colour word (None: the parser cannot say it, keep the colour)
        self.colourless = [[colourless_hint(d.direction, d.object_label) for d in p.descriptions]
                           for p in data.poses] if self.colour_dropout > 0 else None

    def __len__(self) -> int:
        return len(self.data.poses)

    @property
    def cell_ids(self) -> list[str]:
        return [p.cell_id for p in self.data.poses]

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    # --- map cloning -------------------------------------------------------------------------
    def clone_candidates(self, idx: int) -> list[tuple[str, float]]:
        """Neighbouring cells that may stand in for query ``idx``'s cell, with their 1/d^2 weights."""
        if idx in self._clone_candidates:
            return self._clone_candidates[idx]
        pose = self.data.poses[idx]
        neighbours = (self.data.direction_map or {}).get(pose.cell_id) or {}
        out: list[tuple[str, float]] = []
        for nid in neighbours.values():
            cell = self.data.cells_dict.get(nid) if nid is not None else None
            if cell is None or cell.id == pose.cell_id:
                continue
            pos = position_in_cell(pose, cell)
            if np.any(pos < 0.0) or np.any(pos > 1.0):
                continue
            if self._missing_instances(pose, cell) > self.max_missing:
                continue
            d = float(np.linalg.norm(pos - 0.5))
            out.append((cell.id, 1.0 / max(d, 1e-3) ** 2))
        self._clone_candidates[idx] = out
        return out

    @staticmethod
    def _missing_instances(pose: Pose, cell: Cell) -> int:
        bbox = np.asarray(cell.bbox_w, dtype=np.float64)
        pos3 = (np.asarray(pose.pose_w, dtype=np.float64)[0:3] - bbox[0:3]) / float(cell.cell_size)
        missing = 0
        for descr in pose.descriptions:
            found = False
            for obj in cell.objects:
                if obj.label != descr.object_label or obj.instance_id != descr.object_instance_id:
                    continue
                if direction_of(obj.get_closest_point(pos3), pos3) == descr.direction:
                    found = True
                    break
            missing += not found
        return missing

    # --- samples -----------------------------------------------------------------------------
    def __getitem__(self, idx: int) -> QuerySample:
        pose = self.data.poses[idx]
        cell = self.data.cells_dict[pose.cell_id]
        cloned = False
        if self.pmc_prob > 0 and self.rng.random() < self.pmc_prob:
            cands = self.clone_candidates(idx)
            if cands:
                w = np.array([c[1] for c in cands])
                pick = int(self.rng.choice(len(cands), p=w / w.sum()))
                cell = self.data.cells_dict[cands[pick][0]]
                cloned = True
        full = self.hints[idx]
        ids = list(range(len(full)))
        hints = list(full)
        flip: Optional[str] = None
        if self.augment:
            ids = [int(i) for i in self.rng.permutation(len(full))]
            n = len(ids)
            if self.hint_dropout_min is not None and self.hint_dropout_min < n:
                ids = ids[:int(self.rng.integers(self.hint_dropout_min, n + 1))]
            hints = [full[i] for i in ids]
            if self.colour_dropout > 0:
                plain = self.colourless[idx]
                drop = self.rng.random(len(ids)) < self.colour_dropout
                hints = [plain[i] if (d and plain[i] is not None) else h for i, d, h in zip(ids, drop, hints)]
            flip = FLIPS[int(self.rng.integers(len(FLIPS)))]
            hints = [flip_hint(h, flip) for h in hints]
        target = flip_position(position_in_cell(pose, cell), flip)
        return QuerySample(hints, cell, flip, target, cloned, hint_ids=ids)


@dataclass
class TrainBatch:
    """A collated batch: CellBatch (CPU), hint lists, cell keys (B,), targets (B, 2)."""

    cells: object  # CellBatch
    hints: list[list[str]]
    cell_keys: list[str]
    targets: torch.Tensor
    cloned: int


class CellCollator:
    """Collate :class:`QuerySample` lists into a :class:`TrainBatch`.

    Args:
        max_objects / num_points: cell tensor sizes.
        random_points: sample points randomly (training) instead of deterministically.
        jitter: std of the point jitter in cell units (0 = none).
        seed: seed of the point sampling / jitter generator.
    """

    def __init__(self, max_objects: int, num_points: int, random_points: bool, jitter: float, seed: int = 0):
        self.max_objects = max_objects
        self.num_points = num_points
        self.random_points = random_points
        self.jitter = jitter
        self.reseed(seed)
        self._seeded_in_worker = False

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, samples: Sequence[QuerySample]) -> TrainBatch:
        from spatialoc_ros.models.cell_tensors import cells_to_batch

        if not self._seeded_in_worker and torch.utils.data.get_worker_info() is not None:
            # A worker holds a copy of this collator: give it a stream of its own.
            self.reseed(int(torch.initial_seed() % (2**31)))
            self._seeded_in_worker = True

        cells = cells_to_batch(
            [s.cell for s in samples],
            max_objects=self.max_objects,
            num_points=self.num_points,
            rng=self.rng if self.random_points else None,
            flip=[s.flip for s in samples],
        )
        if self.jitter > 0:
            noise = torch.randn(cells.xyz.shape, generator=self.gen, dtype=cells.xyz.dtype) * self.jitter
            cells.xyz = cells.xyz + noise * cells.mask[:, :, None, None].to(cells.xyz.dtype)
        targets = torch.tensor(np.stack([s.target for s in samples]), dtype=torch.float32)
        return TrainBatch(
            cells=cells,
            hints=[s.hints for s in samples],
            cell_keys=[s.cell_key for s in samples],
            targets=targets,
            cloned=sum(s.cloned for s in samples),
        )


class UniqueCellBatchSampler(Sampler):
    """Batches in which no cell occurs twice, so every in-batch negative is a different cell.

    Queries are (optionally) shuffled, then greedily packed: a query whose cell is already in the
    current batch waits for a later batch. Batches of the tail may be smaller than ``batch_size``;
    batches smaller than 2 are dropped (a ranking loss needs a negative).
    """

    def __init__(self, cell_ids: Sequence[str], batch_size: int, shuffle: bool, seed: int = 0):
        self.cell_ids = list(cell_ids)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = np.arange(len(self.cell_ids))
        if self.shuffle:
            order = np.random.default_rng(self.seed + 1009 * self.epoch).permutation(order)
        pending = list(order)
        batches: list[list[int]] = []
        while pending:
            batch, used, rest = [], set(), []
            for i in pending:
                if len(batch) < self.batch_size and self.cell_ids[i] not in used:
                    batch.append(int(i))
                    used.add(self.cell_ids[i])
                else:
                    rest.append(i)
            pending = rest
            if len(batch) >= 2:
                batches.append(batch)
            elif len(batch) == 1 and not rest:
                break
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s contiguous share of ``n`` items split over ``world_size`` processes;
    the first ``n % world_size`` ranks take one item more."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


class RankSliceBatchSampler(Sampler):
    """One process's slice of every global batch of a distributed run (torchrun).

    Every process iterates the same global batches (``batches``, built with the same seed
    everywhere) and keeps the contiguous slice :func:`rank_slice` gives it, so the processes
    together see exactly the single-process batches, in the same order, and all run the same
    number of steps (DistributedDataParallel hangs otherwise). Tail batches may split unevenly;
    a global batch with fewer queries than processes (possible for world_size > 2 only, as
    ``batches`` yields at least 2) is skipped by every process.
    """

    def __init__(self, batches: UniqueCellBatchSampler, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.world_size:
                lo, hi = rank_slice(len(batch), self.rank, self.world_size)
                yield batch[lo:hi]

    def __len__(self) -> int:
        return sum(1 for batch in self.batches if len(batch) >= self.world_size)


def worker_init(worker_id: int) -> None:
    """DataLoader worker init: give each worker's dataset and collator a generator of its own."""
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % (2**31))
    if info is not None and isinstance(info.dataset, QueryDataset):
        info.dataset.reseed(seed)
