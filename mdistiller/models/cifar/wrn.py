"""Wide ResNet (Zagoruyko & Komodakis, 2016) with pre-activation blocks, as in upstream mdistiller.

Module names and shapes follow upstream so the released wrn_40_2 teacher loads strictly. Differences that do not
change the logits: pooling is adaptive (64x64 inputs work), no op is in-place, and each BatchNorm runs once per
forward (upstream re-applies three of them to build `preact_feats`, which updated their running statistics twice
per training step). `gap_feat` is relu(bn1(f3)), the map the classifier actually pools.
"""
import math
from typing import Dict, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class BasicBlock(nn.Module):
    """BN-ReLU-conv x2; when the width or stride changes the 1x1 shortcut reads the pre-activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        preact = self.bn1(x)
        act = self.relu1(preact)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        out = (x if self.equalInOut else self.convShortcut(act)) + out
        return (out, preact) if return_preact else out


class NetworkBlock(nn.Module):
    """One stage of `nb_layers` blocks; `return_preact` also returns the first block's bn1 output (OFD's target)."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, block: type, stride: int, dropRate: float = 0.0
    ):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
                for i in range(nb_layers)
            ]
        )

    def forward(
        self, x: torch.Tensor, return_preact: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if not return_preact:
            return self.layer(x)
        out, preact = self.layer[0](x, return_preact=True)
        for block in list(self.layer)[1:]:
            out = block(out)
        return out, preact


class WideResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widen_factor: int = 1, dropRate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth={depth}: expected 6n+4 (16, 22, 28, 40, ...)")
        n = (depth - 4) // 6
        nChannels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, nChannels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, nChannels[0], nChannels[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, nChannels[1], nChannels[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, nChannels[2], nChannels[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(nChannels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(nChannels[3], num_classes)
        self.nChannels = nChannels[3]
        self.stage_channels = nChannels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def get_stage_channels(self) -> List[int]:
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2, f1_pre = self.block2(f1, return_preact=True)
        f3, f2_pre = self.block3(f2, return_preact=True)
        f3_pre = self.bn1(f3)
        gap = self.relu(f3_pre)
        avg = self.avgpool(gap).flatten(1)
        out = self.fc(avg)
        feats = {
            "feats": [f0, f1, f2, f3],
            "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
            "pooled_feat": avg,
            "gap_feat": gap,
        }
        return out, feats


def wrn_40_2(**kwargs) -> WideResNet:
    return WideResNet(depth=40, widen_factor=2, **kwargs)


def wrn_40_1(**kwargs) -> WideResNet:
    return WideResNet(depth=40, widen_factor=1, **kwargs)


def wrn_16_2(**kwargs) -> WideResNet:
    return WideResNet(depth=16, widen_factor=2, **kwargs)


def wrn_16_1(**kwargs) -> WideResNet:
    return WideResNet(depth=16, widen_factor=1, **kwargs)
