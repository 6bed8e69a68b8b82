"""BEOSE: Bezier Enhanced Object Spatial Encoder (instance-level relations of a cell's objects).

Reading chosen: the GEOMETRIC one. For every ordered pair (i, j) of real objects of a cell the
relation is a quadratic Bezier curve in the cell, expressed in object i's frame:

    P0 = 0 (centre of i),  P2 = c_j - c_i (centre of j),
    P1 = (P2 / 2) + (|P2| / 2) * tanh(W r_ij)       (learned control point, bent by the pair feature)
    B(t) = (1 - t)^2 P0 + 2 (1 - t) t P1 + t^2 P2,  sampled at K fixed t in (0, 1)

The K sampled points (3K numbers, cell units) are encoded by a linear layer and update the pair
feature r_ij (the tanh of the update below is the non-linearity). The bend is bounded by half the
chord per axis, so the curve always stays near the segment between the two objects; what the
network learns is *how* to bend it given what the two objects are (r_ij carries both object
tokens), i.e. a learned, object-conditioned encoding of the offset.
Why this reading and not the released feature-space one (P0 = P2 = pair feature, P1 a learned
projection): with P0 = P2 the feature-space curve reduces to x + 2t(1-t)(P1(x) - x), a gated
residual layer with no geometry; the geometric curve keeps the spatial meaning the paper describes.

Per layer l (``num_layers`` of them):
    r_ij <- LayerNorm(r_ij + tanh(K_l [B_ij(t_1..t_K)] + U_l r_ij + A_l x_i + C_l x_j))
    w_ij  = softmax_j( s_l(r_ij) - |c_j - c_i|^2 / (2 sigma_l^2) ) over real j != i
            (attention logit plus a log-Gaussian of the distance, i.e. attention x Gaussian weight)
    g_i   = sum_j w_ij r_ij                         (relations pooled into object i)
    x_i  <- LayerNorm(x_i + V_l g_i)                 (objects enriched by their relations)
Outputs: the enriched objects and a per-object relation descriptor (projection of the last g_i).

Masks: pairs with a padded object never enter the pooling and padded slots are reset to zero
after every layer, so nothing about padding reaches a real object.
Cost: O(B * O^2 * rel_dim) per layer; keep ``rel_dim`` small (64) since O = 28 gives 784 pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from spatialoc_ros.models.layers import masked_softmax, mlp

#: Initial width (cell units) of the Gaussian distance weighting of every layer.
INITIAL_SIGMA = 0.3
#: Object pairs per chunk of cells without autograd (pair tensors of a few MB).
NO_GRAD_CHUNK_PAIRS = 8192


def _pair_sum(per_i: torch.Tensor, per_j: torch.Tensor) -> torch.Tensor:
    """(B, O, R) terms of object i and of object j -> (B, O, O, R) their sum for every pair (i, j)."""
    return per_i.unsqueeze(2) + per_j.unsqueeze(1)


def _accumulate_linear(out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out += inputs @ weight.T`` in place, one matrix product writing straight into ``out``
    (..., R); inputs (..., K), weight (R, K). -> out."""
    R = out.shape[-1]
    out.view(-1, R).addmm_(inputs.reshape(-1, inputs.shape[-1]), weight.t())
    return out


