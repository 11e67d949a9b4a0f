"""Synchronised BatchNorm for CPU (gloo) DDP runs: torch's SyncBatchNorm accepts GPU inputs only.

Batch statistics are all-reduced with the differentiable ``torch.distributed.nn.functional.all_reduce``,
so autograd itself produces the exact gradient through the global mean and variance (its backward
sums every rank's contribution), the same gradient torch's GPU SyncBatchNorm computes by hand.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce as _all_reduce


def all_reduce(t):
    # deprecated in favour of the functional collectives, which have no autograd on gloo/CPU yet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _all_reduce(t)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"CPUSyncBatchNorm expects (N, C, ...) input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        # two passes (mean, then squared deviations) stay accurate where E[x^2] - mean^2 would cancel
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        return y


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm*d in ``module`` by a CPUSyncBatchNorm with the same parameters and buffers."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        for p_new, p_old in zip(out.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
    for name, child in module.named_children():
        out.add_module(name, convert_cpu_sync_batchnorm(child))
    return out


__all__ = ["CPUSyncBatchNorm", "convert_cpu_sync_batchnorm"]
