"""Building blocks of the models: object encoder, BEOSE, FAE and the masked helpers."""
import pytest
import torch

from models_testing_utils import assert_all_params_get_grads, perturb_padding
from spatialoc_ros.models.beose import BEOSE
from spatialoc_ros.models.fae import FAE, FrequencyBranches
from spatialoc_ros.models.layers import AttentionPool, masked_max, masked_mean, masked_softmax
from spatialoc_ros.models.object_encoder import ObjectEncoder
from spatialoc_ros.models.random_inputs import random_cell_batch

torch.set_num_threads(1)
B, O, P, D = 3, 6, 8, 16


@pytest.fixture
def cells():
    g = torch.Generator().manual_seed(0)
    batch = random_cell_batch(B, max_objects=O, num_points=P, min_objects=2, generator=g)
    batch.mask[0, 4:] = False  # make sure at least one cell is padded
    batch.class_idx[0, 4:] = 21
    return batch


def test_masked_helpers_ignore_padding_and_empty_rows():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[5.0], [6.0], [7.0]]])  # (2, 3, 1)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    assert masked_mean(x, mask, 1).flatten().tolist() == [2.0, 0.0]
    assert masked_max(x, mask, 1).flatten().tolist() == [3.0, 0.0]
    w = masked_softmax(torch.tensor([[0.0, 0.0, 50.0], [1.0, 2.0, 3.0]]), mask, dim=1)
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
    pool = AttentionPool(in_dim=1, hidden_dim=4)
    assert torch.isfinite(pool(x, mask)).all() and pool(x, mask)[1].abs().sum() == 0


def test_object_encoder_shapes_grads_padding(cells):
    enc = ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=["class", "color", "position", "num"],
                        feature_dim=8)
    out = enc(cells)
    assert out.shape == (B, O, D)
    assert out[~cells.mask].abs().sum() == 0
    assert_all_params_get_grads(enc, (out ** 2).sum())
    other = enc(perturb_padding(cells, torch.Generator().manual_seed(1)))
    assert torch.allclose(out, other, atol=1e-6)


def test_object_encoder_feature_subsets_and_bad_name(cells):
    only_points = ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=[])
    assert only_points(cells).shape == (B, O, D)
    assert not hasattr(only_points, "class_embedding")
    with pytest.raises(ValueError, match="unknown object features"):
        ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=["colour"])


def test_pointnet_weights_load_strict(tmp_path, cells):
    enc = ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=["class"])
    path = tmp_path / "pointnet.pth"
    torch.save(enc.pointnet.state_dict(), path)
    again = ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=["class"], pointnet_path=str(path))
    for k, v in enc.pointnet.state_dict().items():
        assert torch.equal(v, again.pointnet.state_dict()[k])
    with pytest.raises(ValueError, match="does not match"):
        ObjectEncoder(embed_dim=D, pointnet_dim=16, use_features=["class"], pointnet_path=str(path))
    torch.save(enc.pointnet, tmp_path / "whole.pth")  # a pickled module, not weights
    with pytest.raises(ValueError, match="weights-only"):
        ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=[], pointnet_path=str(tmp_path / "whole.pth"))
    with pytest.raises(FileNotFoundError):
        ObjectEncoder(embed_dim=D, pointnet_dim=12, use_features=[], pointnet_path=str(tmp_path / "nope.pth"))


def test_beose_shapes_grads_and_mask_invariance(cells):
    beose = BEOSE(embed_dim=D, rel_dim=8, num_layers=3, num_samples=4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, O, D, generator=g) * cells.mask.unsqueeze(-1)
    objects, relations = beose(x, cells.center, cells.mask)
    assert objects.shape == (B, O, D) and relations.shape == (B, O, D)
    assert objects[~cells.mask].abs().sum() == 0 and relations[~cells.mask].abs().sum() == 0
    assert_all_params_get_grads(beose, objects.square().sum() + relations.square().sum())
    # garbage in padded slots (features and centres) changes nothing for real objects
    pad = ~cells.mask
    x2 = torch.where(pad.unsqueeze(-1), torch.randn(B, O, D, generator=g) * 9, x)
    c2 = torch.where(pad.unsqueeze(-1), torch.randn(B, O, 3, generator=g) * 9, cells.center)
    objects2, relations2 = beose(x2, c2, cells.mask)
    assert torch.allclose(objects, objects2, atol=1e-5) and torch.allclose(relations, relations2, atol=1e-5)


