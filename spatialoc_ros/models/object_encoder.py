"""Object tokens: one vector per cell object from its points and simple features.

A PointNet reads each object's sampled points; the features named in ``use_features`` add
class (embedding), color (mean rgb -> MLP), position (object centre -> MLP) and
num (log(1 + point count) -> MLP). All parts are concatenated and projected to ``embed_dim``.
Padding slots come out as zero vectors.

Two PointNets (``pointnet_arch``, see :data:`~spatialoc_ros.models.config.POINTNET_ARCHS`):

* ``'mlp'`` (:class:`PointNet`, the default): a shared per-point MLP on (xyz - object centre, rgb)
  and a max over the points.
* ``'pointnet2'`` (:class:`PointNet2`): the shape of the released object backbone of
  Text2Pos / Text2Loc / SpatiaLoc (``models.pointcloud.pointnet2.PointNet2``, a PointNet++), so
  that its pretrained weights (converted by :mod:`spatialoc_ros.models.convert_pointnet`) load
  with ``strict=True``. Three set-abstraction layers (farthest point sampling, ball query, shared
  MLP of Linear + BatchNorm + ReLU on (rgb, offset to the sampled centre), max over the ball), one
  global layer (MLP on (features, position), max over the points), then two Linear + ReLU layers;
  the second one's width is ``pointnet_dim`` (256 in the release).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from spatialoc_ros.data.constants import NUM_CLASSES, PAD_INDEX
from spatialoc_ros.models.cell_tensors import CellBatch
from spatialoc_ros.models.config import OBJECT_FEATURES, POINTNET_ARCHS
from spatialoc_ros.models.layers import mlp

#: Hidden widths of the 'mlp' PointNet's per-point MLP (its output width is ``pointnet_dim``).
POINTNET_HIDDEN: tuple[int, ...] = (32, 64)

#: The release's set-abstraction layers: (share of points kept as centres, ball radius in
#: normalised object units, MLP widths). The input of each MLP is (features, 3-d offset).
RELEASE_SET_ABSTRACTIONS: tuple[tuple[float, float, tuple[int, ...]], ...] = (
    (0.5, 0.2, (32, 64)),
    (0.5, 0.3, (128, 128)),
    (0.5, 0.4, (256, 256)),
)
#: MLP widths of the release's global abstraction layer (input: features + 3-d position).
RELEASE_GLOBAL_WIDTHS: tuple[int, ...] = (512, 1024)
#: Width of the release's first Linear after the global max (``lin1``); ``lin2`` gives pointnet_dim.
RELEASE_HIDDEN_DIM = 512
#: Neighbours kept per ball (torch_geometric's ``radius(max_num_neighbors=64)`` default).
RELEASE_MAX_NEIGHBORS = 64
#: Input features per point of the 'pointnet2' PointNet (rgb in [0, 1]).
POINT_FEATURES = 3


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


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over rows (N, C); a training batch of one row uses the running statistics
    (plain BatchNorm1d refuses it, and one object with few points can give a single row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)


class _LinearNormReLU(nn.Module):
    """Linear -> BatchNorm1d -> ReLU on rows (N, in_dim) -> (N, out_dim)."""

    def __init__(self, *, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.norm = _PointBatchNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.linear(x)))


def _norm_mlp(dims: Sequence[int]) -> nn.Sequential:
    """Blocks of Linear + BatchNorm + ReLU of widths ``dims`` (ReLU after the last one too)."""
    return nn.Sequential(*[_LinearNormReLU(in_dim=dims[i - 1], out_dim=dims[i]) for i in range(1, len(dims))])


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (N, P, C), index (N, ...) long -> (N, ..., C): values[n, index[n, ...]]."""
    N = values.shape[0]
    flat = index.reshape(N, -1)  # (N, Q)
    out = values.gather(1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))  # (N, Q, C)
    return out.view(*index.shape, values.shape[-1])


