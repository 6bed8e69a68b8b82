"""The per-query fast path against the plain computations it replaces: the hint lookup and the
histogram form of the geometric level, the packed set similarity, the fine model's attention,
its per-map object tokens, the vectorised in-cell refinement and the warmed sentence cache. Pure
logic on random tensors and hand-made cells, then the Localizer on the tiny synthetic city."""
import math

import numpy as np
import pytest
import torch

from spatialoc_ros.data.constants import DIRECTIONS, UNIQUE_COLOR_NAMES
from spatialoc_ros.data.kitti360pose import Cell, Object3d
from spatialoc_ros.language import Hint, all_hint_sentences, parse_instruction, render_hint
from spatialoc_ros.language.vocabulary import REAL_CLASSES
from spatialoc_ros.models import geometry
from spatialoc_ros.models.layers import packed_set_similarity, set_level_similarity
from spatialoc_ros.models.ugfl import _safe_padding, attend


# --- geometry: the reference computation, written plainly ------------------------------------------
def _reference_satisfied(hints, rel, grid_size):
    """(N, H, G) bool by loops over cells, hints and objects."""
    d, c, lab = geometry.hint_tensors(hints)
    bits = geometry._unpack_bits(rel.placed, grid_size)  # (N, O, 5, G)
    N, O = rel.mask.shape
    out = torch.zeros(N, len(hints), grid_size, dtype=torch.bool)
    for n in range(N):
        for h in range(len(hints)):
            for o in range(O):
                if not rel.mask[n, o] or rel.label[n, o] != lab[h]:
                    continue
                if int(c[h]) != geometry.ANY_COLOUR and rel.colour[n, o] != c[h]:
                    continue
                out[n, h] |= bits[n, o, d[h]]
    return out


def _reference_binding(hints, rel, sharpness, grid_size):
    share = _reference_satisfied(hints, rel, grid_size).double().mean(dim=1)  # (N, G)
    return 1.0 + (torch.logsumexp(sharpness * (share - 1.0), dim=1) - math.log(grid_size)) / sharpness


def _random_relations(seed, N=23, O=9, grid_size=121, labels=4, colours=3):
    """Random CellRelations over a few classes and colours, so that hints name several objects of
    a cell (the OR of their flags matters) and some cells none."""
    g = torch.Generator().manual_seed(seed)
    flags = torch.rand(N, O, len(DIRECTIONS), grid_size, generator=g) < 0.3
    placed = torch.from_numpy(geometry._pack_bits(flags.numpy()))
    label = torch.randint(0, labels, (N, O), generator=g)
    colour = torch.randint(0, colours, (N, O), generator=g)
    mask = torch.rand(N, O, generator=g) < 0.7
    mask[0] = False  # a cell without objects
    label[~mask] = geometry.PAD_INDEX
    nearest = torch.full((N, grid_size, geometry.NEAREST), -1, dtype=torch.int16)  # not read here
    return geometry.CellRelations(placed, label, colour, mask, nearest)


