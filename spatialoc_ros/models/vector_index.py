"""The short-list stage of retrieval: the map cells whose global descriptors best match a query's.

Two back-ends behind one small interface (``build`` once per map, ``search`` per query batch):

* :class:`ExactIndex` -- inner products with every cell in torch (on the Localizer's device) and a
  top-k: exact, no build cost, memory = the descriptors; linear in the map size per query.
* :class:`FaissIndex` -- FAISS (``faiss-cpu``; ``faiss-gpu`` builds put it on the GPU when the
  Localizer runs on CUDA): an inverted-file index (IVF, flat vectors, inner product) over the same
  L2-normalised descriptors. ``nlist`` coarse centroids are trained by k-means on the map; a query
  scans the ``nprobe`` lists nearest to it, i.e. about ``N * nprobe / nlist`` cells. The vectors
  are stored uncompressed, so scores of the cells it returns are exact; only cells in unscanned
  lists can be missed (the recall of the exact top-k is measured by ``benchmarks/latency.py``).

Only the pre-selection uses an index: the multi-level re-ranking of the short list stays exact.
``kind='auto'`` chooses FAISS for maps above the Localizer's ``preselect_above`` cells (the size from
which a short list is used at all) when FAISS is installed, else exact. The trained centroids are
plain arrays, so the on-disk map cache keeps them and a restart only re-assigns the vectors.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

_log = logging.getLogger(__name__)

#: Map size (cells) from which retrieval ranks a short list instead of every cell (and from which
#: ``auto`` takes FAISS for it).
PRESELECT_ABOVE = 20000
#: Index kinds accepted by :func:`build_index` (and the ``index`` parameter / ``--index`` flag).
INDEX_KINDS: tuple[str, ...] = ("auto", "exact", "faiss")
#: Inverted lists per cell count: nlist = clamp(LISTS_PER_SQRT * sqrt(N), MIN_LISTS, MAX_LISTS).
LISTS_PER_SQRT = 4.0
MIN_LISTS = 16
MAX_LISTS = 16384
#: Lists scanned per query: at least MIN_PROBE, and at least SCAN_SHARE of all lists (recall of the
#: exact top-10 measured by benchmarks/latency.py, in the README).
MIN_PROBE = 64
SCAN_SHARE = 0.05
#: Training vectors per centroid for the k-means of the coarse quantiser (FAISS warns below 39; a
#: small map gets fewer lists rather than too few training vectors per list).
TRAIN_PER_LIST = 40
#: Seed of the k-means, so that the same map gives the same index.
KMEANS_SEED = 1234

FAISS_INSTALL_HINT = ("FAISS is not installed in this environment: `pip install faiss-cpu==1.13.0` "
                      "(it is in requirements/lock.txt; scripts/setup.sh installs it), or use index='exact'")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def check_kind(kind: str) -> str:
    if kind not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
    return kind


def resolve_kind(kind: str, num_cells: int, above: int) -> str:
    """'auto' | 'exact' | 'faiss' -> 'exact' or 'faiss' for a map of ``num_cells`` ('auto': FAISS
    above ``above`` cells when installed); a ValueError for an unknown kind, an ImportError (with
    the fix) for 'faiss' without FAISS."""
    check_kind(kind)
    if kind == "auto":
        return "faiss" if num_cells > above and faiss_available() else "exact"
    if kind == "faiss" and not faiss_available():
        raise ImportError(FAISS_INSTALL_HINT)
    return kind


class ExactIndex:
    """Brute-force inner-product top-k over (N, D) descriptors kept on their device."""

    kind = "exact"

    def __init__(self, vectors: torch.Tensor) -> None:
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an index needs (N > 0, D) descriptors, got {tuple(vectors.shape)}")
        self.vectors = vectors

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) queries -> (scores (B, k), indices (B, k) long), best first, on the index's device."""
        k = min(int(k), len(self))
        top = torch.topk(queries.to(self.vectors.dtype) @ self.vectors.T, k, dim=1)
        return top.values, top.indices