@torch.no_grad()
def farthest_point_sample(pos: torch.Tensor, count: int) -> torch.Tensor:
    """pos (N, P, 3) -> (N, count) long indices; starts at point 0 (deterministic), then each
    step takes the point farthest from those already taken."""
    N, P, _ = pos.shape
    chosen = torch.zeros(N, count, dtype=torch.long, device=pos.device)
    nearest = torch.full((N, P), float("inf"), device=pos.device, dtype=pos.dtype)
    rows = torch.arange(N, device=pos.device)
    last = torch.zeros(N, dtype=torch.long, device=pos.device)
    for i in range(1, count):
        d = ((pos - pos[rows, last].unsqueeze(1)) ** 2).sum(-1)  # (N, P)
        nearest = torch.minimum(nearest, d)
        last = nearest.argmax(dim=1)
        chosen[:, i] = last
    return chosen


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction: sample centres, group each centre's ball, shared MLP, max.

    x (N, P, C) point features, pos (N, P, 3) -> (N, M, out) features, (N, M, 3) centres, with
    M = ceil(ratio * P). Each centre's ball holds its ``max_neighbors`` nearest points within
    ``radius`` (the centre itself always among them); the MLP reads (x_j, pos_j - centre).
    """

    def __init__(self, *, in_dim: int, widths: Sequence[int], ratio: float, radius: float,
                 max_neighbors: int = RELEASE_MAX_NEIGHBORS) -> None:
        super().__init__()
        assert 0.0 < ratio <= 1.0 and radius > 0 and max_neighbors >= 1, "bad set-abstraction settings"
        self.ratio = ratio
        self.radius = radius
        self.max_neighbors = max_neighbors
        self.mlp = _norm_mlp([in_dim + 3, *widths])
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, P, _ = pos.shape
        M = max(1, math.ceil(self.ratio * P))
        centres_idx = farthest_point_sample(pos, M)  # (N, M)
        centres = _gather(pos, centres_idx)  # (N, M, 3)
        d2 = torch.cdist(centres, pos).pow(2)  # (N, M, P)
        # K: the fullest ball's size (capped), so no slot is computed for nothing
        K = int((d2 <= self.radius ** 2).sum(dim=-1).max().clamp(1, self.max_neighbors))
        d2_k, neighbours = d2.topk(K, dim=-1, largest=False)  # (N, M, K), nearest first
        inside = d2_k <= self.radius ** 2  # (N, M, K); the centre itself is at distance 0
        inside[..., 0] = True
        offsets = _gather(pos, neighbours) - centres.unsqueeze(2)  # (N, M, K, 3)
        grouped = torch.cat([_gather(x, neighbours), offsets], dim=-1)  # (N, M, K, C + 3)
        messages = self.mlp(grouped[inside])  # (E, out): only real ball members reach BatchNorm
        out = messages.new_full((N, M, K, self.out_dim), float("-inf"))
        out[inside] = messages
        return out.max(dim=2).values, centres  # (N, M, out), (N, M, 3)


class GlobalAbstraction(nn.Module):
    """MLP on (features, position) of every remaining point, max over the points: (N, M, C) -> (N, out)."""

    def __init__(self, *, in_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.mlp = _norm_mlp([in_dim + 3, *widths])
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        N, M, _ = x.shape
        h = self.mlp(torch.cat([x, pos], dim=-1).reshape(N * M, -1))  # (N*M, out)
        return h.view(N, M, self.out_dim).max(dim=1).values


class PointNet2(nn.Module):
    """The release's PointNet++ object backbone (module docstring), features of its ``lin2``.

    Points are normalised per object as the release's pretraining did (torch_geometric's
    NormalizeScale): centred on the object centre and scaled so that the largest coordinate is
    just under 1 in absolute value. Not reproduced from the release's torch_geometric layer: its
    'self-loops', which join the i-th sampled centre to the i-th input point by index (in a batch
    even points of another object); here a centre aggregates only its own ball. In training mode
    the BatchNorm layers use the statistics of the points of the batch's real objects, as in the
    release; in eval mode their running statistics.
    """

    def __init__(
        self,
        *,
        out_dim: int,
        set_abstractions: Sequence[tuple[float, float, Sequence[int]]] = RELEASE_SET_ABSTRACTIONS,
        global_widths: Sequence[int] = RELEASE_GLOBAL_WIDTHS,
        hidden_dim: int = RELEASE_HIDDEN_DIM,
        max_neighbors: int = RELEASE_MAX_NEIGHBORS,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        layers, width = [], POINT_FEATURES
        for ratio, radius, widths in set_abstractions:
            layers.append(SetAbstraction(in_dim=width, widths=widths, ratio=ratio, radius=radius,
                                         max_neighbors=max_neighbors))
            width = widths[-1]
        self.set_abstractions = nn.ModuleList(layers)
        self.global_abstraction = GlobalAbstraction(in_dim=width, widths=global_widths)
        self.fc1 = nn.Linear(global_widths[-1], hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """xyz, rgb: (..., P, 3) cell units / [0, 1]; center: (..., 3) -> (..., out_dim)."""
        lead, P = xyz.shape[:-2], xyz.shape[-2]
        pos = (xyz - center.unsqueeze(-2)).reshape(-1, P, 3)  # (N, P, 3)
        x = rgb.reshape(-1, P, 3)
        if pos.shape[0] == 0:
            return pos.new_zeros(*lead, self.out_dim)
        scale = pos.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-9)  # (N, 1, 1)
        pos = pos * (0.999999 / scale)
        for layer in self.set_abstractions:
            x, pos = layer(x, pos)
        h = self.global_abstraction(x, pos)  # (N, 1024)
        h = F.relu(self.fc2(F.relu(self.fc1(h))))  # (N, out_dim)
        return h.view(*lead, self.out_dim)


def build_pointnet(arch: str, out_dim: int) -> nn.Module:
    """``arch`` ('mlp' or 'pointnet2') -> the PointNet with ``out_dim`` output features."""
    if arch == "mlp":
        return PointNet(out_dim=out_dim)
    if arch == "pointnet2":
        return PointNet2(out_dim=out_dim)
    raise ValueError(f"unknown pointnet_arch {arch!r}; choose from {POINTNET_ARCHS}")


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
        pointnet_arch: str = "mlp",
        pointnet_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        unknown = set(use_features) - set(OBJECT_FEATURES)
        if unknown:
            raise ValueError(f"unknown object features {sorted(unknown)}; choose from {OBJECT_FEATURES}")
        self.use_features = tuple(use_features)
        self.pointnet_arch = pointnet_arch
        self.pointnet = build_pointnet(pointnet_arch, pointnet_dim)
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
        """Load PointNet weights with ``strict=True``: a file written by
        ``python -m spatialoc_ros.models.convert_pointnet``, the release's PointNet file itself
        (read safely, see that module), or a state_dict of the 'mlp' PointNet
        (``torch.save(encoder.pointnet.state_dict(), path)``)."""
        from spatialoc_ros.models.convert_pointnet import read_pointnet_file

        if not os.path.isfile(path):
            raise FileNotFoundError(f"PointNet weights {path!r} do not exist")
        weights = read_pointnet_file(path)
        if weights.arch != self.pointnet_arch:
            raise ValueError(
                f"{path!r} holds a {weights.arch!r} PointNet but this encoder's pointnet_arch is "
                f"{self.pointnet_arch!r}; set pointnet_arch={weights.arch!r} (or leave it None: the file decides)"
            )
        try:
            self.pointnet.load_state_dict(weights.state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"{path!r} does not match this PointNet: the file's is {weights.out_dim}-d, this one "
                f"pointnet_dim={self.pointnet.out_dim} (set pointnet_dim={weights.out_dim}): "
                f"{str(err).splitlines()[0]}"
            ) from err

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
