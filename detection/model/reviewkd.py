"""ReviewKD for FPN features (Chen et al., CVPR 2021): attention-based fusion (ABF) over rectangular FPN maps; the
hierarchical context loss is the classification one (`mdistiller.distillers.ReviewKD.hcl_loss`)."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mdistiller.distillers.ReviewKD import hcl_loss

__all__ = ["ABF", "ReviewKDFusion", "hcl_loss"]


class ABF(nn.Module):
    """Maps one student level to the teacher's width, fused with the (upsampled) residual of the coarser level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, :1] + residual * att[:, 1:]
        return self.conv2(x), x


class ReviewKDFusion(nn.Module):
    """Fuses student levels from coarse to fine, so each output also "reviews" every coarser student level."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int):
        super().__init__()
        last = len(in_channels) - 1
        # Stored finest-first; the coarsest level has nothing to fuse with.
        self.abfs = nn.ModuleList(
            ABF(c_in, mid_channels, c_out, fuse=i < last)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))
        )

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        outputs = [None] * len(features)
        residual = None
        for level in reversed(range(len(features))):
            outputs[level], residual = self.abfs[level](features[level], residual)
        return outputs