def num_lists(num_cells: int) -> int:
    """The IVF list count for a map of ``num_cells`` (see :data:`LISTS_PER_SQRT`)."""
    by_size = round(LISTS_PER_SQRT * math.sqrt(num_cells))
    return int(max(min(max(by_size, MIN_LISTS), MAX_LISTS, num_cells // TRAIN_PER_LIST), 1))


class FaissIndex:
    """FAISS IVF-Flat inner-product index over (N, D) descriptors (see the module docstring)."""

    kind = "faiss"

    def __init__(self, vectors: torch.Tensor, nprobe: Optional[int] = None, nlist: Optional[int] = None,
                 use_gpu: Optional[bool] = None, centroids: Optional[np.ndarray] = None) -> None:
        """``centroids`` (nlist, D): a coarse quantiser trained before (e.g. kept in the map cache)
        for these vectors; the k-means is skipped and only the assignment runs."""
        try:
            import faiss
        except ImportError as e:
            raise ImportError(FAISS_INSTALL_HINT) from e
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"an index needs (N > 0, D) descriptors, got {tuple(vectors.shape)}")
        if nprobe is not None and int(nprobe) < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.device = vectors.device
        data = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
        n, d = data.shape
        if centroids is not None:
            centroids = np.ascontiguousarray(np.asarray(centroids, dtype=np.float32))
            if centroids.ndim != 2 or centroids.shape[1] != d or not 1 <= len(centroids) <= n:
                raise ValueError(f"centroids of shape {centroids.shape} do not fit {n} descriptors of width {d}")
            nlist = len(centroids)
        self.nlist = int(nlist) if nlist is not None else num_lists(n)
        if nprobe is None:
            nprobe = max(MIN_PROBE, math.ceil(SCAN_SHARE * self.nlist))
        self.nprobe = min(int(nprobe), self.nlist)
        self._quantizer = quantizer = faiss.IndexFlatIP(d)  # kept alive with the index
        index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        if centroids is None:
            train_n = min(n, self.nlist * TRAIN_PER_LIST)
            train = data if train_n == n else data[np.random.default_rng(KMEANS_SEED).choice(n, train_n, replace=False)]
            index.cp.seed = KMEANS_SEED
            index.train(train)
        else:
            quantizer.add(centroids)
            index.is_trained = True
        self.centroids = quantizer.reconstruct_n(0, self.nlist)  # (nlist, D) float32
        index.add(data)
        index.nprobe = self.nprobe
        self._ntotal = n
        self._dim = d
        want_gpu = self.device.type == "cuda" if use_gpu is None else bool(use_gpu)
        self.on_gpu = False
        if want_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._resources = faiss.StandardGpuResources()
            gpu_id = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
            index = faiss.index_cpu_to_gpu(self._resources, gpu_id, index)
            index.nprobe = self.nprobe
            self.on_gpu = True
        elif want_gpu:
            _log.info("this FAISS build has no GPU support; the index runs on the CPU")
        self.index = index

    def __len__(self) -> int:
        return self._ntotal

    @property
    def nbytes(self) -> int:
        """Vectors, their ids and the centroids (what the index holds in memory)."""
        return self._ntotal * (self._dim * 4 + 8) + self.nlist * self._dim * 4

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) queries -> (scores (B, k), indices (B, k) long) on the queries' device; a list
        scan that finds fewer than k cells pads with the exact top-k of the missing rows."""
        k = min(int(k), len(self))
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        scores, ids = self.index.search(q, k)
        if (ids < 0).any():  # fewer than k cells in the scanned lists: scan them all for that row
            rows = np.nonzero((ids < 0).any(axis=1))[0]
            saved = self.index.nprobe
            self.index.nprobe = self.nlist
            scores[rows], ids[rows] = self.index.search(q[rows], k)
            self.index.nprobe = saved
        return (torch.from_numpy(scores).to(queries.device),
                torch.from_numpy(ids.astype(np.int64)).to(queries.device))


def build_index(kind: str, vectors: torch.Tensor, above: int, nprobe: Optional[int] = None,
                centroids: Optional[np.ndarray] = None):
    """An :class:`ExactIndex` or :class:`FaissIndex` over ``vectors`` (``kind``, ``above`` as in
    :func:`resolve_kind`; ``centroids`` as in :class:`FaissIndex`)."""
    if resolve_kind(kind, len(vectors), above) == "faiss":
        return FaissIndex(vectors, nprobe=nprobe, centroids=centroids)
    return ExactIndex(vectors)