def _random_hints(seed, count, labels=4, colours=3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        colour = None if rng.random() < 0.3 else UNIQUE_COLOR_NAMES[int(rng.integers(colours))]
        out.append(Hint(DIRECTIONS[int(rng.integers(len(DIRECTIONS)))], colour, REAL_CLASSES[int(rng.integers(labels))]))
    return out


@pytest.mark.parametrize("grid_size", [121, 63, 200])
@pytest.mark.parametrize("num_hints", [1, 3, 6, 9])
def test_hint_flags_and_binding_match_the_plain_computation(grid_size, num_hints):
    rel = _random_relations(grid_size + num_hints, grid_size=grid_size)
    lookup = geometry.HintLookup.build(rel)
    for seed in range(4):
        hints = _random_hints(100 * seed + num_hints, num_hints)
        want = _reference_satisfied(hints, rel, grid_size)
        assert torch.equal(geometry.satisfied_hints(hints, rel, grid_size), want)
        assert torch.equal(geometry._unpack_bits(lookup.hint_words(hints), grid_size), want)
        ref = _reference_binding(hints, rel, geometry.SHARPNESS, grid_size).float()
        for source in (rel, lookup):
            got = geometry.binding_scores(hints, source, grid_size=grid_size)
            assert got.dtype == torch.float32 and got.shape == (len(rel),)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        # chunked over cells: the same scores
        torch.testing.assert_close(geometry.binding_scores(hints, rel, grid_size=grid_size, chunk=5), ref,
                                   rtol=0, atol=1e-6)


def test_binding_histogram_counts_every_position_once():
    rel = _random_relations(7)
    hints = _random_hints(3, 5)
    hist = geometry._count_histogram(geometry._hint_words(hints, rel), 121)
    assert hist.shape == (len(rel), 6) and bool((hist.sum(dim=1) == 121).all())
    counts = _reference_satisfied(hints, rel, 121).sum(dim=1)  # (N, G) hints satisfied per position
    for k in range(6):
        assert torch.equal(hist[:, k], (counts == k).sum(dim=1))
    assert geometry._popcount(torch.tensor([0, 1, (1 << 63) - 1, 0x5555])).tolist() == [0, 1, 63, 8]


def test_binding_refuses_bad_sharpness_and_a_lookup_of_an_empty_map():
    rel = _random_relations(1)
    with pytest.raises(ValueError, match="sharpness"):
        geometry.binding_scores(_random_hints(0, 2), rel, sharpness=0.0)
    with pytest.raises(ValueError, match="sharpness"):
        geometry.binding_scores(_random_hints(0, 2), rel, sharpness=1e4)
    empty = geometry.CellRelations(rel.placed[:2], rel.label[:2], rel.colour[:2],
                                   torch.zeros(2, rel.mask.shape[1], dtype=torch.bool), rel.nearest[:2])
    lookup = geometry.HintLookup.build(empty)
    hints = _random_hints(0, 3)
    assert torch.equal(lookup.hint_words(hints), torch.zeros(2, 3, rel.placed.shape[-1], dtype=torch.int64))
    # nothing is satisfied anywhere: every position explains none of the hints
    torch.testing.assert_close(geometry.binding_scores(hints, lookup), torch.full((2,), 0.0))
    with pytest.raises(ValueError):
        lookup.hint_words([])


def test_vectorised_refinement_matches_one_row_at_a_time():
    rng = np.random.default_rng(0)
    grid = geometry.candidate_grid()
    K = 6
    share = rng.random((K, len(grid)))
    mean = rng.random((K, 2))
    a = rng.normal(size=(K, 2, 2)) * 0.1
    cov = a @ a.transpose(0, 2, 1) + 1e-3 * np.eye(2)
    mean[1, 0] = np.nan  # left unchanged
    cov[3] = 0.0  # singular: left unchanged
    m, c = geometry.refine_in_cell(share, grid, mean, cov)
    for k in range(K):
        mk, ck = geometry.refine_in_cell(share[k:k + 1], grid, mean[k:k + 1], cov[k:k + 1])
        np.testing.assert_allclose(m[k], mk[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(c[k], ck[0], rtol=1e-12, atol=1e-14)
    assert np.isnan(m[1, 0]) and np.array_equal(c[3], cov[3])
    # the posterior of a row: weights N(g; mean, cov) * exp(sharpness * share), written out
    d = grid - mean[0]
    logw = -0.5 * np.einsum("gi,gi->g", d, np.linalg.solve(cov[0], d.T).T) + geometry.REFINE_SHARPNESS * share[0]
    w = np.exp(logw - logw.max())
    w /= w.sum()
    np.testing.assert_allclose(m[0], w @ grid, rtol=1e-12)


# --- learned levels ---------------------------------------------------------------------------------
def test_packed_set_similarity_equals_the_padded_one():
    torch.manual_seed(0)
    Bt, H, Bc, O, D = 3, 5, 11, 7, 16
    q = torch.nn.functional.normalize(torch.randn(Bt, H, D), dim=-1)
    q_mask = torch.rand(Bt, H) < 0.8
    q_mask[:, 0] = True
    items = torch.nn.functional.normalize(torch.randn(Bc, O, D), dim=-1)
    mask = torch.rand(Bc, O) < 0.6
    mask[4] = False  # a cell without items: _NO_ITEM_SCORE
    items = items * mask[..., None]
    want = set_level_similarity(q, q_mask, items, mask)
    cell, slot = mask.nonzero(as_tuple=True)
    got = packed_set_similarity(q, q_mask, items[cell, slot], cell, Bc)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # chunked over rows: the same
    import spatialoc_ros.models.layers as layers

    old = layers.SCORE_CHUNK_ELEMENTS
    layers.SCORE_CHUNK_ELEMENTS = 2 * Bt * H
    try:
        torch.testing.assert_close(packed_set_similarity(q, q_mask, items[cell, slot], cell, Bc), want, rtol=0, atol=1e-6)
    finally:
        layers.SCORE_CHUNK_ELEMENTS = old


def _padded_embedding(seed=1, B=9, O=6, D=5):
    from spatialoc_ros.models.coarse import CellEmbedding

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, O, generator=g) < 0.5
    mask[min(2, B - 1)] = False  # a cell without objects
    mask[B - 1, O - 1] = True  # a real slot after padded ones
    objects = torch.randn(B, O, D, generator=g) * mask[..., None]
    relations = torch.randn(B, O, D, generator=g) * mask[..., None]
    return CellEmbedding(torch.randn(B, D, generator=g), objects, mask, relations)


def test_packed_embedding_take_and_select_give_the_padded_tensors():
    from spatialoc_ros.models.coarse import PackedCellEmbedding

    padded = _padded_embedding()
    packed = padded.packed()
    assert packed.objects.shape == (int(padded.mask.sum()), 5) and packed.start[-1] == len(packed.objects)
    idx = torch.tensor([7, 2, 5, 5, 0])  # any order, an empty cell, a repeat
    got = packed.take(idx)
    for name in ("global_", "objects", "mask", "relations"):
        assert torch.equal(getattr(got, name), getattr(padded, name)[idx]), name
    sub = packed.select(idx)
    assert torch.equal(sub.cell, torch.repeat_interleave(torch.arange(5), padded.mask[idx].sum(1)))
    assert torch.equal(sub.take(torch.arange(5)).objects, padded.objects[idx])
    with pytest.raises(ValueError, match="one row per real slot"):
        PackedCellEmbedding(padded.global_, padded.mask, packed.objects[1:])


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_written_out_equals_the_module(heads):
    torch.manual_seed(heads)
    mha = torch.nn.MultiheadAttention(32, heads, dropout=0.3, batch_first=True).eval()
    q, kv = torch.randn(4, 6, 32), torch.randn(4, 9, 32)
    mask = torch.rand(4, 9) < 0.5
    mask[1] = False  # no real key: _safe_padding lets it attend to everything
    ignore = _safe_padding(mask)
    want = mha(q, kv, kv, key_padding_mask=ignore, need_weights=False)[0]
    torch.testing.assert_close(attend(mha, q, kv, ignore), want, rtol=1e-5, atol=1e-6)
    mha.train()  # training with dropout: the module itself (its dropout), still a valid output
    assert attend(mha, q, kv, ignore).shape == want.shape


# --- language ----------------------------------------------------------------------------------------
def test_all_hint_sentences_cover_what_the_parser_writes():
    sentences = all_hint_sentences()
    assert len(sentences) == len(set(sentences)) == len(DIRECTIONS) * (len(UNIQUE_COLOR_NAMES) + 1) * len(REAL_CLASSES)
    text = "I am on the sidewalk, a gray building is east of me, a green pole just north and some trees west."
    for hint in parse_instruction(text).hints:
        assert render_hint(hint) in sentences


# --- the Localizer on the tiny city ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(small_city):
    from spatialoc_ros.data.loading import load_split, query_text
    from spatialoc_ros.inference import Localizer

    data = load_split(small_city, "test")
    loc = Localizer.from_checkpoints(device="cpu")
    loc.set_map(data.cells, progress=False)
    return loc, data.cells, [query_text(p) for p in data.poses[:12]]


def test_fast_path_gives_the_slow_paths_hypotheses(tiny):
    from spatialoc_ros.inference import Localizer

    loc, cells, texts = tiny
    assert loc._hint_lookup is not None and loc._fine_tokens is not None
    fast = loc.localize_many(texts, top_k=4)
    slow = Localizer.from_checkpoints(device="cpu", preselect_above=len(cells) - 1, preselect_top=len(cells))
    slow.set_map(cells, progress=False)  # a short list of every cell (padded), no object tokens
    assert slow._hint_lookup is None and slow._fine_tokens is None
    ref = slow.localize_many(texts, top_k=4)
    for a, b in zip(fast, ref):
        assert [h.cell_id for h in a] == [h.cell_id for h in b]
        for ha, hb in zip(a, b):
            np.testing.assert_allclose(ha.mean_xy, hb.mean_xy, atol=1e-4)
            np.testing.assert_allclose(ha.cov_xy, hb.cov_xy, rtol=1e-4, atol=1e-6)
            assert abs(ha.probability - hb.probability) < 1e-4 and abs(ha.score - hb.score) < 1e-4
    # the fine stage alone, in cells given by id, uses the same tokens
    ids = [a[0].cell_id for a in fast]
    for a, b in zip(loc.predict_in_cells(texts, ids), slow.predict_in_cells(texts, ids)):
        np.testing.assert_allclose(a.mean_xy, b.mean_xy, atol=1e-4)


def test_object_tokens_gather_pads_with_zeros(tiny):
    loc, cells, _ = tiny
    store = loc._fine_tokens
    assert len(store) == len(cells)
    idx = torch.tensor([0, len(cells) - 1, 0])
    tokens, mask, xyz = store.gather(idx)
    counts = store.count[idx]
    assert mask.shape == tokens.shape[:2] == xyz.shape[:2] and mask.shape[1] == max(int(counts.max()), 1)
    assert torch.equal(mask.sum(dim=1), counts)
    assert bool((tokens[~mask] == 0).all()) and bool((xyz[~mask] == 0).all())
    assert torch.equal(tokens[0], tokens[2])


def test_warm_text_cache_encodes_every_sentence_once(tiny):
    loc, _, texts = tiny
    encoder = loc._hint_encoders["coarse"]
    before = encoder.num_encoded
    cached = sum(s in encoder._store for s in all_hint_sentences())
    first = loc.warm_text_cache()
    assert first == len(all_hint_sentences()) - cached > 0
    assert all(s in encoder._store for s in all_hint_sentences())
    assert encoder.num_encoded - before == first
    assert loc.warm_text_cache() == 0  # nothing left to encode
    n = encoder.num_encoded
    loc.localize_many(texts, top_k=2)
    assert encoder.num_encoded == n  # no instruction reaches the language model any more
