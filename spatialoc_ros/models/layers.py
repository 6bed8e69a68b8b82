"""Small building blocks shared by the model modules (MLPs and masked reductions).

Masks are bool tensors, True = real entry. Every masked reduction returns zeros (not NaN) for a
row without any real entry, so fully padded rows never poison a batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Written in place of masked logits; exp() of it is exactly 0 in float32 and float16.
_MASKED_LOGIT = -1e4
#: Written for padded items before the max over items: below any cosine similarity.
_NO_ITEM_SCORE = -2.0
#: Upper bound on the number of float scores held at once by set_level_similarity.
SCORE_CHUNK_ELEMENTS = 1 << 24


def mlp(dims: list[int], dropout: float = 0.0, final_activation: bool = False) -> nn.Sequential:
    """Linear layers of widths ``dims`` with ReLU (and dropout) between them.

    No BatchNorm on purpose: batch statistics would let padded objects of one cell change the
    features of another.
    """
    assert len(dims) >= 2, "an MLP needs at least an input and an output width"
    layers: list[nn.Module] = []
    for i in range(1, len(dims)):
        layers.append(nn.Linear(dims[i - 1], dims[i]))
        if i < len(dims) - 1 or final_activation:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` that gives weight 0 to masked entries; all-masked rows give zeros.

    ``logits`` and ``mask`` broadcast together; the result has the broadcast shape.
    """
    mask = mask.expand_as(logits) if mask.shape != logits.shape else mask
    weights = torch.softmax(logits.masked_fill(~mask, _MASKED_LOGIT), dim=dim)
    return weights * mask.to(weights.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` (..., N, D) over ``dim`` (the N axis) counting only ``mask`` (..., N) entries."""
    m = mask.to(x.dtype).unsqueeze(-1)
    total = (x * m).sum(dim=dim)
    count = m.sum(dim=dim).clamp_min(1.0)
    return total / count


def masked_max(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``x`` (..., N, D) over ``dim`` (the N axis) among ``mask`` (..., N) entries; 0 if none."""
    m = mask.unsqueeze(-1)
    filled = x.masked_fill(~m, float("-inf"))
    best = filled.max(dim=dim).values
    any_valid = m.any(dim=dim)
    return torch.where(any_valid, best, torch.zeros_like(best))


class AttentionPool(nn.Module):
    """Learned attention pooling of a set of vectors into one.

    score_n = w^T tanh(W x_n); weights = masked softmax over n; out = sum_n weight_n x_n.
    """

    def __init__(self, *, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        # No bias on the last layer: a softmax ignores a shift shared by all entries.
        self.score = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1, bias=False))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (..., N, D), mask: (..., N) bool -> (..., D)."""
        logits = self.score(x).squeeze(-1)  # (..., N)
        weights = masked_softmax(logits, mask, dim=-1)  # (..., N)
        return torch.einsum("...n,...nd->...d", weights, x)


class MaskedBatchNorm(nn.Module):
    """BatchNorm without affine parameters over the last axis, using only real entries.

    x: (..., D), mask: (...) bool or None -> (..., D), zero at masked entries. In training the
    statistics come from the real entries of the batch (padding never contributes); in eval mode
    the running statistics are used, so each sample is normalised on its own. Placed before an
    L2 normalisation it removes the direction that all embeddings share at initialisation (with it,
    similarities start spread out instead of all close to 1 and ranking losses learn at once).
    """

    def __init__(self, dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, momentum=momentum)

    def _normalise(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, D); a training batch with a single row falls back to the running statistics."""
        if self.training and rows.shape[0] < 2:
            n = self.norm
            return F.batch_norm(rows, n.running_mean, n.running_var, training=False, eps=n.eps)
        return self.norm(rows)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self._normalise(x.reshape(-1, x.shape[-1])).view_as(x)
        out = x.new_zeros(x.shape)
        out[mask] = self._normalise(x[mask])
        return out


def packed_set_similarity(
    queries: torch.Tensor, query_mask: torch.Tensor, rows: torch.Tensor, row_item: torch.Tensor, num_sets: int
) -> torch.Tensor:
    """:func:`set_level_similarity` against sets given by their real items alone.

    rows (R, D): the real items of all sets, row_item (R,) long: the set of each row, num_sets: Bc
    -> (Bt, Bc), the same values: one plain matmul over the real rows (no padding read or
    multiplied) and a scatter max per set. A set without rows scores ``_NO_ITEM_SCORE``.
    """
    Bt, H, D = queries.shape
    flat_queries = queries.reshape(Bt * H, D).T  # (D, Bt*H)
    weights = query_mask.to(queries.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    best = torch.full((num_sets, Bt * H), _NO_ITEM_SCORE, dtype=queries.dtype, device=queries.device)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, Bt * H))
    for start in range(0, rows.shape[0], chunk):
        scores = rows[start:start + chunk] @ flat_queries  # (r, Bt*H); cosines >= -1 > _NO_ITEM_SCORE
        index = row_item[start:start + chunk, None].expand_as(scores)
        best.scatter_reduce_(0, index, scores, "amax", include_self=True)
    return torch.einsum("cth,th->tc", best.view(num_sets, Bt, H), weights)


def set_level_similarity(
    queries: torch.Tensor, query_mask: torch.Tensor, items: torch.Tensor, item_mask: torch.Tensor
) -> torch.Tensor:
    """Best-match set similarity, chunked over cells.

    queries (Bt, H, D), query_mask (Bt, H), items (Bc, O, D), item_mask (Bc, O) -> (Bt, Bc):
    for every real query vector the best dot product over the real items, averaged over the real
    query vectors. A cell without real items scores ``_NO_ITEM_SCORE``.
    """
    Bt, H, D = queries.shape
    Bc, O, _ = items.shape
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, Bt * H * O))
    flat_queries = queries.reshape(Bt * H, D).T  # (D, Bt*H)
    weights = query_mask.to(queries.dtype)  # (Bt, H)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    out = []
    for start in range(0, Bc, chunk):
        part, part_mask = items[start:start + chunk], item_mask[start:start + chunk]
        n = part.shape[0]
        # one plain matmul (the fastest form on CPU): (n*O, D) @ (D, Bt*H)
        scores = (part.reshape(n * O, D) @ flat_queries).view(n, O, Bt, H)
        scores = scores.masked_fill(~part_mask[:, :, None, None], _NO_ITEM_SCORE)
        best = scores.max(dim=1).values  # (n, Bt, H)
        out.append(torch.einsum("cth,th->tc", best, weights))
    return torch.cat(out, dim=1)
