"""BatchNorm as the explanation engine folds and recomputes it: one test for what counts as a BatchNorm, its
per-channel affine map and its output, always from the live parameters and never updating a running statistic
(explaining must not change the model; see docs/explain.md, "BatchNorm").
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.fold import FoldedBatchNorm2d

Tensor = torch.Tensor
# a BatchNorm2d, or one that `mdistiller.models.fold` folded into its conv (same state; identity in eval mode)
BATCHNORMS = (nn.BatchNorm2d, FoldedBatchNorm2d)


def is_batchnorm(module: Optional[nn.Module]) -> bool:
    """The one BatchNorm test of `mdistiller.explain`: folded BatchNorms count, so folded teachers explain alike."""
    return isinstance(module, BATCHNORMS)


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether `bn` normalises with the batch's statistics (train mode, or no running statistics at all)."""
    return bn.training or bn.running_mean is None


class BatchMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of a [N, C, ...] tensor, as BatchNorm computes them in train mode.

    Two passes (the mean, then the mean squared deviation: as exact as `var_mean`, several times faster on CPU),
    and only the input is kept for the backward, which the model's own BatchNorm keeps anyway."""

    @staticmethod
    def forward(ctx, pre: Tensor) -> Tuple[Tensor, Tensor]:
        dims = [0] + list(range(2, pre.dim()))
        mean = pre.mean(dims)
        deviation = pre - channel_view(mean, pre)
        ctx.save_for_backward(pre, mean)
        return mean, (deviation * deviation).mean(dims)

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
        pre, mean = ctx.saved_tensors
        count = pre.numel() // pre.shape[1]
        deviation = pre - channel_view(mean, pre)
        return channel_view(grad_mean / count, pre) + deviation * channel_view(grad_var * (2 / count), pre)


def channel_view(per_channel: Tensor, like: Tensor) -> Tensor:
    """A [C] tensor shaped to broadcast over the channels of `like` ([N, C, ...])."""
    return per_channel.view(1, -1, *[1] * (like.dim() - 2))


def bn_affine(bn: nn.Module, pre: Optional[Tensor], batch_stats: bool) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of a BatchNorm as it normalised `pre` (not needed with running statistics)."""
    if batch_stats:
        mean, var = BatchMoments.apply(pre)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    return scale, shift if bn.bias is None else shift + bn.bias


def batch_norm(bn: nn.Module, pre: Tensor, batch_stats: bool) -> Tensor:
    """The BN's output for input `pre`, as the model computed it; running statistics are never updated."""
    mean, var = (None, None) if batch_stats else (bn.running_mean, bn.running_var)
    return F.batch_norm(pre, mean, var, bn.weight, bn.bias, batch_stats, 0.0, bn.eps)
