"""CIFAR ResNet (He et al., 2016, §4.2): 3x3 stem, three stages of BasicBlocks, global pooling, linear head.

Module names and shapes follow upstream mdistiller (and RepDistiller) so that the released teacher checkpoints load
strictly. No op is in-place, so every tensor returned in `feats` can be backpropagated through.
"""
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs plus shortcut; the last block of a stage also returns its pre-ReLU sum (for OFD/ReviewKD)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, is_last: bool = False
    ):
        super().__init__()
        self.is_last = is_last
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + residual
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """`depth` = 6n+2 BasicBlock ResNet; `num_filters` = [stem, stage1, stage2, stage3] widths."""

    def __init__(self, depth: int, num_filters: List[int], num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth={depth}: expected 6n+2 (8, 14, 20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        # Upstream uses AvgPool2d(8), identical at 32x32; adaptive pooling also serves 64x64 inputs.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)
        self.stage_channels = num_filters

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=(blocks == 1))]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, is_last=(i == blocks - 1)) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def get_stage_channels(self) -> List[int]:
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1(f0)
        f2, f2_pre = self.layer2(f1)
        f3, f3_pre = self.layer3(f2)
        avg = self.avgpool(f3).flatten(1)
        out = self.fc(avg)
        feats = {
            "feats": [f0, f1, f2, f3],
            "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
            "pooled_feat": avg,
            "gap_feat": f3,
        }
        return out, feats


def resnet8(**kwargs) -> ResNet:
    return ResNet(8, [16, 16, 32, 64], **kwargs)


def resnet14(**kwargs) -> ResNet:
    return ResNet(14, [16, 16, 32, 64], **kwargs)


def resnet20(**kwargs) -> ResNet:
    return ResNet(20, [16, 16, 32, 64], **kwargs)


def resnet32(**kwargs) -> ResNet:
    return ResNet(32, [16, 16, 32, 64], **kwargs)


def resnet44(**kwargs) -> ResNet:
    return ResNet(44, [16, 16, 32, 64], **kwargs)


def resnet56(**kwargs) -> ResNet:
    return ResNet(56, [16, 16, 32, 64], **kwargs)


def resnet110(**kwargs) -> ResNet:
    return ResNet(110, [16, 16, 32, 64], **kwargs)


def resnet8x4(**kwargs) -> ResNet:
    return ResNet(8, [32, 64, 128, 256], **kwargs)


def resnet32x4(**kwargs) -> ResNet:
    return ResNet(32, [32, 64, 128, 256], **kwargs)
