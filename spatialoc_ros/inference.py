"""Text-to-position localisation on a map of cells: the one inference path shared by the evaluation
CLIs, the benchmarks and the ROS node.

Pipeline of :meth:`Localizer.localize`:

1. **Text.** The query (free text, see :mod:`spatialoc_ros.language`) is read into hints
   (direction, colour or none, class) and each hint rendered as the sentence the models were
   trained on, ``The pose is north of a gray building.`` (at most :data:`MAX_HINTS`; fewer than
   ``min_hints`` is an :class:`InstructionRefused`). The sentences are encoded by the frozen
   language model (cached per sentence when ``fixed_embedding``) and the coarse model's text side.
2. **Retrieval.** Every map cell was embedded once by :meth:`Localizer.set_map`. A query is scored
   against all cells at every level (global, object, relation) and the levels are combined with
   the model's rule (z-score over the cells, then sum), plus ``relation_weight`` times the
   geometric hint-binding level (:mod:`spatialoc_ros.models.geometry`); ``softmax(score / T)`` over
   the ranked cells, T calibrated per hint count, gives each cell's probability. Maps larger than ``preselect_above`` cells
   first keep the ``preselect_top`` cells by the global descriptor alone and re-rank only those with
   all levels (the z-scores are then taken over the pre-selected cells). The short list comes from
   a vector index (``index``: 'exact' torch top-k, or 'faiss', an inverted-file FAISS index; 'auto'
   = FAISS above ``preselect_above`` cells when installed; :mod:`spatialoc_ros.models.vector_index`).
3. **Fine.** UGFL runs on the query and each of the top-k cells in one batch and gives a 2-D
   Gaussian in cell units; with the map's geometry kept, each Gaussian is then updated by where the
   hints hold on the cell's candidate grid (:func:`spatialoc_ros.models.geometry.refine_in_cell`). World mean = ``bbox_w[0:2] + mu * cell_size``; world covariance =
   ``s^2 * L L^T * cell_size^2`` (m^2), where ``s`` is the scalar calibration factor stored in the
   fine checkpoint's ``extra['sigma_scale']`` (1 when absent). The covariance is symmetrised and its
   eigenvalues are floored at :data:`MIN_VARIANCE_M2` (1 cm standard deviation), so it is always
   symmetric and PSD.

Non-finite model outputs are never replaced: a cell whose embedding is not finite is left out of
the map, a cell whose retrieval score is not finite is not ranked, a hypothesis whose mean or
covariance is not finite is left out of the answer. Each case is counted in
:attr:`Localizer.nonfinite` and logged (logger ``spatialoc_ros.inference``); when nothing finite
is left, the call raises :class:`NonFiniteOutputError`.

Without a fine model, each hypothesis sits at its cell's centre with the covariance of a uniform
distribution over the cell (cell_size^2 / 12 per axis).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from spatialoc_ros.data.kitti360pose import Cell
from spatialoc_ros.models.vector_index import PRESELECT_ABOVE

if TYPE_CHECKING:
    from spatialoc_ros.language import Hint, ParsedInstruction

_log = logging.getLogger(__name__)


class NonFiniteOutputError(RuntimeError):
    """The models gave no finite answer for a query (see :attr:`Localizer.nonfinite`)."""


#: Hint sentences kept per query (the data set uses 6; longer texts are cut, not refused).
MAX_HINTS = 12
#: Fewer usable hints than this and an instruction is refused (one hint fixes next to nothing).
MIN_HINTS = 2
#: Floor on the eigenvalues of a published covariance (m^2).
MIN_VARIANCE_M2 = 1e-4
#: Default size of the global-descriptor pre-selection (the map size from which it is used,
#: PRESELECT_ABOVE, lives with the index back-ends).
PRESELECT_TOP = 200
#: Best cells per query whose geometric level gets the selection rule (Localizer.selection_weight).
SELECTION_SHORTLIST = 32
#: Folder of the shipped checkpoints (coarse.pth, fine.pth), found relative to this module.
CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources", "checkpoints")


def shipped_checkpoint(kind: str) -> str:
    """Path of the checkpoint shipped with the package for ``kind`` ('coarse' or 'fine')."""
    if kind not in ("coarse", "fine"):
        raise ValueError(f"kind must be 'coarse' or 'fine', got {kind!r}")
    return os.path.join(CHECKPOINT_DIR, f"{kind}.pth")


def resolve_device(name: str) -> tuple[torch.device, Optional[str]]:
    """Map 'auto' | 'cpu' | 'cuda' | 'cuda:N' to a usable torch.device.

    Returns (device, note): note is None, or a sentence saying why the device differs from the
    request (CUDA asked for but absent -> CPU).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")), None
    if name == "cpu":
        return torch.device("cpu"), None
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            return torch.device("cpu"), f"device '{name}' requested but CUDA is not available; using the CPU"
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return torch.device("cpu"), (
                f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist; "
                "using the CPU"
            )
        return dev, None
    raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda' (or 'cuda:N')")


class InstructionRefused(ValueError):
    """An instruction the localizer will not answer; the message names what was understood and
    what was missing (e.g. 'understood 1 hint (north of a gray building) but at least 2 are
    needed; ...')."""


Query = Union[str, "ParsedInstruction", Sequence["Hint"]]


def understand(query: Query, min_hints: int = MIN_HINTS, heading_yaw: Optional[float] = None) -> "ParsedInstruction":
    """What a query says, in the data set's vocabulary (:mod:`spatialoc_ros.language`).

    ``query`` is free text (parsed), an already parsed instruction, or a sequence of
    :class:`~spatialoc_ros.language.Hint` (structured input from a speech or LLM front-end). Raises
    :class:`InstructionRefused` when fewer than ``min_hints`` hints are usable; at most
    :data:`MAX_HINTS` are kept.
    """
    from spatialoc_ros.language import Hint, ParsedInstruction, check_hints, parse_instruction

    if isinstance(query, ParsedInstruction):
        parsed = query
    elif isinstance(query, str):
        if not query.strip():
            raise InstructionRefused(
                "the instruction is empty; describe the position, e.g. 'a gray building is east of me, "
                "I am north of a green pole'"
            )
        parsed = parse_instruction(query, heading_yaw=heading_yaw)
    elif isinstance(query, (list, tuple)) and all(isinstance(h, Hint) for h in query):
        parsed = ParsedInstruction(tuple(query))
    else:
        raise InstructionRefused(f"a query must be a string (free text), a ParsedInstruction or a list of Hint, got {type(query).__name__}")
    why = check_hints(parsed, max(int(min_hints), 1))
    if why is not None:
        raise InstructionRefused(why)
    if len(parsed.hints) > MAX_HINTS:
        parsed = dataclasses.replace(parsed, hints=parsed.hints[:MAX_HINTS])
    return parsed


def parse_query(query: Query, min_hints: int = MIN_HINTS) -> list[str]:
    """The hint sentences the models read for ``query`` (see :func:`understand`): the canonical
    'The pose is north of a gray building.' of each hint understood."""
    from spatialoc_ros.language import render_hints

    return render_hints(understand(query, min_hints).hints)


