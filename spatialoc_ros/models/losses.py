"""Training losses: ranking losses of the coarse stage, Gaussian losses of the fine stage.

Every function returns a scalar tensor; ``multi_level_ranking_loss`` returns a dict of named terms
with their sum under 'total'. Batches of the ranking losses are square: query i matches cell i.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spatialoc_ros.models.config import RANKING_LOSSES  # noqa: E402  (one source)
#: Lower clamp of the CCL negative weights (the seed's recipe).
CCL_WEIGHT_FLOOR = 0.8
_LOG_2PI = math.log(2.0 * math.pi)


def _check_square(sim: torch.Tensor) -> int:
    assert sim.dim() == 2 and sim.shape[0] == sim.shape[1], f"need a square (B, B) matrix, got {tuple(sim.shape)}"
    if sim.shape[0] < 2:
        raise ValueError("ranking losses need a batch of at least 2 query-cell pairs (no negatives otherwise)")
    return sim.shape[0]


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits, dim=1)) computed without cancellation, (B, N) -> (B, N).

    log(1 - p_ij) = logsumexp_{k != j} l_ik - logsumexp_k l_ik. For j other than the row's argmax
    the sum without j still contains exp(0) after max-shifting, so S - e_j >= 1 is exact enough; for
    the argmax itself the row is recomputed with that entry removed.
    """
    top, arg = logits.max(dim=1, keepdim=True)
    shifted = torch.exp(logits - top)  # (B, N), max entry = 1
    total = shifted.sum(dim=1, keepdim=True)
    others = torch.log((total - shifted).clamp_min(torch.finfo(logits.dtype).tiny)) + top
    without_max = logits.scatter(1, arg, float("-inf")).logsumexp(dim=1, keepdim=True)
    is_max = torch.zeros_like(logits, dtype=torch.bool).scatter(1, arg, True)
    others = torch.where(is_max, without_max.expand_as(logits), others)
    return others - logits.logsumexp(dim=1, keepdim=True)


def ccl_weights(text_emb: torch.Tensor, cell_emb: torch.Tensor, alpha: float) -> torch.Tensor:
    """w_ij = clamp((1 - d_ij / d_max) ** (1 / alpha), 0.8, 1), d_ij = |t_i - c_j| of the
    L2-normalised embeddings, d_max = the largest d over the batch. (B, B), no gradient."""
    with torch.no_grad():
        t = F.normalize(text_emb, dim=-1)
        c = F.normalize(cell_emb, dim=-1)
        dist = torch.cdist(t, c)  # (B, B)
        ratio = dist / dist.max().clamp_min(1e-12)
        weights = (1.0 - ratio).clamp_min(0.0).pow(1.0 / alpha)
        return weights.clamp(CCL_WEIGHT_FLOOR, 1.0)


def ccl_loss(
    sim: torch.Tensor,
    text_emb: torch.Tensor,
    cell_emb: torch.Tensor,
    temperature: float = 0.05,
    alpha: float = 2.0,
    positive_term: bool = True,
) -> torch.Tensor:
    """Complementary contrastive loss (CCL), both directions.

    sim (B, B): similarity of query i and cell j (positives on the diagonal); text_emb (B, D),
    cell_emb (B, D): the vectors whose distances weight the negatives (see :func:`ccl_weights`).
    With p = softmax(sim / T) along rows (text -> cell) and along columns (cell -> text):

        loss_dir = mean_i [ -log p_ii + sum_{j != i} -log(1 - p_ij) * w_ij ]
        loss     = loss_text->cell + loss_cell->text      (the cell->text weights are w transposed)

    The -log p_ii pull term is this project's choice (``positive_term=False`` gives the released
    complementary-only form, whose only pull is the implicit one through the softmax
    normalisation). The weights are constants: no gradient flows through the distances.
    """
    _check_square(sim)
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    weights = ccl_weights(text_emb, cell_emb, alpha).to(sim.dtype)  # (B, B)
    total = sim.new_zeros(())
    for logits, w in ((sim / temperature, weights), (sim.T / temperature, weights.T)):
        negatives = torch.where(eye, torch.zeros_like(logits), -log_one_minus_softmax(logits) * w)
        row = negatives.sum(dim=1)
        if positive_term:
            row = row - torch.diagonal(torch.log_softmax(logits, dim=1))
        total = total + row.mean()
    return total


