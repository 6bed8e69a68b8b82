"""A bag-of-objects retrieval baseline that ignores every position and direction.

A cell scores the share of the query's hints whose (class, colour) it holds (class alone when the
hint gives no colour); ties are broken by the cosine between the query's and the cell's
(class, colour) histograms. Nothing is learned and nothing about where objects lie is used, so a
model that only learned "which words are in the cell" scores about the same; the gap over this
baseline is what the spatial part of a model adds, and unlike absolute recalls it is comparable
across cities.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spatialoc_ros.data.constants import CLASS_TO_INDEX, PAD_LABEL, UNIQUE_COLOR_NAMES
from spatialoc_ros.models.geometry import COLOUR_TO_INDEX, colour_index

_NC = len(UNIQUE_COLOR_NAMES)
_KEYS = len(CLASS_TO_INDEX) * _NC
_TIE_WEIGHT = 1e-3


def cell_histograms(cells: Sequence) -> np.ndarray:
    """(N, classes * colours) counts of every cell's objects by (class, colour name)."""
    out = np.zeros((len(cells), _KEYS), dtype=np.float64)
    for n, cell in enumerate(cells):
        for obj in cell.objects:
            if obj.label == PAD_LABEL or len(obj.xyz) == 0:
                continue
            colour = int(colour_index(np.asarray(obj.rgb, dtype=np.float64).mean(axis=0)))
            out[n, CLASS_TO_INDEX[obj.label] * _NC + colour] += 1
    return out


class BagOfObjects:
    """Scores of a query's hints against the cells (see the module docstring)."""

    def __init__(self, cells: Sequence) -> None:
        self.hist = cell_histograms(cells)
        self.by_class = self.hist.reshape(len(cells), -1, _NC).sum(axis=2)
        self.norm = np.linalg.norm(self.hist, axis=1) + 1e-12

    def scores(self, hints: Sequence) -> np.ndarray:
        """(N,) scores for one query's hints (objects with .label, .colour (None = any))."""
        present = np.zeros(len(self.hist))
        q = np.zeros(_KEYS)
        for h in hints:
            c = CLASS_TO_INDEX[h.label]
            if h.colour is None:
                present += self.by_class[:, c] > 0
                q[c * _NC:(c + 1) * _NC] += 1.0 / _NC
            else:
                k = c * _NC + COLOUR_TO_INDEX[h.colour]
                present += self.hist[:, k] > 0
                q[k] += 1.0
        cosine = self.hist @ q / (self.norm * (np.linalg.norm(q) + 1e-12))
        return present / max(len(hints), 1) + _TIE_WEIGHT * cosine

    def rank(self, queries: Sequence[Sequence], top_k: int) -> np.ndarray:
        """(Q, top_k) cell indices best first for each query's hints."""
        k = min(top_k, len(self.hist))
        return np.stack([np.argsort(-self.scores(h), kind="stable")[:k] for h in queries])
