"""Fine stage: UGFL, Uncertainty aware Gaussian Fine Localizer.

Given a query (hint token features) and one cell, predict the position inside the cell as a 2-D
Gaussian in cell units (x, y in [0, 1] across the cell):

    hint tokens   (B, H, D): attention pooling over each hint's tokens + MLP
    object tokens (B, O, D): an ObjectEncoder of its own (not shared with the coarse model)
    ``num_layers`` cross-attention blocks (pre-norm, residual): hints attend to objects, then
        objects attend to the updated hints (not in the last block: nothing reads it), each
        followed by a feed-forward layer
    pooled = MLP(masked mean ++ masked max of the hints)
    covariance: Linear(pooled) -> (a, b, c);
        scale_tril = [[softplus(a) + min_std, 0], [0.1 c, softplus(b) + min_std]]
    mean ('anchor', default):
        matcher: cosine(query(hint token), key(object token)) / 0.05, softmax over the real
            objects = which object the hint names (tokens taken before the blocks mix them);
        anchor: inside each object a soft extreme point of its points along a direction u_h that
            the hint predicts (softmax over points of 10 u_h . xy_p; u_h = 0 gives the points'
            mean, i.e. the centre): "east of a building" is about the building's east side, not
            its centre; the hint's anchor is the matcher-weighted extreme point;
        position per hint = anchor + 0.1 Linear(hint) (the distance part of "east of");
        mean = softmax-over-hints weighted positions.
        ``forward_with_matching`` also returns the matcher's (B, B) query-cell set similarity:
        a ranking loss on it teaches the matcher which object a hint names (weak supervision,
        like the coarse object level); the position loss alone teaches it slowly.
    mean ('direct'): 0.5 + 0.25 Linear(pooled), starting near the cell centre.
No sigmoid on the mean: positions just outside the cell stay representable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.layers import (
    AttentionPool,
    masked_max,
    masked_mean,
    masked_softmax,
    mlp,
    set_level_similarity,
)
from spatialoc_ros.models.text_encoder import HintBatch

#: Standard deviation (cell units) the covariance head starts from.
INITIAL_STD = 0.15
#: Output scales of the heads. Adam moves a linear head's output by up to ~lr * width per step
#: whatever the gradient's size, so a head that writes cell units directly random-walks by metres
#: between epochs; scaling the output by s shrinks those steps by s.
#: POINT_SHARPNESS multiplies the hint's direction u in the anchor head's point softmax (per cell
#: unit): |u| = 1 makes points 0.1 cell apart differ by 1 in logit.
POINT_SHARPNESS = 10.0
OFFSET_SCALE = 0.1  # per-hint offset from its anchor, cell units
DIRECT_SCALE = 0.25  # 'direct' mean head: mean = 0.5 + DIRECT_SCALE * linear(pooled)
OFFDIAG_SCALE = 0.1  # off-diagonal of the Cholesky factor, cell units
#: Temperature of the cosine hint -> object attention (and of the matching loss that trains it).
MATCH_TEMPERATURE = 0.05


@dataclass
class Gaussian2D:
    """A batch of 2-D Gaussians in cell units."""

    mean: torch.Tensor  # (B, 2)
    scale_tril: torch.Tensor  # (B, 2, 2) lower triangular, positive diagonal

    @property
    def covariance(self) -> torch.Tensor:
        """(B, 2, 2) symmetric positive definite, cell units squared."""
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    def to(self, device) -> "Gaussian2D":
        return Gaussian2D(self.mean.to(device), self.scale_tril.to(device))

    def detach(self) -> "Gaussian2D":
        return Gaussian2D(self.mean.detach(), self.scale_tril.detach())


class CrossAttentionBlock(nn.Module):
    """Hints attend to objects, then (``update_objects``) objects attend to the updated hints
    (pre-norm, residual, masks). The last block skips the object update: nothing reads it."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float, update_objects: bool = True) -> None:
        super().__init__()
        self.update_objects = update_objects
        self.norm_h1 = nn.LayerNorm(embed_dim)
        self.norm_o1 = nn.LayerNorm(embed_dim)
        self.hint_to_object = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_h2 = nn.LayerNorm(embed_dim)
        self.hint_ffn = mlp([embed_dim, 2 * embed_dim, embed_dim], dropout=dropout)
        if not update_objects:
            return
        self.norm_o2 = nn.LayerNorm(embed_dim)
        self.norm_h3 = nn.LayerNorm(embed_dim)
        self.object_to_hint = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_o3 = nn.LayerNorm(embed_dim)
        self.object_ffn = mlp([embed_dim, 2 * embed_dim, embed_dim], dropout=dropout)

    def forward(self, hints, hint_mask, objects, object_mask):
        """hints (B, H, D), hint_mask (B, H), objects (B, O, D), object_mask (B, O) -> same shapes."""
        hints = hints + attend(self.hint_to_object, self.norm_h1(hints), self.norm_o1(objects),
                               _safe_padding(object_mask))
        hints = hints + self.hint_ffn(self.norm_h2(hints))
        hints = hints * hint_mask.unsqueeze(-1).to(hints.dtype)
        if not self.update_objects:
            return hints, objects
        objects = objects + attend(self.object_to_hint, self.norm_o2(objects), self.norm_h3(hints),
                                   _safe_padding(hint_mask))
        objects = objects + self.object_ffn(self.norm_o3(objects))
        objects = objects * object_mask.unsqueeze(-1).to(objects.dtype)
        return hints, objects