def test_beose_uses_geometry():
    """Moving one object changes the relation descriptors of the others (relations are spatial)."""
    torch.manual_seed(0)
    beose = BEOSE(embed_dim=D, rel_dim=8, num_layers=2, num_samples=3).eval()
    x = torch.randn(1, 4, D)
    mask = torch.ones(1, 4, dtype=torch.bool)
    center = torch.rand(1, 4, 3)
    moved = center.clone()
    moved[0, 3, :2] += 0.3
    _, rel_a = beose(x, center, mask)
    _, rel_b = beose(x, moved, mask)
    assert (rel_a[0, 0] - rel_b[0, 0]).abs().max() > 1e-4


def test_beose_curve_points_are_quadratic_bezier():
    layer = BEOSE(embed_dim=D, rel_dim=8, num_layers=1, num_samples=3).layers[0]
    pair = torch.randn(1, 1, 1, 8)
    offset = torch.tensor([[[[0.4, -0.2, 0.1]]]])
    length = offset.norm(dim=-1, keepdim=True)
    points = layer.curve_points(pair, offset, length)[0, 0, 0]  # (K, 3)
    control = 0.5 * offset + 0.5 * length * torch.tanh(layer.control(pair))
    for k, t in enumerate(layer.t.tolist()):
        expected = 2 * (1 - t) * t * control + t * t * offset  # P0 = 0
        assert torch.allclose(points[k], expected[0, 0, 0], atol=1e-6)


def test_beose_single_object_cell_is_finite():
    beose = BEOSE(embed_dim=D, rel_dim=8, num_layers=2)
    mask = torch.tensor([[True, False, False]])
    objects, relations = beose(torch.randn(1, 3, D), torch.rand(1, 3, 3), mask)
    assert torch.isfinite(objects).all() and relations[0, 0].abs().sum() == 0  # nothing to relate to


def test_fae_shapes_grads_and_mask_invariance(cells):
    fae = FAE(embed_dim=D, highpass_ratio=0.7)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, O, D, generator=g)
    out = fae(x, cells.mask)
    assert out.shape == (B, D)
    assert_all_params_get_grads(fae, out.square().sum())
    x2 = torch.where((~cells.mask).unsqueeze(-1), torch.randn(B, O, D, generator=g) * 7, x)
    assert torch.allclose(out, fae(x2, cells.mask), atol=1e-5)


def test_fae_gru_sees_real_objects_wherever_they_are(cells):
    """A mask with holes gives the same result as the same real objects packed to the front."""
    fae = FAE(embed_dim=D).eval()
    x = torch.randn(1, 5, D)
    holes = torch.tensor([[True, False, True, False, True]])
    packed = torch.tensor([[True, True, True, False, False]])
    x_packed = torch.zeros_like(x)
    x_packed[0, :3] = x[0, [0, 2, 4]]
    assert torch.allclose(fae(x, holes), fae(x_packed, packed), atol=1e-5)


def test_fae_highpass_removes_low_frequencies():
    branches = FrequencyBranches(embed_dim=16, highpass_ratio=0.7)
    with torch.no_grad():
        branches.proj_high.weight.copy_(torch.eye(16))
        branches.proj_high.bias.zero_()
    constant = torch.ones(1, 1, 16)  # only the zero-frequency bin
    out = branches(constant)[0, 0, 2] - constant[0, 0]  # high-pass branch minus its residual
    assert out.abs().max() < 1e-5
    n = torch.arange(16.0)
    fastest = torch.cos(torch.pi * n).view(1, 1, 16)  # the Nyquist bin survives
    out = branches(fastest)[0, 0, 2] - fastest[0, 0]
    assert torch.allclose(out, fastest[0, 0], atol=1e-5)


def test_masked_batch_norm_centres_real_rows_only():
    from spatialoc_ros.models.layers import MaskedBatchNorm

    norm = MaskedBatchNorm(2).train()
    x = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [500.0, -500.0]]])
    mask = torch.tensor([[True, True, False]])
    out = norm(x, mask)
    assert torch.allclose(out[0, :2].mean(dim=0), torch.zeros(2), atol=1e-6)
    assert out[0, 2].abs().sum() == 0
    assert torch.allclose(norm.norm.running_mean, torch.tensor([0.2, 1.5]))  # momentum 0.1
    single = norm(torch.tensor([[4.0, 4.0]]))  # one row in training: running statistics, no error
    assert torch.isfinite(single).all()
    norm.eval()
    a = norm(x, mask)
    x[0, 0] = 7.0  # eval mode: rows are independent
    assert torch.allclose(norm(x, mask)[0, 1], a[0, 1])