@dataclass(frozen=True)
class Hypothesis:
    """One localisation hypothesis (world metres, map frame of the cells' ``bbox_w``).

    ``score``: the combined retrieval score of the cell (higher is better; NaN when the cell was
    given, not retrieved); ``mean_xy`` (2,) world position; ``cov_xy`` (2, 2) covariance in m^2,
    symmetric PSD finite; ``pos_in_cell`` (2,) the mean normalised to the cell; ``bbox_w`` (6,);
    ``probability``: the calibrated P(cell | text) (NaN when given, not retrieved); ``num_hints``:
    how many hints the query had (the calibration of the estimate depends on it).
    """

    cell_id: str
    scene: str
    score: float
    mean_xy: np.ndarray
    cov_xy: np.ndarray
    pos_in_cell: np.ndarray
    bbox_w: np.ndarray
    probability: float = float("nan")
    num_hints: int = 0


@dataclass(frozen=True)
class Estimate:
    """One position a robot can act on (world metres, map frame), from :meth:`Localizer.estimate`.

    ``mean_xy`` (2,) and ``cov_xy`` (2, 2) in m^2: by default the moment-matched Gaussian of the
    mixture of the hypotheses of the top cell's scene weighted by their probabilities, so the
    covariance covers the retrieval ambiguity as well as the in-cell uncertainty; with
    ``covariance='top'`` the top hypothesis alone. ``confidence``: the calibrated probability that
    the top cell is the right one. ``hypotheses``: best first, each with its ``probability``.
    ``scene``: the scene of the top cell (the mixture never mixes scenes' coordinates).
    """

    mean_xy: np.ndarray
    cov_xy: np.ndarray
    confidence: float
    hypotheses: tuple
    scene: str
    covariance: str = "mixture"


# --- helpers on the models' dataclasses of tensors ------------------------------------------------
def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor field of a dataclass instance; other fields are kept."""
    values = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        values[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
    return type(obj)(**values)


def _take(obj, idx):
    """Rows ``idx`` (along dim 0) of every tensor field."""
    return _map_tensors(obj, lambda t: t[idx])


def _concat(objs: Sequence):
    """Concatenate the tensor fields of same-typed dataclass instances along dim 0."""
    first = objs[0]
    values = {}
    for f in dataclasses.fields(first):
        v = getattr(first, f.name)
        values[f.name] = torch.cat([getattr(o, f.name) for o in objs], dim=0) if isinstance(v, torch.Tensor) else v
    return type(first)(**values)


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op CPU thread count at ``n`` and restore it after; ``n`` = 0
    leaves it as it is. torch's count is process-wide: meant for the one thread that runs inference
    (the localizer node's worker), not for blocks that run side by side."""
    n = int(n)
    if n < 0:
        raise ValueError(f"intra_op_threads needs n >= 0 (0 = unchanged), got {n}")
    if n == 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def safe_covariance(cov: np.ndarray) -> np.ndarray:
    """Symmetrise and floor the eigenvalues at MIN_VARIANCE_M2; ValueError on non-finite input."""
    cov = np.asarray(cov, dtype=np.float64)
    if not np.all(np.isfinite(cov)):
        raise ValueError(f"covariance is not finite: {cov.tolist()}")
    cov = 0.5 * (cov + cov.T)
    w, v = np.linalg.eigh(cov)
    w = np.clip(w, MIN_VARIANCE_M2, None)
    out = (v * w) @ v.T
    return 0.5 * (out + out.T)


#: How :meth:`Localizer.estimate` forms the published covariance.
COVARIANCE_MODES: tuple[str, ...] = ("mixture", "top")


def mixture_moments(weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (2,), within-component covariance sum_k w_k Sigma_k (2, 2) and spread of the means
    sum_k w_k (mu_k - mu)(mu_k - mu)^T (2, 2) of a Gaussian mixture; weights (K,) >= 0 are
    normalised here, means (K, 2), covs (K, 2, 2)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"mixture weights must be finite, non-negative and not all zero, got {w.tolist()}")
    w = w / w.sum()
    means = np.asarray(means, dtype=np.float64)
    covs = np.asarray(covs, dtype=np.float64)
    mean = w @ means
    d = means - mean
    return mean, np.einsum("k,kij->ij", w, covs), np.einsum("k,ki,kj->ij", w, d, d)


