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
import threading
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
#: Objects per chunk of the 'mlp' PointNet without autograd (per-point tensors of a few MB).
NO_GRAD_CHUNK_OBJECTS = 256

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
#: Width of the release's ``lin2``, the object feature (its file sets ``pointnet_dim`` to it).
RELEASE_OUT_DIM = 256
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
        self._linears = [m for m in self.point_mlp if isinstance(m, nn.Linear)]
        assert len(self.point_mlp) == 2 * len(self._linears), "forward reads point_mlp as Linear, ReLU pairs"

    def forward(self, xyz: torch.Tensor, rgb: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """xyz, rgb: (..., P, 3) cell units / [0, 1]; center: (..., 3) -> (..., out_dim).

        ``point_mlp`` then the max over the points, with the last Linear's bias and ReLU after the
        max (``max_p(a_p + b) = max_p(a_p) + b`` and ReLU does not decrease, so both commute with
        the max): the widest per-point tensor is written once, and the ReLUs run in place. Without
        autograd, objects go through in chunks of ``NO_GRAD_CHUNK_OBJECTS``, so that the per-point
        tensors stay in the CPU's cache (1.6x faster here for the same values)."""
        rows = xyz.shape[:-2].numel()
        if rows > NO_GRAD_CHUNK_OBJECTS and not torch.is_grad_enabled():
            lead, P = xyz.shape[:-2], xyz.shape[-2]
            xyz, rgb, center = xyz.reshape(rows, P, 3), rgb.reshape(rows, P, 3), center.reshape(rows, 3)
            out = xyz.new_empty(rows, self.out_dim)
            for s in range(0, rows, NO_GRAD_CHUNK_OBJECTS):
                e = s + NO_GRAD_CHUNK_OBJECTS
                out[s:e] = self._points_max(xyz[s:e], rgb[s:e], center[s:e])
            return out.view(*lead, self.out_dim)
        return self._points_max(xyz, rgb, center)

    def _points_max(self, xyz: torch.Tensor, rgb: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        h = torch.cat([xyz - center.unsqueeze(-2), rgb], dim=-1)  # (..., P, 6)
        for linear in self._linears[:-1]:
            h = F.linear(h, linear.weight, linear.bias).relu_()
        last = self._linears[-1]
        h = F.linear(h, last.weight)
        # amax is the faster reduction, max's backward (one index per channel) the faster gradient
        peak = h.max(dim=-2).values if torch.is_grad_enabled() else h.amax(dim=-2)
        return (peak + last.bias).relu_()  # (..., out_dim)


class _PointBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over rows (N, C); a training batch of one row uses the running statistics
    (plain BatchNorm1d refuses it, and one object with few points can give a single row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        return super().forward(x)

    @torch.no_grad()
    def batch_factor(self, rows: int) -> Optional[float]:
        """None when ``forward`` would normalise ``rows`` rows with the running statistics; else
        the running-statistics update factor, the batch counted as ``forward`` counts it."""
        if not self.training or rows < 2:
            return None
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)


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
    step takes the point farthest from those already taken (squared distances, written into
    buffers reused across the steps)."""
    N, P, _ = pos.shape
    chosen = torch.zeros(N, count, dtype=torch.long, device=pos.device)
    nearest = torch.full((N, P), float("inf"), device=pos.device, dtype=pos.dtype)
    offset, d2 = torch.empty_like(pos), torch.empty_like(nearest)
    last = torch.zeros(N, 1, 1, dtype=torch.long, device=pos.device)
    for i in range(1, count):
        torch.sub(pos, pos.gather(1, last.expand(N, 1, 3)), out=offset)
        torch.sum(offset.square_(), dim=-1, out=d2)  # (N, P)
        torch.minimum(nearest, d2, out=nearest)
        chosen[:, i] = nearest.argmax(dim=1)
        last = chosen[:, i].view(N, 1, 1)
    return chosen


class RowGroups:
    """Rows in consecutive groups, groups of equal size adjacent: the rows of the groups of one
    size form a dense (groups, size, C) block, so a max over each group is torch's max over such
    blocks (ties go to the group's first row), with no padding to the largest group."""

    def __init__(self, sizes: torch.Tensor) -> None:
        """sizes: (S,) long, rows per group in row order, non-decreasing, each >= 1."""
        #: (S,) rows per group
        self.sizes = sizes
        size_values, size_counts = torch.unique_consecutive(sizes, return_counts=True)
        #: ((size, number of groups of that size), ...) in row order
        self.blocks = tuple(zip(size_values.tolist(), size_counts.tolist()))
        self.block_rows = [size * count for size, count in self.blocks]
        self.block_groups = [count for _, count in self.blocks]
        #: (S,) the first row of each group
        self.first_row = torch.cumsum(sizes, dim=0) - sizes

    def views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """rows (E, C) -> one (groups, size, C) view per block."""
        C = rows.shape[-1]
        return [block.view(count, size, C) for block, (size, count) in zip(rows.split(self.block_rows), self.blocks)]

    def max(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (E, C) -> (S, C) max of each group."""
        return torch.cat([view.amax(dim=1) for view in self.views(rows)])

    def argmax(self, rows: torch.Tensor, maxima: torch.Tensor) -> torch.Tensor:
        """rows (E, C) and their ``max`` -> (S, C) flat index into ``rows`` of each group's first
        row at the max (what torch.max(dim) picks; this way is several times faster on a CPU)."""
        at = []
        for view, m in zip(self.views(rows), maxima.split(self.block_groups)):
            size = view.shape[1]
            countdown = torch.arange(size, 0, -1, device=rows.device,  # size - k for row k
                                     dtype=torch.uint8 if size < 256 else torch.int32).view(1, size, 1)
            at.append(size - ((view == m.unsqueeze(1)) * countdown).amax(dim=1).long())
        row = torch.cat(at) + self.first_row.unsqueeze(1)  # (S, C)
        return row * rows.shape[-1] + torch.arange(rows.shape[-1], device=rows.device)

    def add_per_group(self, rows: torch.Tensor, per_group: torch.Tensor) -> None:
        """rows (E, C) += per_group (S, C), each group's row added to all of its rows, in place."""
        for view, add in zip(self.views(rows), per_group.split(self.block_groups)):
            view.add_(add.unsqueeze(1))

    def sum_per_group(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (E, C) -> (S, C) sums over each group's rows."""
        return torch.cat([view.sum(dim=1) for view in self.views(rows)])


#: Capacity a reused row buffer of :class:`RowWorkspace` gets over the rows asked for when it has
#: to grow (the batches of a training run differ in size).
WORKSPACE_HEADROOM = 1.25


class RowWorkspace:
    """Row buffers of one layer's :class:`_PointMLPMax`, kept from one call to the next.

    On a CPU every fresh big tensor is paid in page faults at its first write: a BatchNorm over
    310,579 x 256 rows takes 301 ms into a fresh tensor and 85 ms into one already written, a
    gather 195 ms against 50 ms. So the per-member rows of a set abstraction (0.3-2 M rows a
    batch) are written into buffers that live as long as the layer.

    A call holds the buffers (a lease) from its forward to the end of its backward, or until its
    graph is freed, or to the end of its forward when no backward can come. A call that finds them
    held (a second forward before the first one's backward, another thread) gets fresh tensors:
    same values, old speed. CUDA tensors always get fresh ones (CUDA's caching allocator already
    reuses memory)."""

    def __init__(self) -> None:
        self._buffers: dict = {}
        self._held = False
        self._lock = threading.Lock()

    def lease(self, device: torch.device) -> Optional["_Lease"]:
        """The buffers for one call, or None (not a CPU, or held by another call)."""
        if device.type != "cpu":
            return None
        with self._lock:
            if self._held:
                return None
            self._held = True
        return _Lease(self)

    def _release(self) -> None:
        with self._lock:
            self._held = False

    def _rows(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < rows * cols:
            self._buffers[key] = None  # the old one goes before the new one is written
            buf = self._buffers[key] = like.new_empty(int(rows * cols * WORKSPACE_HEADROOM))
        return buf[:rows * cols].view(rows, cols)

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values() if b is not None)

    def __reduce__(self):
        return (RowWorkspace, ())  # a copied or pickled layer gets its own, empty buffers


class _Lease:
    """One call's hold on a :class:`RowWorkspace` (see there); released once, at the latest
    when the lease is garbage-collected with the call's autograd graph."""

    def __init__(self, workspace: RowWorkspace) -> None:
        self._workspace: Optional[RowWorkspace] = workspace

    def rows(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) tensor of ``like``'s dtype in the buffer ``name`` (its old values)."""
        assert self._workspace is not None, "a released lease hands out no buffers"
        return self._workspace._rows(name, rows, cols, like)

    def release(self) -> None:
        if self._workspace is not None:
            self._workspace._release()
            self._workspace = None

    def __del__(self) -> None:
        self.release()


def _new_rows(lease: Optional[_Lease], name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """(rows, cols) uninitialised: from the lease's buffers, or fresh without one."""
    if lease is None:
        return like.new_empty(rows, cols)
    return lease.rows(name, rows, cols, like)


def _mlp_parameters(blocks: Sequence[_LinearNormReLU]) -> list[nn.Parameter]:
    """The parameters :class:`_PointMLPMax` takes: every BatchNorm's weight and bias, and the
    weight and bias of every Linear but the first."""
    params = []
    for i, block in enumerate(blocks):
        if i > 0:
            params += [block.linear.weight, block.linear.bias]
        params += [block.norm.weight, block.norm.bias]
    return params


class _PointMLPMax(torch.autograd.Function):
    """A :func:`_norm_mlp` on gathered rows, then the max over groups of rows (:class:`RowGroups`).

    Input rows: ``table[members] + per_group`` (each group's row added to all of its rows), the
    first Linear's output (``members`` None: ``table`` itself). Then ReLU(BatchNorm(.)) and the
    next Linear, block after block; the last block's BatchNorm and ReLU come after the max: with
    ``sign`` the sign of its BatchNorm weight (+1 where it is 0), BatchNorm of ``x = sign * h`` is
    ``s x + t`` per channel with ``s = |weight| / sqrt(var + eps) >= 0``, ReLU does not decrease,
    so the max over a group of ReLU(s x + t) is ReLU(s x* + t) with x* the group's max of x; the
    last Linear computes x directly (its weight and bias times ``sign``), and the normalised rows
    are never written. BatchNorm statistics, running-statistics updates and the fall-back to the
    running statistics are those of :class:`_PointBatchNorm`.

    Forward and backward are written out so that the backward reuses the forward's row buffers
    (fresh memory is paid in page faults on a CPU); hence one backward per forward: a second one
    (``retain_graph``) raises. With a ``workspace`` (:class:`RowWorkspace`) the per-member rows
    are written into buffers kept from call to call, BatchNorm's backward included
    (:func:`_batch_norm_backward_in_place`); gradients handed back are never such buffers.
    ``backward_coming`` False (no gradient wanted) releases the buffers at the end of the forward.
    """

    @staticmethod
    def forward(ctx, table, per_group, members, groups: RowGroups, blocks, workspace, backward_coming, *params):
        norms = [block.norm for block in blocks]
        lease = None if workspace is None else workspace.lease(table.device)
        if members is None:
            rows = table  # (E, w1)
        else:
            rows = torch.index_select(table, 0, members,
                                      out=_new_rows(lease, "rows", members.numel(), table.shape[1], table))
        if per_group is not None:
            groups.add_per_group(rows, per_group)
        E = rows.shape[0]
        last = norms[-1]
        sign = torch.where(last.weight >= 0, 1.0, -1.0).to(rows.dtype)
        saved, pre = [], rows
        for i, norm in enumerate(norms[:-1]):
            factor = norm.batch_factor(E)
            a, save_mean, save_invstd = torch.ops.aten.native_batch_norm.out(
                pre, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                factor is not None, 0.0 if factor is None else factor, norm.eps,
                out=_new_rows(lease, f"a{i}", E, pre.shape[1], pre),
                save_mean=pre.new_empty(pre.shape[1]), save_invstd=pre.new_empty(pre.shape[1]))
            a = a.relu_()
            saved.append((pre, a, save_mean, save_invstd, factor is not None))
            linear = blocks[i + 1].linear
            out_rows = _new_rows(lease, f"pre{i + 1}", E, linear.out_features, a)
            if i + 1 < len(blocks) - 1:
                pre = torch.addmm(linear.bias, a, linear.weight.t(), out=out_rows)
            else:
                pre = torch.addmm(linear.bias * sign, a, (linear.weight * sign.unsqueeze(1)).t(), out=out_rows)
        x = pre if len(blocks) > 1 else pre * sign  # (E, C), sign times the last Linear's output
        factor = last.batch_factor(E)
        if factor is None:
            mean, var = sign * last.running_mean, last.running_var
        else:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)  # BatchNorm's statistics
            last.running_mean.mul_(1.0 - factor).add_(sign * mean, alpha=factor)
            last.running_var.mul_(1.0 - factor).add_(var, alpha=factor * E / (E - 1))
        invstd = torch.rsqrt(var + last.eps)
        scale = last.weight * sign * invstd  # (C,) >= 0
        picked = groups.max(x)  # (S, C)
        out = torch.relu((picked - mean) * scale + last.bias)
        if not backward_coming:
            if lease is not None:
                lease.release()
            return out
        ctx.blocks, ctx.groups, ctx.members, ctx.table_shape = blocks, groups, members, table.shape
        ctx.has_per_group, ctx.batch_stats = per_group is not None, factor is not None
        ctx.rows, ctx.saved, ctx.x, ctx.lease = rows, saved, x, lease
        # the ReLU's mask, not ``out`` itself: an output kept on ctx would be a reference cycle
        # (output -> its grad_fn -> ctx -> output) that outlives a graph dropped without backward
        ctx.positive = out > 0
        ctx.picked, ctx.mean, ctx.invstd, ctx.scale, ctx.sign = picked, mean, invstd, scale, sign
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.x is None:
            raise RuntimeError("_PointMLPMax's backward reuses its buffers: it runs once per forward")
        blocks, x, sign, invstd = ctx.blocks, ctx.x, ctx.sign, ctx.invstd
        E, C = x.shape
        at = ctx.groups.argmax(x, ctx.picked)  # before x is overwritten
        grads = []  # per block, in reverse: (linear weight, linear bias)?, (norm weight, norm bias)
        # last BatchNorm + ReLU after the max
        grad = grad * ctx.positive
        centred = ctx.picked - ctx.mean
        grad_picked = grad * ctx.scale  # (S, C)
        last_norm = [(grad * centred).sum(0) * invstd * sign, grad.sum(0)]
        if ctx.batch_stats:  # mean and var are functions of every row
            grad_mean = -grad_picked.sum(0)
            grad_var = -0.5 * invstd * invstd * (grad_picked * centred).sum(0)
            slope = 2.0 * grad_var / E  # d var / d x = 2 (x - mean) / E, d mean / d x = 1 / E
            d = x.mul_(slope).add_(grad_mean / E - slope * ctx.mean)  # written over x
        else:
            d = x.zero_()
        d.put_(at, grad_picked, accumulate=True)  # (E, C): gradient of x
        ctx.x = None
        if len(blocks) == 1:
            d = d.mul_(sign)
        grads.append(last_norm)
        for i in range(len(blocks) - 2, -1, -1):
            pre, a, save_mean, save_invstd, train = ctx.saved[i]
            linear, norm = blocks[i + 1].linear, blocks[i].norm
            weight = linear.weight if i + 1 < len(blocks) - 1 else linear.weight * sign.unsqueeze(1)
            grad_weight, grad_bias = d.t().mm(a), d.sum(0)
            if i + 1 == len(blocks) - 1:
                grad_weight, grad_bias = grad_weight * sign.unsqueeze(1), grad_bias * sign
            grads[-1] = [grad_weight, grad_bias] + grads[-1]
            d = torch.mm(d, weight, out=_new_rows(ctx.lease, f"grad{i}", E, weight.shape[1], d))  # gradient of a
            torch.ops.aten.threshold_backward.grad_input(d, a, 0.0, grad_input=d)  # ReLU's, in place
            if ctx.lease is not None and (i > 0 or ctx.members is not None):  # pre is a workspace buffer
                d, grad_norm_weight, grad_norm_bias = _batch_norm_backward_in_place(
                    d, pre, a, norm, save_mean, save_invstd, train)
            else:  # a fresh tensor (the out= form of this op computes into a temporary and copies)
                d, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_batch_norm_backward(
                    d, pre, norm.weight, norm.running_mean, norm.running_var, save_mean, save_invstd,
                    train, norm.eps, [True, True, True])
            grads.append([grad_norm_weight, grad_norm_bias])
        ctx.saved = ctx.rows = None
        grad_per_group = ctx.groups.sum_per_group(d) if ctx.has_per_group else None
        if ctx.members is None:
            grad_table = d
        else:
            grad_table = d.new_zeros(ctx.table_shape).index_add_(0, ctx.members, d)
        if ctx.lease is not None:
            ctx.lease.release()
        param_grads = [g for block_grads in reversed(grads) for g in block_grads]
        return (grad_table, grad_per_group, None, None, None, None, None, *param_grads)


def _batch_norm_backward_in_place(grad, x, out, norm: nn.BatchNorm1d, save_mean, save_invstd, batch_stats: bool):
    """BatchNorm's backward on rows (E, C), with no fresh (E, C) tensor: ``x`` (the input) is
    written over with ``x - mean`` and ``out`` receives the input's gradient; -> (gradient of x
    (``out``), of the weight, of the bias). ``batch_stats``: the forward normalised with the
    batch's statistics (``save_mean``, ``save_invstd``), else with the running ones.

    With ``c = x - mean``, ``r`` the inverse standard deviation, ``g`` the incoming gradient:
    ``dweight = r sum(g c)``, ``dbias = sum(g)``, and ``dx = w r g`` with the running statistics;
    with the batch's, ``dx = w r (g - dbias / E - r c dweight / E)``."""
    E = x.shape[0]
    if batch_stats:
        mean, invstd = save_mean, save_invstd
    else:
        mean, invstd = norm.running_mean, torch.rsqrt(norm.running_var + norm.eps)
    grad_bias = grad.sum(0)
    centred = x.sub_(mean)
    grad_weight = torch.mul(centred, grad, out=out).sum(0).mul_(invstd)
    alpha = norm.weight * invstd
    if not batch_stats:
        return torch.mul(grad, alpha, out=out), grad_weight, grad_bias
    torch.addcmul(-alpha * grad_bias / E, grad, alpha, out=out)
    return out.addcmul_(centred, -alpha * invstd * grad_weight / E), grad_weight, grad_bias


def _mlp_max(blocks: Sequence[_LinearNormReLU], table: torch.Tensor, per_group: Optional[torch.Tensor],
             members: Optional[torch.Tensor], groups: RowGroups,
             workspace: Optional[RowWorkspace] = None) -> torch.Tensor:
    """(S, out): the max over ``groups`` of the MLP ``blocks`` on ``table[members] + per_group``
    (see :class:`_PointMLPMax`; ``table`` and ``per_group`` already went through the first Linear),
    its per-member rows in ``workspace``'s buffers when given (see :class:`RowWorkspace`).

    When a block's BatchNorm is not this module's own (e.g. switched to global-batch statistics for
    a torchrun run, :mod:`spatialoc_ros.training.global_norm`), the blocks run as modules on the
    rows instead, so that their BatchNorm's forward is the one used."""
    if all(type(block.norm) is _PointBatchNorm for block in blocks):
        params = _mlp_parameters(blocks)
        backward_coming = torch.is_grad_enabled() and (
            table.requires_grad or (per_group is not None and per_group.requires_grad)
            or any(p.requires_grad for p in params))
        return _PointMLPMax.apply(table, per_group, members, groups, tuple(blocks), workspace, backward_coming,
                                  *params)
    rows = table if members is None else table.index_select(0, members)  # (E, w1)
    if per_group is not None:
        rows = rows + per_group.repeat_interleave(groups.sizes, dim=0)
    h = F.relu(blocks[0].norm(rows))
    for block in blocks[1:]:
        h = block(h)
    return groups.max(h)


class Balls:
    """The (centre, point) pairs of a set abstraction as one flat list of E rows, ball after ball
    (each ball's members in point order), the balls ordered by size (see :class:`RowGroups`)."""

    def __init__(self, inside: torch.Tensor, num_objects: int) -> None:
        """inside: (N * M, P) bool, the members of each of the N objects' M balls (none empty)."""
        S, P = inside.shape
        sizes_sorted, order = torch.sort(inside.sum(dim=1), stable=True)
        #: (N * M,) the balls in row order
        self.order = order
        ball_rank, point = inside.index_select(0, order).nonzero(as_tuple=True)
        #: (E,) index of each row's point among the N * P points
        self.members = point + order.index_select(0, ball_rank).div(S // num_objects, rounding_mode="floor") * P
        self.groups = RowGroups(sizes_sorted)
        self.position = torch.empty_like(order)  # ball -> its place in ``order``
        self.position[order] = torch.arange(S, device=order.device)

    def restore(self, per_ball: torch.Tensor) -> torch.Tensor:
        """(N * M, C) rows of the balls in row order -> in ball order."""
        return per_ball.index_select(0, self.position)


class SetAbstraction(nn.Module):
    """PointNet++ set abstraction: sample centres, group each centre's ball, shared MLP, max.

    x (N, P, C) point features, pos (N, P, 3) -> (N, M, out) features, (N, M, 3) centres, with
    M = ceil(ratio * P). Each centre's ball holds its ``max_neighbors`` nearest points within
    ``radius`` (the centre itself always among them); the MLP reads (x_j, pos_j - centre).

    The ball members are one flat list of rows (:class:`Balls`), so that the MLP, its BatchNorm
    statistics and the max over each ball see real members only. The first Linear is split by
    linearity, ``W [x_j, pos_j - c] + b = (W [x_j, pos_j] + b) - W_pos c``: it runs once per point
    and once per centre instead of once per member, and its outputs are gathered per member. The
    last block's BatchNorm and ReLU run after the max (:func:`_mlp_max`).
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
        self.workspace = RowWorkspace()

    def balls(self, pos: torch.Tensor, centres: torch.Tensor, centre_index: torch.Tensor) -> Balls:
        """pos (N, P, 3), centres (N, M, 3) = pos at centre_index (N, M) -> the balls' members:
        the points within ``radius``, the ``max_neighbors`` nearest of them where there are more,
        the centre itself always."""
        N, P, _ = pos.shape
        S = centres.shape[1] * N
        d2 = torch.cdist(centres, pos).pow(2).view(S, P)
        inside = d2 <= self.radius ** 2
        inside[torch.arange(S, device=pos.device), centre_index.reshape(S)] = True
        full = (inside.sum(dim=1) > self.max_neighbors).nonzero().squeeze(1)
        if full.numel() > 0:  # a few balls only: the nearest of their members
            nearest = d2.index_select(0, full).topk(self.max_neighbors, dim=1, largest=False).indices
            inside[full] = inside.new_zeros(len(full), P).scatter_(1, nearest, True)
        return Balls(inside, N)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, P, C = x.shape
        M = max(1, math.ceil(self.ratio * P))
        centre_index = farthest_point_sample(pos, M)  # (N, M)
        centres = _gather(pos, centre_index)  # (N, M, 3)
        balls = self.balls(pos, centres, centre_index)
        points = torch.cat([x, pos], dim=-1).view(N * P, C + 3)
        first = self.mlp[0]
        table = first.linear(points)  # (N * P, w1): W [x_j, pos_j] + b
        per_ball = F.linear(-centres.view(N * M, 3), first.linear.weight[:, C:])  # (N * M, w1): -W_pos c
        pooled = _mlp_max(self.mlp, table, per_ball.index_select(0, balls.order), balls.members, balls.groups,
                          self.workspace)
        return balls.restore(pooled).view(N, M, self.out_dim), centres


class GlobalAbstraction(nn.Module):
    """MLP on (features, position) of every remaining point, max over the points: (N, M, C) -> (N, out)."""

    def __init__(self, *, in_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.mlp = _norm_mlp([in_dim + 3, *widths])
        self.out_dim = widths[-1]
        self.workspace = RowWorkspace()

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        N, M, _ = x.shape
        rows = self.mlp[0].linear(torch.cat([x, pos], dim=-1).reshape(N * M, -1))  # (N * M, w1)
        groups = RowGroups(torch.full((N,), M, device=x.device))
        return _mlp_max(self.mlp, rows, None, None, groups, self.workspace)  # (N, out)


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
