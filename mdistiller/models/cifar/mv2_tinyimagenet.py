"""Full-width MobileNetV2 for Tiny-ImageNet with upstream mdistiller's module names (`pre`, `stageN`, `conv1`, and a
1x1-conv classifier `conv2`).

Unlike upstream, `pooled_feat` is 2-D and `preact_feats` exists: for the stem and the 1280-channel head it is the BN
output before ReLU6, for the linear-bottleneck stages it is the stage output itself. No op is in-place, so every
tensor returned in `feats` can be backpropagated through.
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MobileNetV2", "mobilenetv2_tinyimagenet"]


class LinearBottleNeck(nn.Module):
    """1x1 expand (x`t`), 3x3 depthwise, 1x1 linear projection (all convs with bias); identity shortcut when shape
    is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, t: int = 6):
        super().__init__()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, in_channels * t, 1),
            nn.BatchNorm2d(in_channels * t),
            nn.ReLU6(),
            nn.Conv2d(in_channels * t, in_channels * t, 3, stride=stride, padding=1, groups=in_channels * t),
            nn.BatchNorm2d(in_channels * t),
            nn.ReLU6(),
            nn.Conv2d(in_channels * t, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )
        self.stride = stride
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.stride == 1 and self.in_channels == self.out_channels:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """1x1 stem with padding 1 (64 -> 66 px, as upstream), seven stages, 1x1 conv to 1280, pooling, 1x1-conv head."""

    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 32, 1, padding=1), nn.BatchNorm2d(32), nn.ReLU6())
        self.stage1 = LinearBottleNeck(32, 16, 1, 1)
        self.stage2 = self._make_stage(2, 16, 24, 2, 6)
        self.stage3 = self._make_stage(3, 24, 32, 2, 6)
        self.stage4 = self._make_stage(4, 32, 64, 2, 6)
        self.stage5 = self._make_stage(3, 64, 96, 1, 6)
        self.stage6 = self._make_stage(3, 96, 160, 1, 6)
        self.stage7 = LinearBottleNeck(160, 320, 1, 6)
        self.conv1 = nn.Sequential(nn.Conv2d(320, 1280, 1), nn.BatchNorm2d(1280), nn.ReLU6())
        self.conv2 = nn.Conv2d(1280, num_classes, 1)

    @staticmethod
    def _make_stage(repeat: int, in_channels: int, out_channels: int, stride: int, t: int) -> nn.Sequential:
        layers = [LinearBottleNeck(in_channels, out_channels, stride, t)]
        layers += [LinearBottleNeck(out_channels, out_channels, 1, t) for _ in range(repeat - 1)]
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Conv2d:
        """The 1x1-conv head (weight [K, 1280, 1, 1], kept as a conv so upstream checkpoints load)."""
        return self.conv2

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        f0_pre = self.pre[1](self.pre[0](x))
        f0 = self.pre[2](f0_pre)
        f1 = self.stage2(self.stage1(f0))
        f2 = self.stage3(f1)
        f3 = self.stage4(f2)
        x = self.stage7(self.stage6(self.stage5(f3)))
        f4_pre = self.conv1[1](self.conv1[0](x))
        f4 = self.conv1[2](f4_pre)
        pooled = F.adaptive_avg_pool2d(f4, 1)
        out = self.conv2(pooled).flatten(1)
        feats = {
            "feats": [f0, f1, f2, f3, f4],
            "preact_feats": [f0_pre, f1, f2, f3, f4_pre],
            "pooled_feat": pooled.flatten(1),
            "gap_feat": f4,
        }
        return out, feats


def mobilenetv2_tinyimagenet(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)
