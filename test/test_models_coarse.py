"""CoarseModel: shapes, gradients, masks, similarity levels and the combined score."""
import pytest
import torch

from models_testing_utils import assert_all_params_get_grads, perturb_padding
from spatialoc_ros.models import CoarseConfig, build_coarse_model
from spatialoc_ros.models.coarse import combined_scores, set_level_similarity
from spatialoc_ros.models.losses import multi_level_ranking_loss
from spatialoc_ros.models.random_inputs import random_cell_batch, random_hint_batch
from spatialoc_ros.models.text_encoder import HintBatch

torch.set_num_threads(1)
B, H, T, DT, O, P = 4, 5, 7, 24, 8, 16


def tiny_config(**overrides):
    base = dict(text_dim=DT, embed_dim=32, num_points=P, max_objects=O, pointnet_dim=16, num_hidden_layers=2,
                num_heads=4, beose_dim=8, bezier_samples=3, dropout=0.0)
    base.update(overrides)
    return CoarseConfig(**base)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    hints = random_hint_batch(B, num_hints=H, num_tokens=T, dim=DT, generator=g)
    cells = random_cell_batch(B, max_objects=O, num_points=P, min_objects=2, generator=g)
    cells.mask[0, 3:] = False
    cells.class_idx[0, 3:] = 21
    return hints, cells


@pytest.mark.parametrize("use_beose,use_fae", [(True, True), (False, True), (True, False), (False, False)])
def test_shapes_levels_and_gradients(batch, use_beose, use_fae):
    hints, cells = batch
    cfg = tiny_config(use_beose=use_beose, use_fae=use_fae)
    model = build_coarse_model(cfg, text_dim=DT).train()
    text, cell = model.encode_text(hints), model.encode_cells(cells)
    assert text.global_.shape == (B, 32) and text.objects.shape == (B, H, 32)
    assert cell.global_.shape == (B, 32) and cell.objects.shape == (B, O, 32) and cell.mask.shape == (B, O)
    assert torch.allclose(text.global_.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(cell.global_.norm(dim=-1), torch.ones(B), atol=1e-5)
    real = cell.objects[cell.mask].norm(dim=-1)
    assert torch.allclose(real, torch.ones_like(real), atol=1e-5) and cell.objects[~cell.mask].abs().sum() == 0
    sims = model.similarity(text, cell)
    expected_levels = ("global", "object", "relation") if use_beose else ("global", "object")
    assert tuple(sims) == expected_levels == model.levels
    assert (cell.relations is not None) == use_beose and (text.relations is not None) == use_beose
    for s in sims.values():
        assert s.shape == (B, B) and torch.isfinite(s).all()
    terms = multi_level_ranking_loss(sims, model.level_summaries(text, cell), "CCL", 0.05, 2.0)
    assert_all_params_get_grads(model, terms["total"])


def test_cell_encoding_ignores_padding(batch):
    _, cells = batch
    model = build_coarse_model(tiny_config()).eval()
    with torch.no_grad():
        a = model.encode_cells(cells)
        b = model.encode_cells(perturb_padding(cells, torch.Generator().manual_seed(5)))
    assert torch.allclose(a.global_, b.global_, atol=1e-5)
    assert torch.allclose(a.objects, b.objects, atol=1e-5)
    assert torch.allclose(a.relations, b.relations, atol=1e-5)


def test_text_encoding_ignores_padding(batch):
    hints, _ = batch
    model = build_coarse_model(tiny_config()).eval()
    noise = torch.randn(hints.tokens.shape, generator=torch.Generator().manual_seed(6)) * 5
    padded = ~hints.token_mask  # includes every token of padded hints
    other = HintBatch(torch.where(padded.unsqueeze(-1), noise, hints.tokens), hints.token_mask, hints.hint_mask)
    with torch.no_grad():
        a, b = model.encode_text(hints), model.encode_text(other)
    for x, y in ((a.global_, b.global_), (a.objects, b.objects), (a.relations, b.relations)):
        assert torch.allclose(x, y, atol=1e-5)


def test_query_without_hints_is_rejected(batch):
    hints, _ = batch
    hints.hint_mask[1] = False
    with pytest.raises(ValueError, match="at least one hint"):
        build_coarse_model(tiny_config()).encode_text(hints)


def test_set_level_similarity_by_hand_and_chunking(monkeypatch):
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # third hint is padding
    qm = torch.tensor([[True, True, False]])
    items = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [9.0, 9.0]], [[0.0, -1.0], [0.0, 0.0], [0.0, 0.0]]])
    im = torch.tensor([[True, True, False], [True, False, False]])
    s = set_level_similarity(q, qm, items, im)
    # cell 0: hint0 best 1.0, hint1 best 0.8 -> 0.9; cell 1: hint0 0.0, hint1 -1.0 -> -0.5
    assert torch.allclose(s, torch.tensor([[0.9, -0.5]]))
    g = torch.Generator().manual_seed(0)
    q2, items2 = torch.randn(3, 4, 8, generator=g), torch.randn(50, 6, 8, generator=g)
    qm2, im2 = torch.rand(3, 4, generator=g) > 0.3, torch.rand(50, 6, generator=g) > 0.3
    qm2[:, 0] = True
    full = set_level_similarity(q2, qm2, items2, im2)
    monkeypatch.setattr("spatialoc_ros.models.layers.SCORE_CHUNK_ELEMENTS", 100)  # chunks of 4 cells
    assert torch.allclose(full, set_level_similarity(q2, qm2, items2, im2), atol=1e-6)


def test_combined_scores_zscores_each_level():
    sims = {"global": torch.tensor([[1.0, 2.0, 3.0]]), "object": torch.tensor([[10.0, 10.0, 40.0]])}
    z = combined_scores(sims)
    g = torch.tensor([-1.0, 0.0, 1.0]) * (3 / 2) ** 0.5
    o = torch.tensor([-1.0, -1.0, 2.0]) / 2 ** 0.5
    assert torch.allclose(z[0], g + o, atol=1e-4)
    single = combined_scores({"global": torch.tensor([[0.3]])})  # one cell: no spread, no NaN
    assert torch.isfinite(single).all()


def test_one_query_against_many_cells_matches_batched(batch):
    hints, cells = batch
    model = build_coarse_model(tiny_config()).eval()
    with torch.no_grad():
        text, cell = model.encode_text(hints), model.encode_cells(cells)
        all_scores = model.combined_scores(model.similarity(text, cell))
        one = model.combined_scores(model.similarity(text.index(slice(2, 3)), cell))
    assert torch.allclose(all_scores[2:3], one, atol=1e-5)
