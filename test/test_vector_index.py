"""The short-list index back-ends (models/vector_index.py), the fast map tensors and geometry, and
how the Localizer uses them."""
import logging

import numpy as np
import pytest
import torch

from spatialoc_ros.data.loading import load_split, query_text
from spatialoc_ros.inference import Localizer, parse_query
from spatialoc_ros.models import vector_index as vi
from test_inference import write_tiny_checkpoints

faiss = pytest.importorskip("faiss")


def _clustered(n: int, d: int = 32, clusters: int = 50, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)


def test_exact_index_is_brute_force_top_k():
    v = _clustered(500)
    q = v[:7] + 0.01
    scores, idx = vi.ExactIndex(v).search(q, 10)
    want = torch.topk(q @ v.T, 10, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(scores, want.values)
    assert vi.ExactIndex(v).search(q, 10_000)[1].shape == (7, 500)  # k is capped at the map size


def test_faiss_index_recall_and_full_scan_exactness():
    v = _clustered(20_000)
    q = torch.nn.functional.normalize(v[:200] + 0.05 * torch.randn(200, v.shape[1], generator=torch.Generator().manual_seed(1)), dim=1)
    exact = vi.ExactIndex(v).search(q, 10)[1].numpy()
    index = vi.FaissIndex(v)
    assert index.nlist == vi.num_lists(20_000) and index.nprobe >= vi.MIN_PROBE
    got = index.search(q, 10)[1].numpy()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall >= 0.98, recall
    full = vi.FaissIndex(v, nprobe=10**6)  # every list scanned: the exact answer
    assert full.nprobe == full.nlist
    scores, ids = full.search(q, 10)
    np.testing.assert_array_equal(np.sort(ids.numpy(), axis=1), np.sort(exact, axis=1))
    torch.testing.assert_close(scores, vi.ExactIndex(v).search(q, 10)[0], atol=1e-5, rtol=0)


def test_faiss_centroids_reuse_gives_the_same_index():
    v = _clustered(5_000)
    a = vi.FaissIndex(v)
    b = vi.FaissIndex(v, centroids=a.centroids)
    q = v[:50]
    assert torch.equal(a.search(q, 10)[1], b.search(q, 10)[1])
    with pytest.raises(ValueError, match="centroids"):
        vi.FaissIndex(v, centroids=a.centroids[:, :5])


def test_resolve_kind(monkeypatch):
    assert vi.resolve_kind("auto", 100, above=1000) == "exact"
    assert vi.resolve_kind("auto", 5000, above=1000) == "faiss"
    assert vi.resolve_kind("exact", 10**6, above=1000) == "exact"
    with pytest.raises(ValueError, match="index must be one of"):
        vi.resolve_kind("annoy", 10, above=1)
    monkeypatch.setattr(vi, "faiss_available", lambda: False)
    assert vi.resolve_kind("auto", 5000, above=1000) == "exact"  # auto falls back
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        vi.resolve_kind("faiss", 5000, above=1000)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_city):
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt_index")), load_split(small_city, "test")


def test_localizer_faiss_short_list_matches_exact(tiny):
    """With every list scanned, the FAISS short list is the exact one: the same answers."""
    (coarse, fine), split = tiny
    kw = dict(device="cpu", preselect_above=10, preselect_top=8)
    exact = Localizer.from_checkpoints(coarse, fine, index="exact", **kw)
    approx = Localizer.from_checkpoints(coarse, fine, index="faiss", index_nprobe=10**6, **kw)
    for loc in (exact, approx):
        loc.set_map(split.cells, progress=False)
    assert (exact.index_in_use, approx.index_in_use) == ("exact", "faiss")
    for pose in split.poses[:10]:
        a = exact.localize(query_text(pose), top_k=3)
        b = approx.localize(query_text(pose), top_k=3)
        assert [h.cell_id for h in a] == [h.cell_id for h in b]
    small = Localizer.from_checkpoints(coarse, fine, device="cpu")  # auto on a small map: exact, all cells
    small.set_map(split.cells, progress=False)
    assert small.index_in_use == "exact"
    with pytest.raises(ValueError, match="index must be one of"):
        Localizer.from_checkpoints(coarse, fine, device="cpu", index="hnsw")


def test_faiss_centroids_are_cached_next_to_the_map(tiny, tmp_path, caplog):
    (coarse, fine), split = tiny
    kw = dict(device="cpu", preselect_above=10, index="faiss")
    first = Localizer.from_checkpoints(coarse, fine, **kw)
    first.set_map(split.cells, progress=False, cache_dir=str(tmp_path))
    side = list(tmp_path.glob("*_ivf*.npz"))
    assert len(side) == 1
    caplog.set_level(logging.INFO, logger="spatialoc_ros.inference")
    again = Localizer.from_checkpoints(coarse, fine, **kw)
    again.set_map(split.cells, progress=False, cache_dir=str(tmp_path))
    assert "from cached centroids" in caplog.text
    np.testing.assert_array_equal(again._vector_index.centroids, first._vector_index.centroids)
    side[0].write_bytes(b"not an npz")  # damaged: retrained and rewritten, with a log line
    caplog.clear()
    Localizer.from_checkpoints(coarse, fine, **kw).set_map(split.cells, progress=False, cache_dir=str(tmp_path))
    assert "unusable" in caplog.text and "from cached centroids" not in caplog.text


def test_sorted_embedding_equals_map_order_embedding(tiny):
    """set_map batches cells by object count; the embedding is the one of the map's order."""
    from spatialoc_ros.models.cell_tensors import cells_to_batch

    (coarse, fine), split = tiny
    loc = Localizer.from_checkpoints(coarse, fine, device="cpu", batch_size=7)
    loc.set_map(split.cells, progress=False)
    cfg = loc.coarse_cfg
    with torch.no_grad():
        direct = loc.coarse.encode_cells(cells_to_batch(split.cells, cfg.max_objects, cfg.num_points))
    padded = loc._index.take(torch.arange(len(split.cells)))  # the map keeps it packed
    torch.testing.assert_close(padded.global_, direct.global_, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.objects, direct.objects, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.relations, direct.relations, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.mask, direct.mask) and torch.equal(loc._index.mask, direct.mask)
