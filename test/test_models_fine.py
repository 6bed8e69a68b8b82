"""FineModel (UGFL): Gaussian output, gradients, masks."""
import pytest
import torch

from models_testing_utils import assert_all_params_get_grads, perturb_padding
from spatialoc_ros.models import FineConfig, Gaussian2D, build_fine_model
from spatialoc_ros.models.losses import gaussian_nll, mse_loss
from spatialoc_ros.models.random_inputs import random_cell_batch, random_hint_batch

torch.set_num_threads(1)
B, H, T, DT, O, P = 5, 4, 6, 20, 7, 12


def tiny_config(**overrides):
    base = dict(text_dim=DT, embed_dim=16, num_points=P, max_objects=O, pointnet_dim=16, num_layers=2,
                num_heads=2, dropout=0.0, min_std=0.01)
    base.update(overrides)
    return FineConfig(**base)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    hints = random_hint_batch(B, num_hints=H, num_tokens=T, dim=DT, generator=g)
    cells = random_cell_batch(B, max_objects=O, num_points=P, min_objects=2, generator=g)
    cells.mask[0, 3:] = False
    cells.class_idx[0, 3:] = 21
    return hints, cells


def test_gaussian_output_is_valid_and_all_params_learn(batch):
    hints, cells = batch
    model = build_fine_model(tiny_config()).train()
    out = model(hints, cells)
    assert isinstance(out, Gaussian2D)
    assert out.mean.shape == (B, 2) and out.scale_tril.shape == (B, 2, 2)
    assert (out.scale_tril[:, 0, 1] == 0).all()
    assert (torch.diagonal(out.scale_tril, dim1=-2, dim2=-1) >= 0.01).all()  # min_std floor
    cov = out.covariance
    assert torch.allclose(cov, cov.transpose(-1, -2))
    assert (torch.linalg.eigvalsh(cov) > 0).all()
    assert torch.allclose(torch.linalg.cholesky(cov), out.scale_tril, atol=1e-6)
    target = torch.rand(B, 2, generator=torch.Generator().manual_seed(1))
    assert_all_params_get_grads(model, gaussian_nll(out.mean, out.scale_tril, target, beta=0.5))


def test_direct_mean_head(batch):
    hints, cells = batch
    model = build_fine_model(tiny_config(mean_head="direct")).train()
    out = model(hints, cells)
    assert out.mean.shape == (B, 2)
    loss = mse_loss(out.mean, torch.full((B, 2), 0.3))
    assert_all_params_get_grads(model, loss, skip=("scale_head",))  # the MSE does not train the covariance


def test_anchor_mean_follows_object_centres(batch):
    """Translating every object (points and centres) translates the anchor-based mean when the
    other features ignore position."""
    hints, cells = batch
    model = build_fine_model(tiny_config(use_features=["class", "color", "num"])).eval()
    shift = torch.tensor([0.1, -0.05, 0.0])
    moved = perturb_padding(cells, torch.Generator().manual_seed(0))  # copy
    keep = cells.mask.float()
    moved.xyz = cells.xyz + shift * keep[..., None, None]
    moved.center = cells.center + shift * keep[..., None]
    with torch.no_grad():
        a, b = model(hints, cells), model(hints, moved)
    assert torch.allclose(b.mean - a.mean, shift[:2].expand(B, 2), atol=1e-5)
    assert torch.allclose(a.scale_tril, b.scale_tril, atol=1e-5)


def test_padding_does_not_change_the_prediction(batch):
    hints, cells = batch
    model = build_fine_model(tiny_config()).eval()
    with torch.no_grad():
        a = model(hints, cells)
        b = model(hints, perturb_padding(cells, torch.Generator().manual_seed(3)))
    assert torch.allclose(a.mean, b.mean, atol=1e-5) and torch.allclose(a.scale_tril, b.scale_tril, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="fine_loss"):
        FineConfig(fine_loss="l1")
    with pytest.raises(ValueError, match="min_std"):
        FineConfig(min_std=0.0)
    with pytest.raises(ValueError, match="regressor_cell"):
        FineConfig(regressor_cell="best")
    with pytest.raises(ValueError, match="use_features"):
        FineConfig(use_features=["class", "size"])


def test_matching_similarity_trains_the_matcher(batch):
    from spatialoc_ros.models.losses import fine_matching_loss

    hints, cells = batch
    model = build_fine_model(tiny_config()).train()
    out, matching = model.forward_with_matching(hints, cells)
    assert matching.shape == (B, B) and torch.isfinite(matching).all() and matching.abs().max() <= 1 + 1e-5
    fine_matching_loss(matching).backward()
    for name in ("matcher.query.weight", "matcher.key.weight", "hint_mlp.0.weight", "object_encoder.project.0.weight"):
        assert dict(model.named_parameters())[name].grad.abs().max() > 0, name
    assert model.mean_head.offset.weight.grad is None  # the ranking loss does not touch the position head
    direct = build_fine_model(tiny_config(mean_head="direct"))
    assert direct.forward_with_matching(hints, cells)[1] is None


def test_matcher_attention_picks_the_named_object():
    """With hand-set identity weights the attention lands on the object whose token equals the hint's."""
    model = build_fine_model(tiny_config()).eval()
    with torch.no_grad():
        for lin in (model.matcher.query, model.matcher.key):
            lin.weight.copy_(torch.eye(16))
            lin.bias.zero_()
    tokens = torch.eye(16)[:4]  # four orthogonal object tokens
    q, k = model.matcher.vectors(tokens[[2, 0]].unsqueeze(0), tokens.unsqueeze(0))
    att = model.matcher.attention(q, k, torch.ones(1, 4, dtype=torch.bool))
    assert att[0].argmax(dim=-1).tolist() == [2, 0] and (att[0].max(dim=-1).values > 0.99).all()
