"""Object tokens: one vector per cell object from its points and simple features.

A PointNet (shared per-point MLP + max pool) reads each object's sampled points as
(xyz - object centre, rgb); the features named in ``use_features`` add
class (embedding), color (mean rgb -> MLP), position (object centre -> MLP) and
num (log(1 + point count) -> MLP). All parts are concatenated and projected to ``embed_dim``.
Padding slots come out as zero vectors.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional, Sequence

import torch
import torch.nn as nn

from spatialoc_ros.data.constants import NUM_CLASSES, PAD_INDEX
from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.config import OBJECT_FEATURES
from spatialoc_ros.models.layers import mlp

#: Hidden widths of the PointNet's per-point MLP (its output width is ``pointnet_dim``).
POINTNET_HIDDEN: tuple[int, ...] = (32, 64)


class PointNet(nn.Module):
    """Per-object PointNet: shared MLP on (xyz offset, rgb) of each point, max over points."""

    def __init__(self, *, out_dim: int, hidden: Sequence[int] = POINTNET_HIDDEN) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.point_mlp = mlp([6, *hidden, out_dim], final_activation=True)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """xyz, rgb: (..., P, 3) cell units / [0, 1]; center: (..., 3) -> (..., out_dim)."""
        points = torch.cat([xyz - center.unsqueeze(-2), rgb], dim=-1)  # (..., P, 6)
        return self.point_mlp(points).max(dim=-2).values  # (..., out_dim)


class ObjectEncoder(nn.Module):
    """Cell objects -> tokens (B, O, embed_dim), zero at padding."""

    def __init__(
        self,
        *,
        embed_dim: int,
        pointnet_dim: int,
        use_features: Sequence[str],
        feature_dim: int = 64,
        dropout: float = 0.0,
        pointnet_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        unknown = set(use_features) - set(OBJECT_FEATURES)
        if unknown:
            raise ValueError(f"unknown object features {sorted(unknown)}; choose from {OBJECT_FEATURES}")
        self.use_features = tuple(use_features)
        self.pointnet = PointNet(out_dim=pointnet_dim)
        if "class" in self.use_features:
            self.class_embedding = nn.Embedding(NUM_CLASSES, feature_dim, padding_idx=PAD_INDEX)
        if "color" in self.use_features:
            self.color_mlp = mlp([3, feature_dim, feature_dim])
        if "position" in self.use_features:
            self.position_mlp = mlp([3, feature_dim, feature_dim])
        if "num" in self.use_features:
            self.num_mlp = mlp([1, feature_dim, feature_dim])
        in_dim = pointnet_dim + feature_dim * len(self.use_features)
        self.project = mlp([in_dim, embed_dim, embed_dim], dropout=dropout)
        if pointnet_path is not None:
            self.load_pointnet(pointnet_path)

    def load_pointnet(self, path: str) -> None:
        """Load a PointNet state_dict (saved with ``torch.save(encoder.pointnet.state_dict())``)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PointNet weights {path!r} do not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path!r} is not a weights-only PointNet state_dict ({err}); save one with "
                "torch.save(object_encoder.pointnet.state_dict(), path)"
            ) from err
        if not isinstance(state, dict):
            raise ValueError(f"{path!r} holds a {type(state).__name__}, not a PointNet state_dict")
        try:
            self.pointnet.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path!r} does not match this PointNet (pointnet_dim?): {err}") from err

    def forward(self, cells: CellBatch) -> torch.Tensor:
        """-> (B, O, embed_dim) object tokens, zero where ``cells.mask`` is False."""
        mask = cells.mask
        point_features = cells.xyz.new_zeros(*mask.shape, self.pointnet.out_dim)  # (B, O, Dp)
        # Only real objects go through the PointNet: padding costs nothing and cannot leak.
        point_features[mask] = self.pointnet(cells.xyz[mask], cells.rgb[mask], cells.center[mask])
        parts = [point_features]
        if "class" in self.use_features:
            parts.append(self.class_embedding(cells.class_idx))
        if "color" in self.use_features:
            parts.append(self.color_mlp(cells.color))
        if "position" in self.use_features:
            parts.append(self.position_mlp(cells.center))
        if "num" in self.use_features:
            parts.append(self.num_mlp(torch.log1p(cells.num_points).unsqueeze(-1)))
        tokens = self.project(torch.cat(parts, dim=-1))  # (B, O, D)
        return tokens * mask.unsqueeze(-1).to(tokens.dtype)
