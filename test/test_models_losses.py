"""Losses against values computed independently with numpy (literals below come from numpy)."""
import math

import numpy as np
import pytest
import torch

from spatialoc_ros.models.losses import (
    ccl_loss,
    ccl_weights,
    gaussian_nll,
    info_nce_loss,
    log_one_minus_softmax,
    mse_loss,
    multi_level_ranking_loss,
)

torch.set_num_threads(1)


def ccl_numpy(S, t, c, T, alpha, positive=True):
    """Loop-by-loop reference of the CCL definition (both directions, mean over the batch)."""
    B = len(S)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    d = np.array([[np.linalg.norm(tn[i] - cn[j]) for j in range(B)] for i in range(B)])
    w = np.clip((1 - d / d.max()) ** (1 / alpha), 0.8, 1.0)
    total = 0.0
    for direction in (S, S.T):
        p = np.exp(direction / T)
        p = p / p.sum(axis=1, keepdims=True)
        ww = w if direction is S else w.T
        rows = []
        for i in range(B):
            row = -np.log(p[i, i]) if positive else 0.0
            row += sum(-np.log(1 - p[i, j]) * ww[i, j] for j in range(B) if j != i)
            rows.append(row)
        total += np.mean(rows)
    return total


S2 = np.array([[0.9, 0.1], [0.3, 0.8]])
T2 = np.array([[1.0, 0.0], [0.0, 1.0]])
C2 = np.array([[1.0, 1.0], [0.0, 2.0]])
S3 = np.array([[0.8, 0.2, -0.1], [0.4, 0.6, 0.0], [0.1, 0.5, 0.7]])
T3 = np.eye(3)
C3 = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.0], [0.5, 0.5, 1.0]])


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def test_ccl_2x2_by_hand():
    loss = ccl_loss(t64(S2), t64(T2), t64(C2), temperature=0.5, alpha=2.0)
    assert loss.item() == pytest.approx(0.8827760750967393, rel=1e-9)
    loss = ccl_loss(t64(S2), t64(T2), t64(C2), temperature=0.5, alpha=2.0, positive_term=False)
    assert loss.item() == pytest.approx(0.39234492226521755, rel=1e-9)


def test_ccl_3x3_by_hand_with_unclamped_weights():
    w = ccl_weights(t64(T3), t64(C3), alpha=2.0)
    expected_w = np.array([[0.9277105, 0.8, 0.8], [0.8, 0.89142448, 0.8], [0.8, 0.8, 0.8]])
    assert np.allclose(w.numpy(), expected_w, atol=1e-6)
    loss = ccl_loss(t64(S3), t64(T3), t64(C3), temperature=0.1, alpha=2.0)
    assert loss.item() == pytest.approx(0.3631476775340597, rel=1e-6)
    loss = ccl_loss(t64(S3), t64(T3), t64(C3), temperature=0.1, alpha=2.0, positive_term=False)
    assert loss.item() == pytest.approx(0.1605907387570473, rel=1e-6)


def test_ccl_matches_numpy_reference_on_random_batch():
    rng = np.random.default_rng(0)
    t, c = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    S = np.clip(rng.normal(size=(6, 6)) * 0.4, -1, 1)
    for positive in (True, False):
        got = ccl_loss(t64(S), t64(t), t64(c), temperature=0.05, alpha=2.0, positive_term=positive).item()
        assert got == pytest.approx(ccl_numpy(S, t, c, 0.05, 2.0, positive), rel=1e-7)


def test_ccl_pulls_positives_and_weights_have_no_gradient():
    torch.manual_seed(0)
    t = torch.randn(4, 8, requires_grad=True)
    c = torch.randn(4, 8, requires_grad=True)
    assert not ccl_weights(t, c, alpha=2.0).requires_grad
    sim = torch.nn.functional.normalize(t.detach(), dim=-1) @ torch.nn.functional.normalize(c.detach(), dim=-1).T
    sim.requires_grad_()
    ccl_loss(sim, t, c).backward()
    assert t.grad is None and c.grad is None  # the distance weights are constants
    assert (torch.diagonal(sim.grad) < 0).all()  # raising a positive lowers the loss
    for positive in (True, False):  # also without the explicit pull term (implicit via softmax)
        s = sim.detach().clone().requires_grad_()
        ccl_loss(s, t, c, positive_term=positive).backward()
        assert (torch.diagonal(s.grad) < 0).all()