def attend(mha: nn.MultiheadAttention, query: torch.Tensor, memory: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """``mha(query, memory, memory, key_padding_mask=ignore, need_weights=False)[0]`` (batch first).

    Outside training (or without attention dropout) the same projections and softmax attention
    are written out directly: cross-attention misses PyTorch's fused path, and its generic Python
    path costs more than the attention itself on a handful of tokens. ``ignore`` (B, S) bool, True =
    padding; no row may ignore every key (see :func:`_safe_padding`)."""
    if (mha.training and mha.dropout > 0) or mha.in_proj_weight is None or not mha.batch_first:
        return mha(query, memory, memory, key_padding_mask=ignore, need_weights=False)[0]
    E, heads = mha.embed_dim, mha.num_heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(query, weight[:E], None if bias is None else bias[:E])
    k, v = F.linear(memory, weight[E:], None if bias is None else bias[E:]).split(E, dim=-1)
    B, L, S = query.shape[0], query.shape[1], memory.shape[1]
    q = q.view(B, L, heads, E // heads).transpose(1, 2)
    k = k.view(B, S, heads, E // heads).transpose(1, 2)
    v = v.view(B, S, heads, E // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=~ignore[:, None, None, :])
    return mha.out_proj(out.transpose(1, 2).reshape(B, L, E))


def _safe_padding(mask: torch.Tensor) -> torch.Tensor:
    """key_padding_mask (True = ignore) from a real-entry mask; a row without any real entry
    attends to everything (its padded, zero tokens) instead of producing NaN."""
    empty = ~mask.any(dim=1, keepdim=True)
    return ~mask & ~empty


class HintObjectMatcher(nn.Module):
    """Which cell object each hint names: cosine of projected hint and object tokens / T."""

    def __init__(self, *, embed_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim)

    def vectors(self, hint_tokens: torch.Tensor, object_tokens: torch.Tensor):
        """(B, H, D), (B, O, D) -> L2-normalised (B, H, D), (B, O, D)."""
        return F.normalize(self.query(hint_tokens), dim=-1), F.normalize(self.key(object_tokens), dim=-1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
        """q (B, H, D), k (B, O, D), object_mask (B, O) -> (B, H, O) weights over real objects."""
        logits = torch.einsum("bhd,bod->bho", q, k) / MATCH_TEMPERATURE
        return masked_softmax(logits, object_mask.unsqueeze(1), dim=-1)


class AnchorMeanHead(nn.Module):
    """Per-hint anchors on objects' soft extreme points + offsets, weighted over hints -> (B, 2)."""

    def __init__(self, *, embed_dim: int) -> None:
        super().__init__()
        self.direction = nn.Linear(embed_dim, 2)
        self.offset = nn.Linear(embed_dim, 2)
        self.hint_score = nn.Linear(embed_dim, 1, bias=False)  # softmax over hints
        with torch.no_grad():  # start at the object centres (uniform point weights)
            self.direction.weight.zero_()
            self.direction.bias.zero_()

    def forward(self, hints, hint_mask, attention, xyz):
        """hints (B, H, D) after the cross-attention blocks; attention (B, H, O) from the matcher;
        xyz (B, O, P, 3) object points, cell units -> mean (B, 2), cell units."""
        points = xyz[..., :2]  # (B, O, P, 2)
        direction = self.direction(hints) * POINT_SHARPNESS  # (B, H, 2)
        point_logits = torch.einsum("bhc,bopc->bhop", direction, points)  # (B, H, O, P)
        point_weights = torch.softmax(point_logits, dim=-1)
        extremes = torch.einsum("bhop,bopc->bhoc", point_weights, points)  # (B, H, O, 2)
        anchors = torch.einsum("bho,bhoc->bhc", attention, extremes)  # (B, H, 2)
        positions = anchors + OFFSET_SCALE * self.offset(hints)  # (B, H, 2)
        weights = masked_softmax(self.hint_score(hints).squeeze(-1), hint_mask, dim=-1)  # (B, H)
        return torch.einsum("bh,bhc->bc", weights, positions)


@dataclass
class MapObjectTokens:
    """A fine model's object tokens of every cell of a map (they do not depend on the text), real
    object slots only, with the slots' points for the anchor head. Built once per map
    (:meth:`Localizer.set_map`), so a query runs the fine model's text and cross-attention parts
    alone."""

    tokens: torch.Tensor  # (R, D) the real slots of every cell, in cell order
    xyz: torch.Tensor  # (R, P, 3) their points, cell units
    start: torch.Tensor  # (N,) long: first row of each cell
    count: torch.Tensor  # (N,) long: real slots of each cell

    @staticmethod
    def from_batches(parts: list) -> "MapObjectTokens":
        """From (object tokens (B, O, D), CellBatch) pairs, in map order."""
        tokens, xyz, count = [], [], []
        for o, cells in parts:
            tokens.append(o[cells.mask])
            xyz.append(cells.xyz[cells.mask])
            count.append(cells.mask.sum(dim=1))
        count = torch.cat(count).long()
        start = torch.cumsum(count, 0) - count
        return MapObjectTokens(torch.cat(tokens), torch.cat(xyz), start, count)

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def gather(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cells (M,) long map indices -> object tokens (M, O, D), mask (M, O), xyz (M, O, P, 3),
        O the largest real-slot count among them (>= 1), zero at padding."""
        cells = cells.to(self.start.device)
        count = self.count[cells]
        width = max(int(count.max()), 1) if len(cells) else 1
        slot = torch.arange(width, device=cells.device)
        mask = slot[None, :] < count[:, None]  # (M, O)
        rows = torch.where(mask, self.start[cells, None] + slot[None, :], 0)
        if len(self.tokens) == 0:  # a map without a single object: nothing to gather
            return (self.tokens.new_zeros(len(cells), width, self.tokens.shape[-1]), mask,
                    self.xyz.new_zeros((len(cells), width) + tuple(self.xyz.shape[1:])))
        tokens = self.tokens[rows] * mask[..., None].to(self.tokens.dtype)
        xyz = self.xyz[rows] * mask[..., None, None].to(self.xyz.dtype)
        return tokens, mask, xyz


class FineModel(nn.Module):
    """Hints + one cell -> Gaussian2D position in the cell (see the module docstring)."""

    def __init__(
        self,
        *,
        text_dim: int,
        embed_dim: int,
        object_encoder: nn.Module,
        num_layers: int = 2,
        num_heads: int = 4,
        mean_head: str = "anchor",
        min_std: float = 0.005,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if mean_head not in ("anchor", "direct"):
            raise ValueError(f"mean_head must be 'anchor' or 'direct', got {mean_head!r}")
        self.min_std = min_std
        self.token_pool = AttentionPool(in_dim=text_dim, hidden_dim=embed_dim)
        self.hint_mlp = mlp([text_dim, embed_dim, embed_dim], dropout=dropout)
        self.object_encoder = object_encoder
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout,
                                update_objects=i < num_layers - 1)
            for i in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(embed_dim)
        self.pool = mlp([2 * embed_dim, embed_dim, embed_dim], dropout=dropout, final_activation=True)
        self.scale_head = nn.Linear(embed_dim, 3)
        start = math.log(math.expm1(max(INITIAL_STD - min_std, 1e-3)))  # softplus^-1
        with torch.no_grad():
            self.scale_head.weight.mul_(0.1)
            self.scale_head.bias.copy_(torch.tensor([start, start, 0.0]))
        self.mean_head_kind = mean_head
        if mean_head == "anchor":
            self.matcher = HintObjectMatcher(embed_dim=embed_dim)
            self.mean_head = AnchorMeanHead(embed_dim=embed_dim)
        else:
            self.mean_head = nn.Linear(embed_dim, 2)

    def encode_hints(self, hints: HintBatch) -> torch.Tensor:
        """Hint tokens (B, H, D), zero at padding; they depend on the text alone."""
        if not bool(hints.hint_mask.any(dim=1).all()):
            raise ValueError("every query needs at least one hint")
        h = self.hint_mlp(self.token_pool(hints.tokens, hints.token_mask))  # (B, H, D)
        return h * hints.hint_mask.unsqueeze(-1).to(h.dtype)

    def encode_objects(self, cells: CellBatch) -> torch.Tensor:
        """Object tokens (B, O, D), zero at padding; they depend on the cell alone (so a map's can
        be computed once, see :meth:`Localizer.set_map`)."""
        return self.object_encoder(cells)

    def predict(self, h: torch.Tensor, hint_mask: torch.Tensor, o: torch.Tensor, object_mask: torch.Tensor,
                xyz: torch.Tensor, with_matching: bool = False):
        """Hint tokens (B, H, D) + object tokens (B, O, D) of B (query, cell) pairs, with the
        cells' object points xyz (B, O, P, 3) -> (Gaussian2D, matching (B, B) or None).

        ``matching[i, j]`` scores query i's hints against cell j's objects with the anchor head's
        matcher (best object per hint, mean over hints), so a ranking loss at MATCH_TEMPERATURE on
        it (positives on the diagonal) teaches the head which object a hint names with the same
        weak supervision as the coarse object level; computed only ``with_matching`` and never
        for the 'direct' head.
        """
        matching = attention = None
        if self.mean_head_kind == "anchor":
            q, k = self.matcher.vectors(h, o)  # identity vectors, before the blocks mix tokens
            attention = self.matcher.attention(q, k, object_mask)  # (B, H, O)
            if with_matching:
                matching = set_level_similarity(q, hint_mask, k, object_mask)  # (B, B)
        for block in self.blocks:
            h, o = block(h, hint_mask, o, object_mask)
        h = self.final_norm(h)
        pooled = self.pool(torch.cat([masked_mean(h, hint_mask, 1), masked_max(h, hint_mask, 1)], dim=-1))
        raw = self.scale_head(pooled)  # (B, 3)
        diag = F.softplus(raw[:, :2]) + self.min_std  # (B, 2) standard-deviation-like, cell units
        zeros = torch.zeros_like(raw[:, 0])
        lower = torch.stack([OFFDIAG_SCALE * raw[:, 2], diag[:, 1]], dim=-1)
        scale_tril = torch.stack([torch.stack([diag[:, 0], zeros], dim=-1), lower], dim=-2)  # (B, 2, 2)
        if self.mean_head_kind == "anchor":
            mean = self.mean_head(h, hint_mask, attention, xyz)
        else:
            mean = 0.5 + DIRECT_SCALE * self.mean_head(pooled)  # starts near the cell centre
        return Gaussian2D(mean, scale_tril), matching

    def forward_with_matching(self, hints: HintBatch, cells: CellBatch):
        """-> (Gaussian2D, matching (B, B) or None); see :meth:`predict`."""
        assert len(hints) == len(cells), f"{len(hints)} queries for {len(cells)} cells"
        h = self.encode_hints(hints)
        return self.predict(h, hints.hint_mask, self.encode_objects(cells), cells.mask, cells.xyz, with_matching=True)

    def forward(self, hints: HintBatch, cells: CellBatch) -> Gaussian2D:
        """hints (B queries) + their cells (B) -> Gaussian2D, cell units."""
        assert len(hints) == len(cells), f"{len(hints)} queries for {len(cells)} cells"
        h = self.encode_hints(hints)
        return self.predict(h, hints.hint_mask, self.encode_objects(cells), cells.mask, cells.xyz)[0]
