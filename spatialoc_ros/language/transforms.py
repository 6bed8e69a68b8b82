"""Controlled changes of a query's hints, for evaluation and calibration (no parsing here).

* :func:`flipped`: every compass word swapped (north<->south, east<->west; on-top kept). A model
  that reads directions must do worse on these; one that only counts objects does not notice.
* :func:`hint_subsets`: each query cut to ``count`` of its hints (a seeded random subset, the
  original order kept), the way people give fewer hints than the data set's six.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from spatialoc_ros.language.vocabulary import INVERSE_DIRECTION


def flipped(hints: Sequence) -> list:
    """The hints with every direction replaced by its opposite (on-top stays on-top)."""
    return [dataclasses.replace(h, direction=INVERSE_DIRECTION[h.direction]) for h in hints]


def hint_subsets(hint_lists: Sequence[Sequence], count: int, seed: int = 0) -> list:
    """Each query's hints cut to ``count`` (a random subset in the original order; all when fewer).
    The same ``seed`` and ``count`` give the same subsets."""
    rng = np.random.default_rng([seed, count])
    out = []
    for hints in hint_lists:
        hints = list(hints)
        if len(hints) > count:
            keep = np.sort(rng.choice(len(hints), size=count, replace=False))
            hints = [hints[i] for i in keep]
        out.append(hints)
    return out
