"""CIFAR VGG with BatchNorm, five conv blocks and a single linear head, as in upstream mdistiller (RepDistiller).

Each block ends with its last BatchNorm (the ReLU is applied in `forward`, so the pre-activation is exposed).
Max-pools follow blocks 0-2; pool3 runs only for 64x64 inputs (upstream's rule); the final pooling is adaptive.
No op is in-place.
"""
import math
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VGG", "vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

cfg = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}


def _make_block(widths: List[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    """conv3x3 [+ BN] + ReLU per width, minus the trailing ReLU."""
    layers: List[nn.Module] = []
    for width in widths:
        layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: List[List[int]], batch_norm: bool = False, num_classes: int = 1000):
        super().__init__()
        self.block0 = _make_block(cfg[0], batch_norm, 3)
        self.block1 = _make_block(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = _make_block(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = _make_block(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = _make_block(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self.stage_channels = [c[-1] for c in cfg]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.data.normal_(0, 0.01)
                m.bias.data.zero_()

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList(
            [
                self.block0,
                self.pool0,
                self.block1,
                self.pool1,
                self.block2,
                self.pool2,
                self.block3,
                self.pool3,
                self.block4,
                self.pool4,
            ]
        )

    def get_bn_before_relu(self) -> List[nn.Module]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def get_stage_channels(self) -> List[int]:
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        f4_pre = self.block4(self.pool3(f3) if h == 64 else f3)
        f4 = F.relu(f4_pre)
        avg = self.pool4(f4).flatten(1)
        out = self.classifier(avg)
        feats = {
            "feats": [f0, f1, f2, f3, f4],
            "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
            "pooled_feat": avg,
            "gap_feat": f4,
        }
        return out, feats


def vgg8_bn(**kwargs) -> VGG:
    return VGG(cfg["S"], batch_norm=True, **kwargs)


def vgg11_bn(**kwargs) -> VGG:
    return VGG(cfg["A"], batch_norm=True, **kwargs)


def vgg13_bn(**kwargs) -> VGG:
    return VGG(cfg["B"], batch_norm=True, **kwargs)


def vgg16_bn(**kwargs) -> VGG:
    return VGG(cfg["D"], batch_norm=True, **kwargs)


def vgg19_bn(**kwargs) -> VGG:
    return VGG(cfg["E"], batch_norm=True, **kwargs)