def moment_match(weights: np.ndarray, means: np.ndarray, covs: np.ndarray, within_scale: float = 1.0,
                 spread_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian with the mean and covariance of a Gaussian mixture (see
    :func:`mixture_moments`): covariance = within_scale * within + spread_scale * spread (1 and 1:
    the exact moments)."""
    mean, within, spread = mixture_moments(weights, means, covs)
    return mean, safe_covariance(within_scale * within + spread_scale * spread)


@dataclass
class FinePrediction:
    """Fine-stage output for B (query, cell) pairs, cell units: mean (B, 2), covariance (B, 2, 2)."""

    mean: np.ndarray
    cov: np.ndarray


class Localizer:
    """Coarse-to-fine localisation of texts on a map of cells (see the module docstring).

    Build it with :meth:`from_checkpoints` (or directly from models, as the training loops do),
    give it a map with :meth:`set_map`, then call :meth:`localize` / :meth:`localize_many`.
    """

    def __init__(
        self,
        coarse_model: Optional[torch.nn.Module],
        coarse_cfg=None,
        fine_model: Optional[torch.nn.Module] = None,
        fine_cfg=None,
        device: str | torch.device = "auto",
        text_model: Optional[str] = None,
        fixed_embedding: bool = True,
        max_tokens: int = 32,
        sigma_scale: float = 1.0,
        batch_size: int = 64,
        preselect_top: int = PRESELECT_TOP,
        preselect_above: int = PRESELECT_ABOVE,
        text_encoders: Optional[dict] = None,
        min_hints: int = MIN_HINTS,
        relation_weight: float = 0.0,
        selection_weight: float = 0.0,
        temperature: float = 1.0,
        mixture_within_scale: float = 1.0,
        mixture_spread_scale: float = 1.0,
        temperature_by_hints: Optional[Sequence[float]] = None,
        mixture_within_scale_by_hints: Optional[Sequence[float]] = None,
        mixture_spread_scale_by_hints: Optional[Sequence[float]] = None,
        refine_sharpness: Optional[float] = None,
        index: str = "auto",
        index_nprobe: Optional[int] = None,
    ) -> None:
        if coarse_model is None and fine_model is None:
            raise ValueError("a Localizer needs a coarse model, a fine model or both")
        if isinstance(device, torch.device):
            self.device, self.device_note = device, None
        else:
            self.device, self.device_note = resolve_device(device)
        self.coarse = coarse_model.to(self.device).eval() if coarse_model is not None else None
        self.fine = fine_model.to(self.device).eval() if fine_model is not None else None
        self.coarse_cfg = coarse_cfg
        self.fine_cfg = fine_cfg
        from spatialoc_ros.models.checkpoint import EXTRA_RANGES

        for name, value in (("sigma_scale", sigma_scale), ("relation_weight", relation_weight),
                            ("selection_weight", selection_weight), ("temperature", temperature),
                            ("mixture_within_scale", mixture_within_scale),
                            ("mixture_spread_scale", mixture_spread_scale)):
            lo, hi = EXTRA_RANGES[name][1:]
            if not (math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be a finite number in {lo:g}..{hi:g}, got {value}")
        self.sigma_scale = float(sigma_scale)
        #: Weight of the geometric hint-binding level added to the learned levels' combined score.
        self.relation_weight = float(relation_weight)
        #: Weight of the data set's 'closest' selection rule inside the geometric level
        #: (:func:`spatialoc_ros.models.geometry.with_selection`; 0 = off), applied to the
        #: SELECTION_SHORTLIST best cells of each query and in the in-cell refinement.
        self.selection_weight = float(selection_weight)
        #: Temperature turning combined scores into cell probabilities (softmax over the ranked cells).
        self.temperature = float(temperature)
        #: Factors on the published mixture's within-hypothesis covariance and on the spread of the
        #: hypotheses' means (fitted on val; 1 and 1 = the exact moments).
        self.mixture_within_scale = float(mixture_within_scale)
        self.mixture_spread_scale = float(mixture_spread_scale)
        #: Per hint count (CALIBRATED_HINT_COUNTS) versions of the three, when calibrated so; they
        #: take precedence over the scalars (fewer hints: flatter probabilities, wider estimates).
        self.by_hints: dict[str, Optional[tuple[float, ...]]] = {}
        from spatialoc_ros.models.checkpoint import CALIBRATED_HINT_COUNTS, check_extra

        given = {"temperature_by_hints": temperature_by_hints,
                 "mixture_within_scale_by_hints": mixture_within_scale_by_hints,
                 "mixture_spread_scale_by_hints": mixture_spread_scale_by_hints}
        check_extra({k: list(v) for k, v in given.items() if v is not None}, "Localizer")  # a ValueError
        self._calibrated_counts = CALIBRATED_HINT_COUNTS
        for key, values in given.items():
            self.by_hints[key] = None if values is None else tuple(float(v) for v in values)
        self._relations = None  # CellRelations of the map (geometric level), when relation_weight > 0
        self._hint_lookup = None  # their HintLookup (one query against every cell)
        from spatialoc_ros.models.geometry import REFINE_SHARPNESS

        #: Sharpness of the geometric in-cell refinement of the fine stage's Gaussians (0 = off;
        #: applied when the map's geometry is kept, i.e. relation_weight > 0).
        self.refine_sharpness = REFINE_SHARPNESS if refine_sharpness is None else float(refine_sharpness)
        if not (math.isfinite(self.refine_sharpness) and 0.0 <= self.refine_sharpness <= 1e3):
            raise ValueError(f"refine_sharpness must be a finite number in 0..1000, got {refine_sharpness}")
        #: Non-finite model outputs seen so far, by kind ('cell_embedding', 'score', 'hypothesis').
        self.nonfinite: collections.Counter = collections.Counter()
        self.batch_size = int(batch_size)
        if int(min_hints) < 1:
            raise ValueError(f"min_hints must be >= 1, got {min_hints}")
        self.min_hints = int(min_hints)
        self.preselect_top = int(preselect_top)
        self.preselect_above = int(preselect_above)
        from spatialoc_ros.models.vector_index import check_kind

        #: Back-end of the short list ('auto' | 'exact' | 'faiss', see models/vector_index.py) and
        #: the FAISS lists scanned per query (None: the module's rule).
        self.index_kind = check_kind(index)
        if index_nprobe is not None and int(index_nprobe) < 1:
            raise ValueError(f"index_nprobe must be >= 1, got {index_nprobe}")
        self.index_nprobe = None if index_nprobe is None else int(index_nprobe)
        self._vector_index = None  # ExactIndex | FaissIndex over the map's global descriptors
        self.max_tokens = int(max_tokens)
        self._hint_encoders = self._build_hint_encoders(text_model, fixed_embedding, text_encoders)
        self.timings: dict[str, float] = {"text_ms": 0.0, "retrieval_ms": 0.0, "fine_ms": 0.0}
        self._cells: Optional[list[Cell]] = None
        self._index = None  # PackedCellEmbedding of all cells (coarse model), on self.device
        self._fine_cache: dict[int, object] = {}
        self._fine_tokens = None  # MapObjectTokens of the map (fine model), see _embed_fine
        self.map_timings: dict[str, float] = {}

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(
        cls,
        coarse_path: Optional[str] = None,
        fine_path: Optional[str] = None,
        text_model: Optional[str] = None,
        device: str = "auto",
        fixed_embedding: bool = True,
        **kwargs,
    ) -> "Localizer":
        """Load the coarse and fine checkpoints (None -> the shipped ones) onto ``device``.

        ``text_model`` overrides the language model named in the checkpoints (e.g. a local folder
        holding the same model); its feature width must match the one the models were trained with.
        """
        from spatialoc_ros.models.checkpoint import load_checkpoint

        dev, note = resolve_device(device)
        coarse_path = coarse_path or shipped_checkpoint("coarse")
        fine_path = fine_path or shipped_checkpoint("fine")
        coarse, ccfg, cextra = load_checkpoint(coarse_path, "coarse", dev)
        fine, fcfg, fextra = load_checkpoint(fine_path, "fine", dev)
        kwargs.setdefault("max_tokens", int((cextra or {}).get("max_tokens", 32)))
        kwargs.setdefault("sigma_scale", float((fextra or {}).get("sigma_scale", 1.0)))
        for key, default in (("relation_weight", 0.0), ("selection_weight", 0.0), ("temperature", 1.0),
                             ("mixture_within_scale", 1.0),
                             ("mixture_spread_scale", 1.0)):
            kwargs.setdefault(key, float((cextra or {}).get(key, default)))
        from spatialoc_ros.models.checkpoint import EXTRA_LISTS

        for key in EXTRA_LISTS:
            if (cextra or {}).get(key) is not None:
                kwargs.setdefault(key, [float(v) for v in cextra[key]])
        loc = cls(coarse, ccfg, fine, fcfg, device=dev, text_model=text_model,
                  fixed_embedding=fixed_embedding, **kwargs)
        loc.device_note = note
        return loc

    def _build_hint_encoders(self, text_model, fixed_embedding, given) -> dict:
        """One HintEncoder per stage; stages naming the same language model share one."""
        from spatialoc_ros.models.text_encoder import FrozenTextEncoder, HintEncoder

        encoders: dict[str, object] = dict(given or {})
        by_name: dict[str, object] = {}
        for stage, cfg in (("coarse", self.coarse_cfg), ("fine", self.fine_cfg)):
            if cfg is None or stage in encoders:
                continue
            name = text_model or cfg.text_model
            if name not in by_name:
                enc = FrozenTextEncoder(name, device=str(self.device), max_tokens=self.max_tokens)
                by_name[name] = HintEncoder(enc, cache=fixed_embedding)
            hint_encoder = by_name[name]
            dim = hint_encoder.text_encoder.dim if hasattr(hint_encoder, "text_encoder") else None
            if dim is not None and dim != cfg.text_dim:
                raise ValueError(
                    f"the language model {name!r} gives {dim}-wide features but the {stage} model was "
                    f"trained on {cfg.text_dim}-wide ones ({cfg.text_model!r}); pass that model"
                )
            encoders[stage] = hint_encoder
        return encoders

    def warm_text_cache(self, progress: bool = False) -> int:
        """Put every hint sentence an instruction can be read into (840, see
        :func:`spatialoc_ros.language.all_hint_sentences`) in the sentence cache, so that no query
        waits for the language model (MiniLM: ~4 s once on a 2-core CPU; ~45 ms per query with
        six new sentences otherwise). Returns the number of sentences encoded; 0 without a
        sentence cache (``fixed_embedding=False``)."""
        from spatialoc_ros.language import all_hint_sentences

        sentences = all_hint_sentences()
        done = 0
        for encoder in {id(e): e for e in self._hint_encoders.values()}.values():
            if hasattr(encoder, "warm"):
                done += encoder.warm(sentences, progress=progress)
        return done

    # --- map ---------------------------------------------------------------------------------------
    @property
    def num_cells(self) -> int:
        return 0 if self._cells is None else len(self._cells)

    @property
    def cells(self) -> list[Cell]:
        self._require_map()
        return list(self._cells)

    def _require_map(self) -> None:
        if self._cells is None:
            raise ValueError("no map set: call Localizer.set_map(cells) before localising")

    @torch.no_grad()
    def set_map(self, cells: Sequence[Cell], progress: bool = True, cache_dir: Optional[str] = None) -> int:
        """Embed every cell once (batched) into the retrieval index and make it the map; returns
        the number of cells kept.

        The cells should have passed :func:`spatialoc_ros.data.validation.validate_cells`. A cell
        whose embedding is not finite is left out (counted, logged). All-or-nothing otherwise:
        when a cell cannot be embedded (ValueError, e.g. an unknown class) or none is left, the
        previous map stays in place. ``cache_dir``: keep the embedding (and the map's geometry) in
        an on-disk cache keyed by the coarse model's and the cells' content
        (:mod:`spatialoc_ros.models.embedding_cache`); a restart on the same map and model loads it
        instead of recomputing, a stale or damaged file is rebuilt (logged).
        """
        cells = list(cells)
        if not cells:
            raise ValueError("set_map needs at least one cell")
        ids = [c.id for c in cells]
        if len(set(ids)) != len(ids):
            raise ValueError("cell ids of a map must be unique")
        for c in cells:
            if not (float(c.cell_size) > 0 and np.all(np.isfinite(np.asarray(c.bbox_w, dtype=np.float64)))):
                raise ValueError(f"cell {c.id} has an invalid cell_size or bbox_w")
        with_relations = self.coarse is not None and self.relation_weight > 0
        t_start = time.perf_counter()
        path = None
        cached = None
        timings = {"digest_s": 0.0, "embed_s": 0.0, "geometry_s": 0.0, "cache_s": 0.0, "index_s": 0.0, "fine_s": 0.0}
        if cache_dir and self.coarse is not None:
            from spatialoc_ros.models import embedding_cache

            key = embedding_cache.cache_key(embedding_cache.model_digest(self.coarse, self.coarse_cfg),
                                            embedding_cache.map_digest(cells), with_relations)
            path = embedding_cache.cache_path(cache_dir, key)
            timings["digest_s"] = time.perf_counter() - t_start
            cached = self._load_cached_map(path, cells, with_relations)
            timings["cache_s"] = time.perf_counter() - t_start - timings["digest_s"]
        if cached is not None:
            cells, index, relations = cached
        else:
            t0 = time.perf_counter()
            cells, index = self._embed_cells(cells, progress)
            timings["embed_s"] = time.perf_counter() - t0
            relations = None
            if with_relations:
                from spatialoc_ros.models.geometry import cell_relations

                t0 = time.perf_counter()
                relations = cell_relations(cells, max_objects=self.coarse_cfg.max_objects, progress=progress).to(self.device)
                timings["geometry_s"] = time.perf_counter() - t0
            if path is not None:
                t0 = time.perf_counter()
                self._save_cached_map(path, cells, index, relations)
                timings["cache_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        vector_index = None if index is None else self._build_vector_index(index.global_, path)
        # What one query against every cell reads (the exact path, up to preselect_above cells):
        # the map's hint flags by class and colour.
        hint_lookup = None
        if relations is not None and len(cells) <= self.preselect_above:
            from spatialoc_ros.models.geometry import HintLookup

            hint_lookup = HintLookup.build(relations)
        timings["index_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fine_tokens = self._embed_fine(cells, progress) if len(cells) <= self.preselect_above else None
        timings["fine_s"] = time.perf_counter() - t0
        #: Where the last set_map spent its time (seconds): the map digest (cache key), embedding,
        #: geometry, cache read or write, index build, the fine model's object tokens; 'cached'
        #: says whether the cache was used.
        self.map_timings = {**timings, "cached": cached is not None}
        self._relations = relations
        self._hint_lookup = hint_lookup
        self._vector_index = vector_index
        self._cells = cells
        self._id_to_index = {c.id: i for i, c in enumerate(cells)}
        self._bbox = np.stack([np.asarray(c.bbox_w, dtype=np.float64) for c in cells])
        self._size = np.array([float(c.cell_size) for c in cells])
        self._fine_cache = {}
        self._fine_tokens = fine_tokens
        self._index = index
        return len(cells)

    def _embed_fine(self, cells: list, progress: bool):
        """The fine model's object tokens of every cell (:class:`MapObjectTokens`), or None
        without a fine model. Maps up to ``preselect_above`` cells get them at set_map; larger
        ones encode the cells of each query's hypotheses when it comes (cached per cell)."""
        from spatialoc_ros.models.cell_tensors import cells_to_batch
        from spatialoc_ros.models.ugfl import MapObjectTokens

        if self.fine is None:
            return None
        cfg = self.fine_cfg
        parts = []
        bs = max(self.batch_size, 1) * 4
        for start in tqdm(range(0, len(cells), bs), desc="fine object tokens", disable=not progress,
                          unit="batch", leave=False):
            batch = cells_to_batch(cells[start:start + bs], max_objects=cfg.max_objects, num_points=cfg.num_points,
                                   rng=None).trimmed().to(self.device)
            parts.append((self.fine.encode_objects(batch), batch))
        return MapObjectTokens.from_batches(parts)

    def _embed_cells(self, cells: list, progress: bool):
        """(kept cells, PackedCellEmbedding or None): the coarse model's embedding of ``cells``, cells
        with a non-finite embedding left out (counted, logged).

        Cells are batched in order of their object count, so that a batch's object slots are
        mostly real ones (the model skips the padded slots past a batch's largest cell); the
        embedding is put back in map order."""
        from spatialoc_ros.models.cell_tensors import cells_to_batch

        if self.coarse is None:
            return cells, None
        cfg = self.coarse_cfg
        parts = []
        bs = max(self.batch_size, 1)
        order = np.argsort([len(c.objects) for c in cells], kind="stable")
        finite = torch.empty(len(cells), dtype=torch.bool, device=self.device)
        with torch.no_grad():
            for start in tqdm(range(0, len(cells), bs), desc="embedding map cells", disable=not progress,
                              unit="batch", leave=False):
                chunk = [cells[i] for i in order[start:start + bs]]
                batch = cells_to_batch(chunk, max_objects=cfg.max_objects, num_points=cfg.num_points,
                                       rng=None).trimmed().to(self.device)
                part = self.coarse.encode_cells(batch).packed()
                # a cell is kept when its global vector and every vector of its real objects is finite
                ok = torch.isfinite(part.global_).all(dim=1)
                for rows in (part.objects, part.relations):
                    if rows is not None:
                        ok[part.cell[~torch.isfinite(rows).all(dim=1)]] = False
                finite[torch.from_numpy(order[start:start + bs]).to(self.device)] = ok
                parts.append(part)
            index = self._packed_in_map_order(parts, order)
            del parts
        if not bool(finite.all()):
            bad = (~finite).nonzero().reshape(-1).tolist()
            self.nonfinite["cell_embedding"] += len(bad)
            _log.error("%d of %d cells have a non-finite embedding and are left out of the map (e.g. %s)",
                       len(bad), len(cells), cells[bad[0]].id)
            if len(bad) == len(cells):
                raise NonFiniteOutputError(
                    f"no cell of the {len(cells)} has a finite embedding (cell data out of range, or a damaged model)")
            keep = finite.nonzero().reshape(-1)
            index = index.select(keep)
            cells = [cells[i] for i in keep.tolist()]
        return cells, index

    def _packed_in_map_order(self, parts: list, order: np.ndarray):
        """One PackedCellEmbedding of the map from the packed embeddings ``parts`` of the cells
        ``order`` (map indices, part after part): every row copied once, straight to its place."""
        from spatialoc_ros.models.coarse import PackedCellEmbedding

        n, width, dev = len(order), self.coarse_cfg.max_objects, self.device
        where = torch.from_numpy(order).to(dev)
        mask = torch.zeros((n, width), dtype=torch.bool, device=dev)
        global_ = torch.empty((n, parts[0].global_.shape[1]), dtype=parts[0].global_.dtype, device=dev)
        at = 0
        for p in parts:
            mask[where[at:at + len(p)], :p.mask.shape[1]] = p.mask
            global_[where[at:at + len(p)]] = p.global_
            at += len(p)
        counts = mask.sum(dim=1)
        first = torch.cumsum(counts, dim=0) - counts  # where each cell's rows begin in map order
        rows = int(counts.sum())
        out = {name: None if getattr(parts[0], name) is None else
               torch.empty((rows, getattr(parts[0], name).shape[1]), dtype=getattr(parts[0], name).dtype, device=dev)
               for name in ("objects", "relations")}
        at = 0
        for p in parts:
            # row r of the part: slot r - start[cell] of its cell, whose rows begin at first[map index]
            dest = first[where[at:at + len(p)]][p.cell] + torch.arange(len(p.objects), device=dev) - p.start[p.cell]
            for name, t in out.items():
                if t is not None:
                    t[dest] = getattr(p, name)
            at += len(p)
        return PackedCellEmbedding(global_, mask, out["objects"], out["relations"])

    def _build_vector_index(self, descriptors: torch.Tensor, cache_path: Optional[str]):
        """The short-list index over the map's global descriptors; a FAISS index reuses (or writes)
        its trained centroids next to the map cache when there is one."""
        from spatialoc_ros.models import embedding_cache
        from spatialoc_ros.models.vector_index import build_index, num_lists, resolve_kind

        if resolve_kind(self.index_kind, len(descriptors), self.preselect_above) == "exact":
            return build_index("exact", descriptors, self.preselect_above)
        side = None if cache_path is None else embedding_cache.centroids_path(cache_path, num_lists(len(descriptors)))
        centroids = None if side is None else embedding_cache.load_centroids(
            side, num_lists(len(descriptors)), descriptors.shape[1])
        t0 = time.perf_counter()
        built = build_index("faiss", descriptors, self.preselect_above, nprobe=self.index_nprobe, centroids=centroids)
        _log.info("FAISS index of %d cells (%d lists, %d scanned per query) built in %.1f s%s", len(descriptors),
                  built.nlist, built.nprobe, time.perf_counter() - t0, " from cached centroids" if centroids is not None else "")
        if side is not None and centroids is None:
            try:
                embedding_cache.save_centroids(side, built.centroids)
            except OSError as e:
                _log.warning("could not write the index cache %s (%s); continuing without it", side, e)
        return built

    def use_index(self, kind: str, nprobe: Optional[int] = None) -> str:
        """Rebuild the short-list index of the current map with another back-end ('auto' | 'exact'
        | 'faiss') and FAISS ``nprobe``; returns the back-end in use."""
        from spatialoc_ros.models.vector_index import check_kind

        self._require_map()
        kind = check_kind(kind)
        if nprobe is not None and int(nprobe) < 1:
            raise ValueError(f"index_nprobe must be >= 1, got {nprobe}")
        self.index_kind, self.index_nprobe = kind, None if nprobe is None else int(nprobe)
        self._vector_index = self._build_vector_index(self._index.global_, None)
        return self._vector_index.kind

    @property
    def index_in_use(self) -> Optional[str]:
        """'exact' or 'faiss': the short-list back-end of the current map (None without a map)."""
        return None if self._vector_index is None else self._vector_index.kind

    def _cache_fields(self, with_relations: bool) -> tuple[dict, Optional[dict]]:
        cfg = self.coarse_cfg
        D, O = self.coarse.embed_dim, cfg.max_objects
        index = {"global_": ("f", (D,)), "mask": ("b", (O,)), "objects": ("f", (D,))}  # objects: packed rows
        if getattr(self.coarse, "use_beose", False):
            index["relations"] = ("f", (D,))
        relations = None
        if with_relations:
            from spatialoc_ros.models.geometry import GRID_STEPS, NEAREST

            relations = {"placed": ("i", None), "label": ("i", (O,)), "colour": ("i", (O,)), "mask": ("b", (O,)),
                         "nearest": ("i", (GRID_STEPS ** 2, NEAREST))}
        return index, relations

    def _save_cached_map(self, path: str, cells: list, index, relations) -> None:
        from spatialoc_ros.models import embedding_cache

        try:
            embedding_cache.save(path, [c.id for c in cells], index.tensors,
                                 None if relations is None else
                                 {f.name: getattr(relations, f.name) for f in dataclasses.fields(relations)})
            _log.info("map embedding of %d cells cached in %s", len(cells), path)
        except OSError as e:  # a cache that cannot be written costs time, not correctness
            _log.warning("could not write the embedding cache %s (%s); continuing without it", path, e)

    def _load_cached_map(self, path: str, cells: list, with_relations: bool):
        """(kept cells, PackedCellEmbedding, CellRelations or None) from the cache, or None."""
        from spatialoc_ros.models import embedding_cache
        from spatialoc_ros.models.coarse import PackedCellEmbedding
        from spatialoc_ros.models.geometry import CellRelations

        index_fields, relation_fields = self._cache_fields(with_relations)
        got = embedding_cache.load(path, [c.id for c in cells], index_fields, relation_fields)
        if got is None:
            return None
        ids, index, rel = got
        by_id = {c.id: c for c in cells}
        kept = [by_id[i] for i in ids]
        if len(kept) < len(cells):
            self.nonfinite["cell_embedding"] += len(cells) - len(kept)
        emb = PackedCellEmbedding(**{k: v.to(self.device) for k, v in index.items()})
        relations = None if rel is None else CellRelations(**{k: v.to(self.device) for k, v in rel.items()})
        _log.info("map embedding of %d cells loaded from the cache %s", len(kept), path)
        return kept, emb, relations

    def clear_map(self) -> None:
        """Forget the map and its embedding (a deactivated node holds none)."""
        self._cells = None
        self._index = None
        self._relations = None
        self._hint_lookup = None
        self._vector_index = None
        self._fine_cache = {}
        self._fine_tokens = None

    # --- text ----------------------------------------------------------------------------------
    def _hint_batch(self, stage: str, hints: list[list[str]]):
        return self._hint_encoders[stage].batch(hints, self.device)

    # --- retrieval ---------------------------------------------------------------------------------
    def _with_relations(self, scores: torch.Tensor, hints: Sequence, cells=None) -> torch.Tensor:
        """Add the geometric hint-binding level (weight ``relation_weight``) to combined scores
        (B, N) of the map cells ``cells`` (indices; None = all)."""
        if self._relations is None or self.relation_weight <= 0:
            return scores
        from spatialoc_ros.models.geometry import binding_scores

        rel = self._map_geometry() if cells is None else self._relations.index(cells)
        geo = torch.stack([binding_scores(h, rel) for h in hints]).to(scores.dtype)
        out = scores + self.relation_weight * geo
        if self.selection_weight > 0:
            out = self._with_selection(out, geo, hints, cells)
        return out

    def _with_selection(self, out: torch.Tensor, geo: torch.Tensor, hints: Sequence, cells=None) -> torch.Tensor:
        """Combined scores (B, N) with the selection rule added to the geometric level of each
        query's SELECTION_SHORTLIST best cells (the rule costs about 45 us per cell and query, and a
        cell further down would need to overtake 30 others by its bonus alone)."""
        from spatialoc_ros.models.geometry import selection_matches, with_selection

        m = min(SELECTION_SHORTLIST, out.shape[1])
        # NaN only keeps a non-finite cell out of the short list here; the scores themselves keep
        # their NaN, which _rankable counts, logs and ranks last
        top = torch.topk(torch.nan_to_num(out, nan=float("-inf")), m, dim=1).indices  # (B, m)
        out = out.clone()
        for b, h in enumerate(hints):
            rows = top[b]
            map_rows = rows if cells is None else torch.as_tensor(cells, device=rows.device)[rows]
            share = selection_matches(h, self._relations.index(map_rows)).to(geo.dtype).mean(dim=1)
            bonus = with_selection(geo[b, rows], share, self.selection_weight) - geo[b, rows]
            out[b, rows] = out[b, rows] + self.relation_weight * bonus
        return out

    def _map_embedding(self):
        """What scoring a query against every cell reads: the map's packed embedding."""
        return self._index

    def _map_geometry(self):
        """The map's geometric level for a query against every cell: its HintLookup when set_map
        made one, else its CellRelations (the same scores), None without geometry."""
        return self._relations if self._hint_lookup is None else self._hint_lookup

    def calibrated(self, name: str, num_hints: int) -> float:
        """The calibration value ``name`` ('temperature', 'mixture_within_scale',
        'mixture_spread_scale') for a query of ``num_hints`` hints: the per-hint-count value when
        calibrated so (the nearest calibrated count), else the scalar."""
        values = self.by_hints.get(f"{name}_by_hints")
        if not values:
            return float(getattr(self, name))
        counts = self._calibrated_counts
        n = min(max(int(num_hints), counts[0]), counts[-1])
        return values[counts.index(n)] if n in counts else values[-1]

    def _top(self, scores: torch.Tensor, k: int, hints: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k indices, scores and calibrated probabilities (softmax at the temperature of each
        query's hint count over all rankable cells of the row) of (B, N) scores."""
        top = torch.topk(scores, k, dim=1)
        temps = torch.tensor([self.calibrated("temperature", len(h)) for h in hints], dtype=torch.float64,
                             device=scores.device)
        logp = torch.log_softmax(scores.double() / temps[:, None], dim=1)
        prob = torch.gather(logp, 1, top.indices).exp()
        return top.indices.cpu().numpy(), top.values.float().cpu().numpy(), prob.cpu().numpy()

    @torch.no_grad()
    def _retrieve(self, text_emb, top_k: int, hints: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k cell indices, combined scores and probabilities for a batch of encoded queries
        (B, k) each; ``hints``: the B queries' hints (for the geometric level)."""
        n = self.num_cells
        k = min(top_k, n)
        shortlist = self._vector_index.kind == "faiss" or n > self.preselect_above
        if shortlist and self.preselect_top < n:
            return self._retrieve_preselect(text_emb, k, hints)
        sims = self.coarse.similarity(text_emb, self._map_embedding())  # {level: (B, N)}
        scores = self._rankable(self._with_relations(self.coarse.combined_scores(sims), hints))  # (B, N)
        return self._top(scores, k, hints)

    def _rankable(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` with non-finite entries counted, logged and ranked last (as -inf): a cell
        without a finite score is never preferred. Hypotheses on such cells are left out later."""
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            count = int(bad.sum())
            self.nonfinite["score"] += count
            _log.error("%d retrieval score(s) are not finite; those cells are ranked last and not answered", count)
            scores = scores.masked_fill(bad, float("-inf"))
        return scores

    def _retrieve_preselect(self, text_emb, k: int, hints: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _, cand = self._vector_index.search(text_emb.global_, max(self.preselect_top, k))  # (B, M)
        idx_out, val_out, prob_out = [], [], []
        for b in range(cand.shape[0]):
            sub = self._index.take(cand[b])  # the short list, padded
            sims = self.coarse.similarity(_take(text_emb, slice(b, b + 1)), sub)
            scores = self._rankable(self._with_relations(self.coarse.combined_scores(sims), hints[b:b + 1], cand[b]))
            top, val, prob = self._top(scores, k, hints[b:b + 1])  # (1, k) each
            idx_out.append(cand[b].cpu().numpy()[top[0]])
            val_out.append(val[0])
            prob_out.append(prob[0])
        return np.stack(idx_out), np.stack(val_out), np.stack(prob_out)

    # --- fine --------------------------------------------------------------------------------------
    def _fine_cells(self, cell_indices: Sequence[int]):
        """CellBatch of the map cells ``cell_indices`` for the fine model (cached per cell)."""
        from spatialoc_ros.models.cell_tensors import cells_to_batch

        missing = [i for i in dict.fromkeys(cell_indices) if i not in self._fine_cache]
        if missing:
            if len(self._fine_cache) + len(missing) > 20000:
                self._fine_cache = {}
            cfg = self.fine_cfg
            batch = cells_to_batch([self._cells[i] for i in missing], max_objects=cfg.max_objects,
                                   num_points=cfg.num_points, rng=None)
            for j, i in enumerate(missing):
                self._fine_cache[i] = batch.index(slice(j, j + 1))
        return _concat([self._fine_cache[i] for i in cell_indices])

    @torch.no_grad()
    def _predict_fine(self, hint_batch, cell_indices: np.ndarray) -> FinePrediction:
        """Gaussians (cell units) for queries (B) x cells (B, K): mean (B, K, 2), cov (B, K, 2, 2)."""
        B, K = cell_indices.shape
        if self.fine is None:
            mean = np.full((B, K, 2), 0.5)
            cov = np.broadcast_to(np.eye(2) / 12.0, (B, K, 2, 2)).copy()
            return FinePrediction(mean, cov)
        flat = torch.as_tensor(cell_indices.reshape(-1), dtype=torch.long)
        if self._fine_tokens is not None:
            objects, object_mask, xyz = self._fine_tokens.gather(flat.to(self.device))
        else:
            cells = self._fine_cells(flat.tolist()).to(self.device).trimmed()
            objects, object_mask, xyz = self.fine.encode_objects(cells), cells.mask, cells.xyz
        h = self.fine.encode_hints(hint_batch)  # (B, H, D), once per query for its K cells
        rep = torch.arange(B, device=h.device).repeat_interleave(K)
        means, covs = [], []
        step = max(self.batch_size, 1) * 4
        for s in range(0, B * K, step):
            r = rep[s:s + step]
            g, _ = self.fine.predict(h[r], hint_batch.hint_mask[r], objects[s:s + step], object_mask[s:s + step],
                                     xyz[s:s + step])
            means.append(g.mean.float().cpu())
            covs.append(g.covariance.float().cpu())
        mean = torch.cat(means).numpy().astype(np.float64).reshape(B, K, 2)
        cov = torch.cat(covs).numpy().astype(np.float64).reshape(B, K, 2, 2) * self.sigma_scale**2
        return FinePrediction(mean, cov)

    def _refine(self, pred: FinePrediction, cell_indices: np.ndarray, hints: Sequence) -> FinePrediction:
        """:func:`spatialoc_ros.models.geometry.refine_in_cell` of every (query, cell) Gaussian, when
        the map's geometry is kept and refinement is on; ``hints``: the B queries' hints."""
        if self._relations is None or self.refine_sharpness <= 0 or self.fine is None:
            return pred
        from spatialoc_ros.models.geometry import candidate_grid, refine_in_cell, satisfied_hints, selection_matches

        grid = candidate_grid()
        mean, cov = pred.mean.copy(), pred.cov.copy()
        for b in range(cell_indices.shape[0]):
            rows = torch.as_tensor(cell_indices[b], device=self._relations.mask.device)
            rel = self._relations.index(rows)
            share = satisfied_hints(hints[b], rel, len(grid)).float().mean(dim=1)
            match = selection_matches(hints[b], rel).cpu().numpy() if self.selection_weight > 0 else None
            mean[b], cov[b] = refine_in_cell(share.cpu().numpy(), grid, mean[b], cov[b], self.refine_sharpness,
                                             match, self.selection_weight)
        return FinePrediction(mean, cov)

    def _hypotheses(self, idx_row, score_row, mean_row, cov_row, retrieved: bool = True,
                    prob_row=None, num_hints: int = 0) -> list[Hypothesis]:
        """Hypotheses of one query; non-finite ones are counted, logged and left out; raises
        NonFiniteOutputError when none is left."""
        out = []
        left_out = 0
        probs = [float("nan")] * len(idx_row) if prob_row is None else prob_row
        for i, s, mu, cov, p in zip(idx_row, score_row, mean_row, cov_row, probs):
            i = int(i)
            size = self._size[i]
            if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cov)) and (math.isfinite(s) or not retrieved)):
                left_out += 1
                continue
            cov_m = safe_covariance(cov * size * size)
            cell = self._cells[i]
            out.append(Hypothesis(
                cell_id=cell.id,
                scene=str(cell.scene_name),
                score=float(s),
                mean_xy=self._bbox[i, 0:2] + mu * size,
                cov_xy=cov_m,
                pos_in_cell=np.asarray(mu, dtype=np.float64).copy(),
                bbox_w=self._bbox[i].copy(),
                probability=float(p),
                num_hints=int(num_hints),
            ))
        if left_out:
            self.nonfinite["hypothesis"] += left_out
            _log.error("%d of %d hypotheses were not finite (mean, covariance or score) and are left out",
                       left_out, len(idx_row))
        if not out:
            raise NonFiniteOutputError(
                f"none of the {len(idx_row)} hypotheses is finite; the model gives non-finite outputs "
                "(see Localizer.nonfinite)"
            )
        return out

    # --- public API --------------------------------------------------------------------------------
    def _read(self, queries: Sequence[Query]) -> tuple[list, list[list[str]]]:
        """(hints of each query, their canonical sentences): the one reading every entry point uses."""
        from spatialoc_ros.language import render_hints

        parsed = [understand(q, self.min_hints).hints for q in queries]
        return parsed, [render_hints(h) for h in parsed]

    def understand(self, query: Query) -> "ParsedInstruction":
        """What ``query`` says (hints, unread fragments), or InstructionRefused with the reason; the
        same reading :meth:`localize` uses. Pure and thread-safe (no model is run)."""
        return understand(query, self.min_hints)

    def estimate(self, query: Query, top_k: int = 5, covariance: str = "mixture") -> Estimate:
        """One position estimate for ``query`` (see :class:`Estimate`): the top ``top_k``
        hypotheses with their calibrated cell probabilities, combined into one Gaussian.

        ``covariance='mixture'`` (default): the moment-matched Gaussian of the hypotheses of the top
        cell's scene, weighted by their probabilities (renormalised over those hypotheses), so a
        doubt between distant cells shows as a wide covariance; ``'top'``: the top hypothesis alone.
        """
        return self.estimate_many([query], top_k, covariance)[0]

    def estimate_many(self, queries: Sequence[Query], top_k: int = 5, covariance: str = "mixture",
                      progress: bool = False) -> list[Estimate]:
        """:meth:`estimate` for many queries, batched."""
        if covariance not in COVARIANCE_MODES:  # before any model runs
            raise ValueError(f"covariance must be one of {COVARIANCE_MODES}, got {covariance!r}")
        return [self.combine(h, covariance) for h in self.localize_many(queries, top_k, progress=progress)]

    def combine(self, hypotheses: Sequence[Hypothesis], covariance: str = "mixture") -> Estimate:
        """The :class:`Estimate` of a ranked hypothesis list (best first, probabilities set). The
        mixture's covariance is ``mixture_within_scale * within + mixture_spread_scale * spread``
        (:func:`mixture_moments`; the two factors fitted on val, see
        :mod:`spatialoc_ros.training.calibrate`)."""
        if covariance not in COVARIANCE_MODES:
            raise ValueError(f"covariance must be one of {COVARIANCE_MODES}, got {covariance!r}")
        if not hypotheses:
            raise ValueError("no hypothesis to combine")
        top = hypotheses[0]
        confidence = float(top.probability)
        if not math.isfinite(confidence):
            raise ValueError("the hypotheses carry no probabilities (cells given, not retrieved)")
        if covariance == "top":
            mean, cov = top.mean_xy.copy(), top.cov_xy.copy()
        else:
            same = [h for h in hypotheses if h.scene == top.scene]
            mean, cov = moment_match(np.array([h.probability for h in same]),
                                     np.stack([h.mean_xy for h in same]), np.stack([h.cov_xy for h in same]),
                                     self.calibrated("mixture_within_scale", top.num_hints),
                                     self.calibrated("mixture_spread_scale", top.num_hints))
        return Estimate(mean_xy=mean, cov_xy=cov, confidence=confidence, hypotheses=tuple(hypotheses),
                        scene=top.scene, covariance=covariance)

    def localize(self, query: Query, top_k: int = 5) -> list[Hypothesis]:
        """The top_k hypotheses for one query, best first (see the module docstring). ``query``:
        free text ("I'm on the sidewalk, a gray building is east of me ..."), a ParsedInstruction or
        a list of Hint; InstructionRefused (a ValueError) when it holds fewer than min_hints hints."""
        return self.localize_many([query], top_k)[0]

    @torch.no_grad()
    def localize_many(self, texts: Sequence[Query], top_k: int = 5, progress: bool = False) -> list[list[Hypothesis]]:
        """:meth:`localize` for many texts, batched; ``timings`` sums the whole call."""
        self._require_map()
        if self.coarse is None:
            raise ValueError("this Localizer has no coarse model: use predict_in_cells")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        parsed, hints = self._read(texts)
        timings = {"text_ms": 0.0, "retrieval_ms": 0.0, "fine_ms": 0.0}
        results: list[list[Hypothesis]] = []
        bs = max(self.batch_size, 1)
        for start in tqdm(range(0, len(hints), bs), desc="localising", disable=not progress, unit="batch"):
            chunk = hints[start:start + bs]
            t0 = time.perf_counter()
            hb = self._hint_batch("coarse", chunk)
            text_emb = self.coarse.encode_text(hb)
            hb_fine = self._hint_batch("fine", chunk) if self.fine is not None else None
            _sync(self.device)
            t1 = time.perf_counter()
            idx, scores, probs = self._retrieve(text_emb, int(top_k), parsed[start:start + bs])
            _sync(self.device)
            t2 = time.perf_counter()
            pred = self._refine(self._predict_fine(hb_fine, idx), idx, parsed[start:start + bs])
            _sync(self.device)
            t3 = time.perf_counter()
            timings["text_ms"] += 1e3 * (t1 - t0)
            timings["retrieval_ms"] += 1e3 * (t2 - t1)
            timings["fine_ms"] += 1e3 * (t3 - t2)
            for b in range(len(chunk)):
                results.append(self._hypotheses(idx[b], scores[b], pred.mean[b], pred.cov[b], prob_row=probs[b],
                                                num_hints=len(parsed[start + b])))
        self.timings = timings
        return results

    @torch.no_grad()
    def rank(self, texts: Sequence[str], top_k: int = 5, progress: bool = False) -> np.ndarray:
        """Coarse stage only: (len(texts), min(top_k, num_cells)) map indices, best first."""
        self._require_map()
        if self.coarse is None:
            raise ValueError("this Localizer has no coarse model")
        parsed, hints = self._read(texts)
        out = []
        bs = max(self.batch_size, 1)
        for start in tqdm(range(0, len(hints), bs), desc="retrieving", disable=not progress, unit="batch"):
            text_emb = self.coarse.encode_text(self._hint_batch("coarse", hints[start:start + bs]))
            out.append(self._retrieve(text_emb, int(top_k), parsed[start:start + bs])[0])
        return np.concatenate(out, axis=0)

    @torch.no_grad()
    def score_levels(self, queries: Sequence[Query], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores of every map cell for each query, before the relation weight is applied:
        (learned (Q, N): the learned levels' combined score, geometric (Q, N): the hint-binding
        share in [0, 1]). The ranking score is ``learned + relation_weight * geometric``. For
        calibration and analysis; computes the geometry of the map when it was not kept."""
        self._require_map()
        if self.coarse is None:
            raise ValueError("this Localizer has no coarse model")
        from spatialoc_ros.models.geometry import binding_scores, cell_relations

        rel = self._map_geometry()
        if rel is None:
            rel = cell_relations(self._cells, max_objects=self.coarse_cfg.max_objects).to(self.device)
        cells = self._map_embedding()
        parsed, sentences = self._read(queries)
        learned, geo = [], []
        bs = max(self.batch_size, 1)
        for start in tqdm(range(0, len(parsed), bs), desc="scoring", disable=not progress, unit="batch"):
            chunk = parsed[start:start + bs]
            text_emb = self.coarse.encode_text(self._hint_batch("coarse", sentences[start:start + bs]))
            learned.append(self.coarse.combined_scores(self.coarse.similarity(text_emb, cells)).double().cpu())
            geo.append(torch.stack([binding_scores(h, rel) for h in chunk]).double().cpu())
        return torch.cat(learned).numpy(), torch.cat(geo).numpy()

    @torch.no_grad()
    def selection_shares(self, queries: Sequence[Query], progress: bool = False) -> np.ndarray:
        """(Q, N): for each query and map cell, the share of candidate positions at which the hints
        are the cell's nearest objects (:func:`spatialoc_ros.models.geometry.selection_matches`), over
        every cell (calibration and analysis; the ranking applies it to a short list)."""
        self._require_map()
        from spatialoc_ros.models.geometry import cell_relations, selection_matches

        rel = self._relations
        if rel is None:
            rel = cell_relations(self._cells, max_objects=self.coarse_cfg.max_objects).to(self.device)
        parsed, _ = self._read(queries)
        return np.stack([selection_matches(h, rel).double().mean(dim=1).cpu().numpy()
                         for h in tqdm(parsed, desc="selection", disable=not progress, unit="query")])

    @torch.no_grad()
    def predict_in_cells(self, texts: Sequence[str], cell_ids: Sequence[str], progress: bool = False) -> list[Hypothesis]:
        """Fine stage only: one hypothesis per (text, given map cell id); ``score`` is NaN."""
        self._require_map()
        if len(texts) != len(cell_ids):
            raise ValueError(f"{len(texts)} texts for {len(cell_ids)} cell ids")
        unknown = [c for c in cell_ids if c not in self._id_to_index]
        if unknown:
            raise ValueError(f"cell {unknown[0]!r} is not in the map")
        parsed, sentences = self._read(texts)
        out: list[Hypothesis] = []
        bs = max(self.batch_size, 1) * 4
        for start in tqdm(range(0, len(parsed), bs), desc="fine in given cells", disable=not progress, unit="batch"):
            chunk = parsed[start:start + bs]
            idx = np.array([[self._id_to_index[c]] for c in cell_ids[start:start + bs]])
            hb = self._hint_batch("fine", sentences[start:start + bs]) if self.fine is not None else None
            pred = self._refine(self._predict_fine(hb, idx), idx, chunk)
            for b in range(len(chunk)):
                out.extend(self._hypotheses(idx[b], [float("nan")], pred.mean[b], pred.cov[b], retrieved=False,
                                            num_hints=len(chunk[b])))
        return out

    def cell_index(self, cell_id: str) -> int:
        self._require_map()
        return self._id_to_index[cell_id]
