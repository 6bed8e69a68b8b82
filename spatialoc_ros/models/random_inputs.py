"""Random model inputs for unit tests and throughput measurements (no data set needed)."""
from __future__ import annotations

from typing import Optional

import torch

from spatialoc_ros.data.constants import NUM_CLASSES, PAD_INDEX
from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.text_encoder import HintBatch


def random_cell_batch(
    batch: int,
    max_objects: int = 28,
    num_points: int = 64,
    min_objects: int = 1,
    generator: Optional[torch.Generator] = None,
) -> CellBatch:
    """B cells with a random number (min_objects..max_objects) of real objects, padded like
    :func:`cells_to_batch` (real objects first)."""
    g = generator
    B, O, P = batch, max_objects, num_points
    counts = torch.randint(min_objects, O + 1, (B,), generator=g)
    mask = torch.arange(O).unsqueeze(0) < counts.unsqueeze(1)  # (B, O)
    keep = mask.float()
    center = torch.rand(B, O, 3, generator=g) * keep.unsqueeze(-1)
    spread = 0.02 + 0.1 * torch.rand(B, O, 1, 1, generator=g)
    xyz = (center.unsqueeze(2) + spread * torch.randn(B, O, P, 3, generator=g)) * keep[..., None, None]
    rgb = torch.rand(B, O, P, 3, generator=g) * keep[..., None, None]
    class_idx = torch.randint(0, NUM_CLASSES - 1, (B, O), generator=g).masked_fill(~mask, PAD_INDEX)
    num = torch.randint(10, 5000, (B, O), generator=g).float() * keep
    return CellBatch(xyz=xyz, rgb=rgb, class_idx=class_idx, color=rgb.mean(dim=2), center=center,
                     num_points=num, mask=mask)


def random_hint_batch(
    batch: int,
    num_hints: int = 6,
    num_tokens: int = 14,
    dim: int = 384,
    min_hints: int = 1,
    generator: Optional[torch.Generator] = None,
) -> HintBatch:
    """B queries with a random number (min_hints..num_hints) of hints of 3..T random tokens."""
    g = generator
    B, H, T = batch, num_hints, num_tokens
    counts = torch.randint(min_hints, H + 1, (B,), generator=g)
    hint_mask = torch.arange(H).unsqueeze(0) < counts.unsqueeze(1)  # (B, H)
    lengths = torch.randint(3, T + 1, (B, H), generator=g)
    token_mask = (torch.arange(T).view(1, 1, T) < lengths.unsqueeze(-1)) & hint_mask.unsqueeze(-1)
    tokens = torch.randn(B, H, T, dim, generator=g) * token_mask.unsqueeze(-1).float()
    return HintBatch(tokens=tokens, token_mask=token_mask, hint_mask=hint_mask)
