"""BatchNorm statistics over the global batch of a distributed run, on any backend.

In a torchrun run every process holds a slice of the global batch; a plain BatchNorm would
normalise each slice with its own statistics, so the result (and the coarse model's centring,
:class:`spatialoc_ros.models.layers.MaskedBatchNorm`, which the in-batch ranking losses see
directly) would depend on the number of processes. ``torch.nn.SyncBatchNorm`` fixes that on GPUs
only; :class:`GlobalBatchNorm1d` does it with two autograd-aware all-reduces (the sum, then the
squared deviations from the global mean, with the row count), so it also works on gloo / CPU.

:func:`use_global_batch_norm` switches a model's layers in place by changing their class (the new
classes add no state): parameters, buffers, optimiser references and state_dict keys stay as
they are, and in eval mode (validation, inference) the layers compute exactly what they did.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from spatialoc_ros.models.layers import MaskedBatchNorm
from spatialoc_ros.training.distributed import autograd_all_reduce_sum as _all_reduce_sum


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d on rows (N, C) whose training statistics are those of the rows of every
    process (the processes' N may differ, even be 0). As the project's BatchNorm layers do, a
    global batch of fewer than 2 rows is normalised with the running statistics (and not
    counted). Eval mode: plain BatchNorm1d, no communication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(f"GlobalBatchNorm1d takes rows (N, C), got shape {tuple(x.shape)}")
        count = x.new_full((1,), float(x.shape[0]))
        totals = _all_reduce_sum(torch.cat([x.sum(dim=0), count]))
        n = float(totals[-1].detach())
        if n < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        mean = totals[:-1] / n
        var = _all_reduce_sum((x - mean).square().sum(dim=0)) / n
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1.0 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1.0 - f).add_(var.detach() * (n / (n - 1.0)), alpha=f)
        return out


class GlobalMaskedBatchNorm(MaskedBatchNorm):
    """MaskedBatchNorm whose statistics are those of the real entries of every process (its
    ``norm`` is a :class:`GlobalBatchNorm1d`, which also decides the fewer-than-2-rows case on
    the global count, so every process takes the same branch)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return self.norm(x.reshape(-1, x.shape[-1])).view_as(x)
        out = x.new_zeros(x.shape)
        out[mask] = self.norm(x[mask])
        return out


def use_global_batch_norm(model: nn.Module) -> nn.Module:
    """Switch every BatchNorm1d (subclasses included) and MaskedBatchNorm of ``model`` to its
    global-batch form, in place; returns ``model``. Refuses other BatchNorm kinds."""
    for name, module in model.named_modules():
        if isinstance(module, MaskedBatchNorm):
            module.__class__ = GlobalMaskedBatchNorm
        elif isinstance(module, nn.BatchNorm1d):
            module.__class__ = GlobalBatchNorm1d
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):  # BatchNorm2d / 3d, SyncBatchNorm
            raise TypeError(f"{name or 'the model'} is a {type(module).__name__}: global-batch statistics "
                            "are implemented for BatchNorm1d and MaskedBatchNorm only")
    return model