class BezierRelationLayer(nn.Module):
    """One BEOSE layer: Bezier curve encoding, pair update, relation pooling, object update."""

    def __init__(self, *, embed_dim: int, rel_dim: int, num_samples: int, dropout: float) -> None:
        super().__init__()
        self.control = nn.Linear(rel_dim, 3)
        self.curve = nn.Linear(3 * num_samples, rel_dim)
        self.pair_self = nn.Linear(rel_dim, rel_dim, bias=False)
        self.from_i = nn.Linear(embed_dim, rel_dim)
        self.from_j = nn.Linear(embed_dim, rel_dim, bias=False)
        self.pair_norm = nn.LayerNorm(rel_dim)
        self.score = nn.Linear(rel_dim, 1, bias=False)  # softmax over j: a bias would cancel
        self.log_sigma = nn.Parameter(torch.tensor(math.log(INITIAL_SIGMA)))
        self.to_object = nn.Sequential(nn.Dropout(dropout), nn.Linear(rel_dim, embed_dim))
        self.object_norm = nn.LayerNorm(embed_dim)
        # t_k evenly spaced strictly inside (0, 1): the end points are the two centres themselves.
        t = torch.arange(1, num_samples + 1, dtype=torch.float32) / (num_samples + 1)
        self.register_buffer("t", t, persistent=False)

    def curve_points(self, pair: torch.Tensor, offset: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Sample the pair curves.

        pair: (B, O, O, R) features; offset: (B, O, O, 3) c_j - c_i; length: (B, O, O, 1) |offset|
        -> (B, O, O, K, 3) points of B(t_k) in object i's frame, cell units.
        """
        control = 0.5 * offset + 0.5 * length * torch.tanh(self.control(pair))  # (B, O, O, 3)
        t = self.t.to(pair.dtype).view(-1, 1)  # (K, 1)
        return (2 * (1 - t) * t) * control.unsqueeze(-2) + (t * t) * offset.unsqueeze(-2)

    def pair_update_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair update's linear part as one Linear on [r_ij, |P2| tanh(W r_ij), P2] (R + 6 inputs).

        ``curve(B(t_1..t_K))`` is linear in the sampled points, which are linear in the control
        point and P2, and the control point is ``P2 / 2 + (|P2| / 2) tanh(W r_ij)``; so
        ``curve(...) + pair_self(r_ij) = [pair_self | A / 2 | A / 2 + C] [r_ij, |P2| tanh, P2] + b``
        with ``A = sum_k 2 (1 - t_k) t_k W_k`` and ``C = sum_k t_k^2 W_k`` (``W_k``: the curve
        weight's columns of sample k). -> (weight (R, R + 6), bias (R,)).
        """
        t = self.t.to(self.curve.weight.dtype)
        per_sample = self.curve.weight.view(-1, t.numel(), 3)  # (R, K, 3), W_k = [:, k]
        to_control = torch.einsum("k,rkc->rc", 2 * (1 - t) * t, per_sample)  # A
        to_end = torch.einsum("k,rkc->rc", t * t, per_sample)  # C
        weight = torch.cat([self.pair_self.weight, 0.5 * to_control, 0.5 * to_control + to_end], dim=1)
        return weight, self.curve.bias

    def forward(self, x, pair, offset, length, pair_mask, object_mask):
        """x: (B, O, D); pair: (B, O, O, R); offset (B, O, O, 3); length (B, O, O, 1);
        pair_mask (B, O, O) bool (both real, i != j); object_mask (B, O) bool
        -> (x (B, O, D), pair (B, O, O, R), pooled (B, O, R))."""
        # curve(B(t_1..t_K)) + pair_self(pair) (see curve_points) as one Linear, accumulated onto
        # the object terms (the Linear's bias folded into those of object i)
        bend = length * torch.tanh(self.control(pair))  # (B, O, O, 3)
        weight, bias = self.pair_update_weights()
        update = _pair_sum(self.from_i(x) + bias, self.from_j(x))  # (B, O, O, R)
        update = _accumulate_linear(update, torch.cat([pair, bend, offset], dim=-1), weight).tanh_()
        # pair + tanh(update): in place where no gradient needs tanh's output
        pair = self.pair_norm(pair + update if torch.is_grad_enabled() else update.add_(pair))  # (B, O, O, R)

        sigma = self.log_sigma.exp()
        logits = self.score(pair).squeeze(-1) - length.squeeze(-1).square() / (2 * sigma * sigma)
        weights = masked_softmax(logits, pair_mask, dim=-1)  # (B, O, O) over j
        pooled = torch.einsum("bij,bijr->bir", weights, pair)  # (B, O, R)

        x = self.object_norm(x + self.to_object(pooled))
        keep = object_mask.unsqueeze(-1).to(x.dtype)
        return x * keep, pair, pooled * keep


class BEOSE(nn.Module):
    """Objects (B, O, D) + centres (B, O, 3) -> (enriched objects (B, O, D), relations (B, O, D))."""

    def __init__(
        self,
        *,
        embed_dim: int,
        rel_dim: int = 64,
        num_layers: int = 3,
        num_samples: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.geometry = mlp([4, rel_dim, rel_dim])  # (offset, distance) -> initial pair feature
        self.init_i = nn.Linear(embed_dim, rel_dim)
        self.init_j = nn.Linear(embed_dim, rel_dim, bias=False)
        self.layers = nn.ModuleList(
            BezierRelationLayer(embed_dim=embed_dim, rel_dim=rel_dim, num_samples=num_samples, dropout=dropout)
            for _ in range(num_layers)
        )
        self.relation_out = nn.Linear(rel_dim, embed_dim, bias=False)  # no neighbours -> zero

    def forward(self, x: torch.Tensor, center: torch.Tensor, mask: torch.Tensor):
        """x: (B, O, D) object tokens; center: (B, O, 3) cell units; mask: (B, O) bool
        -> (objects (B, O, D), relations (B, O, D)), both zero at padded slots.

        Cells are independent: without autograd they go through in chunks of about
        ``NO_GRAD_CHUNK_PAIRS`` pairs, so that the pair tensors stay in the CPU's cache."""
        B, O = mask.shape
        step = max(1, NO_GRAD_CHUNK_PAIRS // max(O * O, 1))
        if B > step and not torch.is_grad_enabled():
            parts = [self._cells(x[s:s + step], center[s:s + step], mask[s:s + step]) for s in range(0, B, step)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._cells(x, center, mask)

    def _cells(self, x: torch.Tensor, center: torch.Tensor, mask: torch.Tensor):
        num_objects = x.shape[1]
        offset = center.unsqueeze(1) - center.unsqueeze(2)  # (B, O, O, 3): c_j - c_i
        length = offset.norm(dim=-1, keepdim=True)  # (B, O, O, 1)
        not_self = ~torch.eye(num_objects, dtype=torch.bool, device=x.device)
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1) & not_self  # (B, O, O)

        keep = mask.unsqueeze(-1).to(x.dtype)
        x = x * keep
        # geometry(offset, length) + init_i(x_i) + init_j(x_j), the geometry's last Linear accumulated
        # onto the object terms (its bias folded into those of object i)
        last = self.geometry[-1]
        pair = _pair_sum(self.init_i(x) + last.bias, self.init_j(x))  # (B, O, O, R)
        pair = _accumulate_linear(pair, self.geometry[:-1](torch.cat([offset, length], dim=-1)), last.weight)
        pooled = x.new_zeros(x.shape[0], num_objects, pair.shape[-1])
        for layer in self.layers:
            x, pair, pooled = layer(x, pair, offset, length, pair_mask, mask)
        relations = self.relation_out(pooled) * keep  # (B, O, D)
        return x, relations
