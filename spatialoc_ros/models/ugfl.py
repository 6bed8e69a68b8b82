"""Fine stage: UGFL, Uncertainty aware Gaussian Fine Localizer.

Given a query (hint token features) and one cell, predict the position inside the cell as a 2-D
Gaussian in cell units (x, y in [0, 1] across the cell):

    hint tokens   (B, H, D): attention pooling over each hint's tokens + MLP
    object tokens (B, O, D): an ObjectEncoder of its own (not shared with the coarse model)
    ``num_layers`` cross-attention blocks (pre-norm, residual): hints attend to objects, then
        objects attend to the updated hints, each followed by a feed-forward layer
    pooled = MLP(masked mean ++ masked max of the hints)
    covariance: Linear(pooled) -> (a, b, c); scale_tril = [[softplus(a) + min_std, 0],
                                                          [c, softplus(b) + min_std]]
    mean ('anchor', default): every hint attends (one head) over the cell's real objects, its
        anchor is the attention-weighted object centre (x, y) and it adds a learned offset (the
        "east of" part); a softmax over hints weights the per-hint positions.
    mean ('direct'): Linear(pooled) -> (x, y), initialised at the cell centre.
No sigmoid on the mean: positions just outside the cell stay representable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.layers import AttentionPool, masked_max, masked_mean, masked_softmax, mlp
from spatialoc_ros.models.text_encoder import HintBatch

#: Standard deviation (cell units) the covariance head starts from.
INITIAL_STD = 0.15


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
    """Hints attend to objects, then objects attend to hints (pre-norm, residual, masks)."""

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_h1 = nn.LayerNorm(embed_dim)
        self.norm_o1 = nn.LayerNorm(embed_dim)
        self.hint_to_object = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_h2 = nn.LayerNorm(embed_dim)
        self.hint_ffn = mlp([embed_dim, 2 * embed_dim, embed_dim], dropout=dropout)
        self.norm_o2 = nn.LayerNorm(embed_dim)
        self.norm_h3 = nn.LayerNorm(embed_dim)
        self.object_to_hint = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_o3 = nn.LayerNorm(embed_dim)
        self.object_ffn = mlp([embed_dim, 2 * embed_dim, embed_dim], dropout=dropout)

    def forward(self, hints, hint_mask, objects, object_mask):
        """hints (B, H, D), hint_mask (B, H), objects (B, O, D), object_mask (B, O) -> same shapes."""
        o = self.norm_o1(objects)
        hints = hints + self.hint_to_object(
            self.norm_h1(hints), o, o, key_padding_mask=_safe_padding(object_mask), need_weights=False
        )[0]
        hints = hints + self.hint_ffn(self.norm_h2(hints))
        hints = hints * hint_mask.unsqueeze(-1).to(hints.dtype)
        h = self.norm_h3(hints)
        objects = objects + self.object_to_hint(
            self.norm_o2(objects), h, h, key_padding_mask=_safe_padding(hint_mask), need_weights=False
        )[0]
        objects = objects + self.object_ffn(self.norm_o3(objects))
        objects = objects * object_mask.unsqueeze(-1).to(objects.dtype)
        return hints, objects


def _safe_padding(mask: torch.Tensor) -> torch.Tensor:
    """key_padding_mask (True = ignore) from a real-entry mask; a row without any real entry
    attends to everything (its padded, zero tokens) instead of producing NaN."""
    empty = ~mask.any(dim=1, keepdim=True)
    return ~mask & ~empty


class AnchorMeanHead(nn.Module):
    """Per-hint anchors on object centres + offsets, weighted over hints -> mean (B, 2)."""

    def __init__(self, *, embed_dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key = nn.Linear(embed_dim, embed_dim, bias=False)  # a key bias cancels in the softmax
        self.offset = nn.Linear(embed_dim, 2)
        self.hint_score = nn.Linear(embed_dim, 1, bias=False)  # softmax over hints
        self.scale = 1.0 / math.sqrt(embed_dim)

    def forward(self, hints, hint_mask, objects, object_mask, centers):
        """hints (B, H, D), objects (B, O, D), centers (B, O, 3) cell units -> (B, 2)."""
        logits = torch.einsum("bhd,bod->bho", self.query(hints), self.key(objects)) * self.scale
        attention = masked_softmax(logits, object_mask.unsqueeze(1), dim=-1)  # (B, H, O)
        anchors = attention @ centers[..., :2]  # (B, H, 2)
        positions = anchors + self.offset(hints)  # (B, H, 2)
        weights = masked_softmax(self.hint_score(hints).squeeze(-1), hint_mask, dim=-1)  # (B, H)
        return torch.einsum("bh,bhc->bc", weights, positions)


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
            CrossAttentionBlock(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout)
            for _ in range(num_layers)
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
            self.mean_head = AnchorMeanHead(embed_dim=embed_dim)
        else:
            self.mean_head = nn.Linear(embed_dim, 2)
            with torch.no_grad():
                self.mean_head.bias.fill_(0.5)

    def forward(self, hints: HintBatch, cells: CellBatch) -> Gaussian2D:
        if not bool(hints.hint_mask.any(dim=1).all()):
            raise ValueError("every query needs at least one hint")
        assert len(hints) == len(cells), f"{len(hints)} queries for {len(cells)} cells"
        hint_mask, object_mask = hints.hint_mask, cells.mask
        h = self.hint_mlp(self.token_pool(hints.tokens, hints.token_mask))  # (B, H, D)
        h = h * hint_mask.unsqueeze(-1).to(h.dtype)
        o = self.object_encoder(cells)  # (B, O, D)
        for block in self.blocks:
            h, o = block(h, hint_mask, o, object_mask)
        h = self.final_norm(h)
        pooled = self.pool(torch.cat([masked_mean(h, hint_mask, 1), masked_max(h, hint_mask, 1)], dim=-1))
        raw = self.scale_head(pooled)  # (B, 3)
        diag = F.softplus(raw[:, :2]) + self.min_std  # (B, 2) standard-deviation-like, cell units
        zeros = torch.zeros_like(raw[:, 0])
        scale_tril = torch.stack(
            [torch.stack([diag[:, 0], zeros], dim=-1), torch.stack([raw[:, 2], diag[:, 1]], dim=-1)], dim=-2
        )  # (B, 2, 2)
        if self.mean_head_kind == "anchor":
            mean = self.mean_head(h, hint_mask, o, object_mask, cells.center)
        else:
            mean = self.mean_head(pooled)
        return Gaussian2D(mean, scale_tril)