def test_log_one_minus_softmax_is_stable():
    logits = torch.tensor([[200.0, 0.0, -3.0], [5.0, 5.0, 5.0], [0.0, 1e-3, 60.0]], dtype=torch.float32,
                          requires_grad=True)
    got = log_one_minus_softmax(logits)
    x = logits.detach().double().numpy()
    ref = np.array([[np.logaddexp.reduce(np.delete(row, j)) - np.logaddexp.reduce(row) for j in range(3)]
                    for row in x])  # log(1 - p_j) = logsumexp without j - logsumexp
    assert np.allclose(got.detach().double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert got[0, 0].item() == pytest.approx(-200.0 + math.log(1 + math.exp(-3)), rel=1e-5)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # a confidently wrong negative (p ~ 1) still gets a useful gradient from the CCL
    sim = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    ccl_loss(sim, torch.eye(2), torch.eye(2), temperature=0.01).backward()
    assert torch.isfinite(sim.grad).all() and sim.grad[0, 1] > 1.0


def test_info_nce_by_hand_and_symmetric():
    assert info_nce_loss(t64(S3), temperature=0.1).item() == pytest.approx(0.20255693877701245, rel=1e-9)
    S = torch.randn(5, 5)
    assert info_nce_loss(S, 0.07).item() == pytest.approx(info_nce_loss(S.T, 0.07).item(), rel=1e-6)


def test_ranking_losses_need_negatives():
    with pytest.raises(ValueError, match="at least 2"):
        info_nce_loss(torch.ones(1, 1))


def test_multi_level_ranking_loss_sums_terms():
    sims = {"global": t64(S3), "object": t64(S3.T)}
    summaries = {"global": (t64(T3), t64(C3)), "object": (t64(C3), t64(T3))}
    terms = multi_level_ranking_loss(sims, summaries, "CCL", temperature=0.1, alpha=2.0)
    assert set(terms) == {"global", "object", "total"}
    assert terms["total"].item() == pytest.approx(terms["global"].item() + terms["object"].item())
    assert terms["global"].item() == pytest.approx(0.3631476775340597, rel=1e-6)
    nce = multi_level_ranking_loss(sims, summaries, "contrastive", temperature=0.1, alpha=2.0)
    assert nce["global"].item() == pytest.approx(0.20255693877701245, rel=1e-9)
    with pytest.raises(ValueError, match="unknown ranking loss"):
        multi_level_ranking_loss(sims, summaries, "triplet", temperature=0.1, alpha=2.0)


L_A = [[0.5, 0.0], [0.2, 0.3]]
MU_A, X_A = [0.1, 0.2], [0.4, 0.1]
L_B = [[0.1, 0.0], [-0.05, 0.2]]
MU_B, X_B = [0.5, 0.5], [0.45, 0.7]


def test_gaussian_nll_by_hand():
    # Sigma = [[0.25, 0.1], [0.1, 0.13]], det 0.0225, r^T Sigma^-1 r = 0.0202 / 0.0225
    mean, tril, target = t64([MU_A]), t64([L_A]), t64([X_A])
    assert gaussian_nll(mean, tril, target).item() == pytest.approx(0.38964597041235294, rel=1e-9)
    no_const = gaussian_nll(mean, tril, target, include_constant=False).item()
    assert no_const == pytest.approx(-1.4482310959969924, rel=1e-9)
    assert no_const == pytest.approx(0.5 * 0.0202 / 0.0225 + 0.5 * math.log(0.0225), rel=1e-9)
    beta = gaussian_nll(mean, tril, target, beta=0.5).item()  # weight det(Sigma)^(1/4)
    assert beta == pytest.approx(0.1509092354323871, rel=1e-9)


def test_gaussian_nll_batch_mean_and_beta_one():
    mean, tril, target = t64([MU_A, MU_B]), t64([L_A, L_B]), t64([X_A, X_B])
    assert gaussian_nll(mean, tril, target).item() == pytest.approx(-0.5883437343032236, rel=1e-9)
    assert gaussian_nll(mean, tril, target, beta=1.0).item() == pytest.approx(0.013560113390738458, rel=1e-9)


def test_beta_nll_weight_is_not_differentiated():
    tril = t64([L_A]).requires_grad_()
    mean = t64([MU_A]).requires_grad_()
    gaussian_nll(mean, tril, t64([X_A]), beta=0.5).backward()
    g_beta = mean.grad.clone()
    mean.grad = None
    gaussian_nll(mean, tril, t64([X_A]), beta=0.0).backward()
    weight = 0.0225 ** 0.25
    assert torch.allclose(g_beta, mean.grad * weight)


def test_mse_by_hand():
    loss = mse_loss(torch.tensor([[0.1, 0.2], [0.5, 0.5]]), torch.tensor([[0.4, 0.1], [0.45, 0.7]]))
    assert loss.item() == pytest.approx((0.09 + 0.01 + 0.0025 + 0.04) / 4, rel=1e-6)
