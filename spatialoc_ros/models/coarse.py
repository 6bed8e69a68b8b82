"""Coarse stage: text-to-cell retrieval with multi-level similarities (SpatiaLoc).

Text side (from frozen token features):
    tokens (B, H, T, Dt) -> attention pooling over tokens + MLP -> hint features (B, H, D)
    hint features -> transformer over the hints -> hint context (B, H, D)
    object level   : per-hint features  -> linear -> L2-normalised (what each hint names)
    relation level : per-hint context   -> linear -> L2-normalised (the hint among the others)
    global         : masked max over the context -> MLP -> L2-normalised query vector
Cell side:
    ObjectEncoder -> object tokens (B, O, D)
    object level   : tokens -> linear -> L2-normalised
    BEOSE (use_beose) -> tokens enriched by their spatial relations + a relation descriptor per
                     object -> relation level: linear(enriched token ++ relation descriptor),
                     L2-normalised (the object in the context of its neighbours)
    global         : FAE(enriched tokens) when use_fae, else MLP(masked mean ++ masked max);
                     L2-normalised
Similarities (each (Bt, Bc)):
    'global'   : cosine of the two global vectors
    'object'   : for each real hint, the best cosine over the cell's real objects; mean over hints
    'relation' : the same rule between hint-context vectors and per-object BEOSE vectors: both
                 describe one entity in the context of the others (a hint among the other hints
                 of the query, an object among its cell neighbours). Only present when
                 use_beose is True; without BEOSE there is no cell-side relation descriptor and
                 the level is omitted everywhere (sims, losses, combined scores).
Every output vector passes a centring BatchNorm (no affine, real entries only) right before its
L2 normalisation: at initialisation all embeddings share one direction (cosines ~0.97 between
different cells), which kept the ranking losses on a plateau for epochs; centred, they learn from
the first batches. In eval mode the running statistics are used, one sample at a time.
``combined_scores`` z-scores each level over the cells of a row and sums the levels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from spatialoc_ros.models.beose import BEOSE
from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.fae import FAE
from spatialoc_ros.models.layers import (  # noqa: F401  (set_level_similarity is re-exported)
    AttentionPool,
    MaskedBatchNorm,
    masked_max,
    masked_mean,
    mlp,
    packed_set_similarity,
    set_level_similarity,
)
from spatialoc_ros.models.text_encoder import HintBatch

_Z_EPS = 1e-6


@dataclass
class TextEmbedding:
    """Query embeddings; every vector is L2-normalised."""

    global_: torch.Tensor  # (B, D)
    objects: torch.Tensor  # (B, H, D) per-hint object-level vectors
    hint_mask: torch.Tensor  # (B, H) bool
    relations: Optional[torch.Tensor] = None  # (B, H, D) per-hint relation-level vectors

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(*[None if v is None else v.to(device) for v in _values(self)])

    def index(self, idx) -> "TextEmbedding":
        return TextEmbedding(*[None if v is None else v[idx] for v in _values(self)])


@dataclass
class CellEmbedding:
    """Cell embeddings; every vector is L2-normalised, padded objects are zero vectors."""

    global_: torch.Tensor  # (B, D)
    objects: torch.Tensor  # (B, O, D)
    mask: torch.Tensor  # (B, O) bool
    relations: Optional[torch.Tensor] = None  # (B, O, D) per-object relation descriptors

    def to(self, device) -> "CellEmbedding":
        return CellEmbedding(*[None if v is None else v.to(device) for v in _values(self)])

    def index(self, idx) -> "CellEmbedding":
        return CellEmbedding(*[None if v is None else v[idx] for v in _values(self)])

    @staticmethod
    def cat(parts: Sequence["CellEmbedding"]) -> "CellEmbedding":
        """Concatenate embeddings of several cell batches along B."""
        columns = list(zip(*[_values(p) for p in parts]))
        return CellEmbedding(*[None if c[0] is None else torch.cat(c, dim=0) for c in columns])

    def packed(self) -> "PackedCellEmbedding":
        """The same embedding with the padded object slots left out (see PackedCellEmbedding)."""
        return PackedCellEmbedding(global_=self.global_, mask=self.mask, objects=self.objects[self.mask],
                                   relations=None if self.relations is None else self.relations[self.mask])


class PackedCellEmbedding:
    """A map's CellEmbedding with its real object vectors only: what a Localizer keeps for a map.

    ``objects`` / ``relations`` (R, D) hold the vectors of the True slots of ``mask`` (B, O), cell
    after cell and slot after slot within a cell (``emb.objects[emb.mask]``), so that scoring one
    query against a whole map reads no padded slot (:meth:`CoarseModel.similarity` takes it as it
    is) and a city map needs memory for its real objects only. :meth:`take` gives back the padded
    CellEmbedding of some cells (a short list), :meth:`select` a packed subset in any order.
    ``cell`` (R,) is the cell of each row and ``start`` (B + 1,) where each cell's rows begin.
    """

    def __init__(self, global_: torch.Tensor, mask: torch.Tensor, objects: torch.Tensor,
                 relations: Optional[torch.Tensor] = None) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != global_.shape[0]:
            raise ValueError(f"mask must be (B, O) bool for {global_.shape[0]} cells, got {mask.dtype} {tuple(mask.shape)}")
        counts = mask.sum(dim=1)
        self.start = torch.zeros(len(counts) + 1, dtype=torch.long, device=mask.device)
        torch.cumsum(counts, dim=0, out=self.start[1:])
        rows = int(self.start[-1])
        for name, t in (("objects", objects), ("relations", relations)):
            if t is not None and (t.dim() != 2 or t.shape[0] != rows):
                raise ValueError(f"{name} must have one row per real slot ({rows}), got {tuple(t.shape)}")
        self.global_, self.mask, self.objects, self.relations = global_, mask, objects, relations
        self.cell = torch.repeat_interleave(torch.arange(len(counts), device=mask.device), counts)

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    @property
    def tensors(self) -> dict:
        """{name: tensor} of what defines the embedding (what a cache stores)."""
        out = {"global_": self.global_, "mask": self.mask, "objects": self.objects}
        if self.relations is not None:
            out["relations"] = self.relations
        return out

    def to(self, device) -> "PackedCellEmbedding":
        return PackedCellEmbedding(**{k: v.to(device) for k, v in self.tensors.items()})

    def _rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``idx`` as a long tensor, the rows of those cells in that order)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.start.device).reshape(-1)
        first, counts = self.start[idx], self.start[idx + 1] - self.start[idx]
        before = torch.cumsum(counts, dim=0) - counts  # where each cell's rows go in the result
        total = int(counts.sum())
        rows = torch.arange(total, device=idx.device) + torch.repeat_interleave(first - before, counts, output_size=total)
        return idx, rows

    def select(self, idx) -> "PackedCellEmbedding":
        """The cells ``idx`` (indices, in that order; repeats allowed), packed."""
        idx, rows = self._rows(idx)
        return PackedCellEmbedding(self.global_[idx], self.mask[idx], self.objects[rows],
                                   None if self.relations is None else self.relations[rows])

    def take(self, idx) -> CellEmbedding:
        """The padded CellEmbedding of the cells ``idx`` (zero vectors at the padded slots)."""
        idx, rows = self._rows(idx)
        mask = self.mask[idx]

        def pad(t):
            if t is None:
                return None
            out = t.new_zeros(tuple(mask.shape) + (t.shape[1],))
            out[mask] = t[rows]
            return out

        return CellEmbedding(self.global_[idx], pad(self.objects), mask, pad(self.relations))


def _values(obj) -> list:
    return [getattr(obj, f.name) for f in fields(obj)]


def combined_scores(sims: dict) -> torch.Tensor:
    """Evaluation rule: z-score every level over the cells of each row (dim 1) and sum them.

    sims: {level: (Bt, Bc)} -> (Bt, Bc). Works for one query against N cells (Bt = 1).
    """
    if not sims:
        raise ValueError("combined_scores needs at least one similarity level")
    total = None
    for level, s in sims.items():
        assert s.dim() == 2, f"level {level!r} must be (Bt, Bc), got {tuple(s.shape)}"
        z = (s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, unbiased=False, keepdim=True) + _Z_EPS)
        total = z if total is None else total + z
    return total


class HintContextEncoder(nn.Module):
    """Token features (B, H, T, Dt) -> (hint features (B, H, D), hint context (B, H, D))."""

    def __init__(self, *, text_dim: int, embed_dim: int, num_layers: int, num_heads: int, dropout: float):
        super().__init__()
        self.token_pool = AttentionPool(in_dim=text_dim, hidden_dim=embed_dim // 2)
        self.hint_mlp = mlp([text_dim, embed_dim, embed_dim], dropout=dropout)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=2 * embed_dim, dropout=dropout,
            batch_first=True, norm_first=True,
        )
        self.context = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, hints: HintBatch):
        if not bool(hints.hint_mask.any(dim=1).all()):
            raise ValueError("every query needs at least one hint")
        pooled = self.token_pool(hints.tokens, hints.token_mask)  # (B, H, Dt)
        features = self.hint_mlp(pooled)  # (B, H, D)
        context = self.context(features, src_key_padding_mask=~hints.hint_mask)  # (B, H, D)
        keep = hints.hint_mask.unsqueeze(-1).to(features.dtype)
        return features * keep, context * keep


class CoarseModel(nn.Module):
    """Text-to-cell retrieval network (see the module docstring for the levels)."""

    def __init__(
        self,
        *,
        text_dim: int,
        embed_dim: int,
        object_encoder: nn.Module,
        num_hidden_layers: int = 3,
        num_heads: int = 4,
        use_beose: bool = True,
        beose_dim: int = 64,
        bezier_samples: int = 4,
        use_fae: bool = True,
        fae_highpass_ratio: float = 0.7,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.use_beose = use_beose
        self.use_fae = use_fae
        # text side
        self.hint_encoder = HintContextEncoder(
            text_dim=text_dim, embed_dim=embed_dim, num_layers=num_hidden_layers,
            num_heads=num_heads, dropout=dropout,
        )
        self.text_object_head = nn.Linear(embed_dim, embed_dim)
        self.text_global_head = mlp([embed_dim, embed_dim, embed_dim], dropout=dropout)
        # cell side
        self.object_encoder = object_encoder
        self.cell_object_head = nn.Linear(embed_dim, embed_dim)
        # One centring BatchNorm per output, right before the L2 normalisation (see MaskedBatchNorm).
        names = ["text_global", "text_object", "cell_global", "cell_object"]
        names += ["text_relation", "cell_relation"] if use_beose else []
        self.centre = nn.ModuleDict({name: MaskedBatchNorm(embed_dim) for name in names})
        if use_beose:
            self.beose = BEOSE(
                embed_dim=embed_dim, rel_dim=beose_dim, num_layers=num_hidden_layers,
                num_samples=bezier_samples, dropout=dropout,
            )
            self.text_relation_head = nn.Linear(embed_dim, embed_dim)
            self.cell_relation_head = nn.Linear(2 * embed_dim, embed_dim)
        if use_fae:
            self.fae = FAE(embed_dim=embed_dim, highpass_ratio=fae_highpass_ratio, dropout=dropout)
        else:
            self.cell_pool = mlp([2 * embed_dim, embed_dim, embed_dim], dropout=dropout)

    @property
    def levels(self) -> tuple[str, ...]:
        """The similarity levels this model produces, in order."""
        return ("global", "object", "relation") if self.use_beose else ("global", "object")

    def encode_text(self, hints: HintBatch) -> TextEmbedding:
        """(B, H, T, Dt) hint tokens -> global (B, D), objects (B, H, D), relations (B, H, D)."""
        features, context = self.hint_encoder(hints)  # (B, H, D) each
        mask = hints.hint_mask
        objects = F.normalize(self.centre["text_object"](self.text_object_head(features), mask), dim=-1)
        global_ = self.text_global_head(masked_max(context, mask, dim=1))
        global_ = F.normalize(self.centre["text_global"](global_), dim=-1)
        relations = None
        if self.use_beose:
            relations = self.centre["text_relation"](self.text_relation_head(context), mask)
            relations = F.normalize(relations, dim=-1)
        return TextEmbedding(global_, objects, mask, relations)

    def encode_cells(self, cells: CellBatch) -> CellEmbedding:
        """(B, O, P, 3) cells -> global (B, D), objects (B, O, D), relations (B, O, D)."""
        mask = cells.mask
        tokens = self.object_encoder(cells)  # (B, O, D)
        objects = F.normalize(self.centre["cell_object"](self.cell_object_head(tokens), mask), dim=-1)
        relations = None
        enriched = tokens
        if self.use_beose:
            enriched, rel = self.beose(tokens, cells.center, mask)  # (B, O, D) each
            relations = self.cell_relation_head(torch.cat([enriched, rel], dim=-1))
            relations = F.normalize(self.centre["cell_relation"](relations, mask), dim=-1)
        if self.use_fae:
            global_ = self.fae(enriched, mask)
        else:
            pooled = torch.cat([masked_mean(enriched, mask, dim=1), masked_max(enriched, mask, dim=1)], dim=-1)
            global_ = self.cell_pool(pooled)
        global_ = F.normalize(self.centre["cell_global"](global_), dim=-1)
        return CellEmbedding(global_, objects, mask, relations)

    def similarity(self, text: TextEmbedding, cells) -> dict:
        """-> {level: (Bt, Bc)} for every level in ``self.levels``; ``cells``: a CellEmbedding or
        its PackedCellEmbedding (the same values)."""
        if isinstance(cells, PackedCellEmbedding):
            def set_level(queries, items):
                return packed_set_similarity(queries, text.hint_mask, items, cells.cell, len(cells))
        else:
            def set_level(queries, items):
                return set_level_similarity(queries, text.hint_mask, items, cells.mask)
        sims = {"global": text.global_ @ cells.global_.T, "object": set_level(text.objects, cells.objects)}
        if self.use_beose:
            if text.relations is None or cells.relations is None:
                raise ValueError("this model has a relation level but an embedding lacks relations")
            sims["relation"] = set_level(text.relations, cells.relations)
        return sims

    def level_summaries(self, text: TextEmbedding, cells: CellEmbedding) -> dict:
        """One L2-normalised vector per query / cell and level, for the CCL distance weights.

        -> {level: (text (Bt, D), cells (Bc, D))}; set levels use the masked mean of their vectors.
        """
        out = {
            "global": (text.global_, cells.global_),
            "object": (
                F.normalize(masked_mean(text.objects, text.hint_mask, dim=1), dim=-1),
                F.normalize(masked_mean(cells.objects, cells.mask, dim=1), dim=-1),
            ),
        }
        if self.use_beose:
            out["relation"] = (
                F.normalize(masked_mean(text.relations, text.hint_mask, dim=1), dim=-1),
                F.normalize(masked_mean(cells.relations, cells.mask, dim=1), dim=-1),
            )
        return out

    def combined_scores(self, sims: dict) -> torch.Tensor:
        """(Bt, Bc) evaluation scores: see :func:`combined_scores`."""
        return combined_scores(sims)

    def forward(self, hints: HintBatch, cells: CellBatch) -> dict:
        """Convenience: similarities of a query batch against a cell batch."""
        return self.similarity(self.encode_text(hints), self.encode_cells(cells))