def info_nce_loss(sim: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Symmetric InfoNCE: CE(sim / T, diag) over rows + CE(sim^T / T, diag) over rows (each a
    mean over the batch). sim (B, B) -> scalar; info_nce_loss(S) == info_nce_loss(S.T)."""
    B = _check_square(sim)
    target = torch.arange(B, device=sim.device)
    return F.cross_entropy(sim / temperature, target) + F.cross_entropy(sim.T / temperature, target)


def ranking_loss(kind: str, sim, text_emb, cell_emb, temperature: float, alpha: float) -> torch.Tensor:
    """Dispatch on ``kind`` ('CCL' | 'contrastive')."""
    if kind == "CCL":
        return ccl_loss(sim, text_emb, cell_emb, temperature=temperature, alpha=alpha)
    if kind == "contrastive":
        return info_nce_loss(sim, temperature=temperature)
    raise ValueError(f"unknown ranking loss {kind!r}; choose from {RANKING_LOSSES}")


def multi_level_ranking_loss(sims: dict, summaries: dict, kind: str, temperature: float, alpha: float) -> dict:
    """One ranking loss per similarity level, summed under 'total'.

    sims: {level: (B, B)} from ``CoarseModel.similarity``; summaries: {level: (text (B, D),
    cells (B, D))} from ``CoarseModel.level_summaries`` (only CCL uses them).
    """
    terms = {
        level: ranking_loss(kind, s, *summaries[level], temperature=temperature, alpha=alpha)
        for level, s in sims.items()
    }
    terms["total"] = sum(terms.values())
    return terms


def gaussian_nll(
    mean: torch.Tensor,
    scale_tril: torch.Tensor,
    target: torch.Tensor,
    beta: float = 0.0,
    include_constant: bool = True,
) -> torch.Tensor:
    """Negative log-likelihood of ``target`` under N(mean, L L^T), averaged over the batch.

    mean (B, 2), scale_tril L (B, 2, 2) lower triangular with positive diagonal, target (B, 2);
    all in cell units. Per sample

        nll = 0.5 (x - mu)^T Sigma^-1 (x - mu) + 0.5 log det Sigma  [+ log(2 pi) when
              include_constant: the full 2-D density, in nats; it does not change gradients]

    beta-NLL (Seitzer et al. 2022) for a full covariance: each sample's nll is multiplied by the
    constant (no gradient) det(Sigma)^(beta / 2), the geometric mean of the two variances raised to
    beta; beta = 0 is the plain NLL, beta = 1 weights like an MSE on the mean.
    """
    assert mean.shape == target.shape and mean.shape[-1] == 2, f"mean {tuple(mean.shape)}, target {tuple(target.shape)}"
    assert scale_tril.shape == (*mean.shape, 2), f"scale_tril must be (B, 2, 2), got {tuple(scale_tril.shape)}"
    residual = (target - mean).unsqueeze(-1)  # (B, 2, 1)
    whitened = torch.linalg.solve_triangular(scale_tril, residual, upper=False)  # L^-1 (x - mu)
    mahalanobis = whitened.square().sum(dim=(-2, -1))  # (B,)
    log_det = 2.0 * torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)).sum(dim=-1)  # (B,)
    nll = 0.5 * mahalanobis + 0.5 * log_det
    if include_constant:
        nll = nll + _LOG_2PI
    if beta > 0:
        nll = nll * torch.exp(0.5 * beta * log_det).detach()
    return nll.mean()


def fine_matching_loss(matching: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on FineModel's (B, B) hint->object matching similarity (positives on the
    diagonal) at the matcher's temperature. Duplicate cells in a batch act as false negatives."""
    from spatialoc_ros.models.ugfl import MATCH_TEMPERATURE

    return info_nce_loss(matching, temperature=MATCH_TEMPERATURE)


def mse_loss(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the batch and both coordinates: mean((mu - x)^2), cell units^2."""
    assert mean.shape == target.shape, f"mean {tuple(mean.shape)} vs target {tuple(target.shape)}"
    return F.mse_loss(mean, target)
