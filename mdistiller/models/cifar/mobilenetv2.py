"""CIFAR MobileNetV2 (Sandler et al., 2018) with upstream mdistiller's module names (`conv1`, `blocks`, `conv2`,
`classifier.0`); `mobile_half` is the width-0.5, expansion-6 student of the KD benchmarks.

Upstream returns no `preact_feats`; here `preact_feats[0]` is the stem's BN output before its ReLU and the other four
are the stage outputs themselves, since a linear bottleneck ends without an activation. No op is in-place, so every
tensor returned in `feats` can be backpropagated through.
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

__all__ = ["MobileNetV2", "mobilenetv2_T_w", "mobile_half"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride={stride}: expected 1 or 2")
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        hidden = inp * expand_ratio
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Expansion `T` for all but the first stage, channel width `width_mult`, `feature_dim` classes."""

    def __init__(self, T: int, feature_dim: int, width_mult: float = 1.0):
        super().__init__()
        # expansion t, channels c, repeats n, first stride s
        self.inverted_residual_setting = [
            [1, 16, 1, 1],
            [T, 24, 2, 1],
            [T, 32, 3, 2],
            [T, 64, 4, 2],
            [T, 96, 3, 1],
            [T, 160, 3, 2],
            [T, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList([])
        for t, c, n, s in self.inverted_residual_setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
        # Upstream uses AvgPool2d(input_size // 16, ceil_mode=True), identical at 32x32; this serves any input size.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.stage_channels = [int(c * width_mult) for c in (32, 24, 32, 96, 320)]
        self._initialize_weights()

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.blocks])

    def get_stage_channels(self) -> List[int]:
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        f0_pre = self.conv1[1](self.conv1[0](x))
        f0 = self.conv1[2](f0_pre)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        gap = self.conv2(f4)
        avg = self.avgpool(gap).flatten(1)
        out = self.classifier(avg)
        feats = {
            "feats": [f0, f1, f2, f3, f4],
            "preact_feats": [f0_pre, f1, f2, f3, f4],
            "pooled_feat": avg,
            "gap_feat": gap,
        }
        return out, feats

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


def mobilenetv2_T_w(T: int, W: float, feature_dim: int = 100) -> MobileNetV2:
    return MobileNetV2(T=T, feature_dim=feature_dim, width_mult=W)


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return mobilenetv2_T_w(6, 0.5, num_classes)
