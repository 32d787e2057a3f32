"""CIFAR "resnetv2": ImageNet-style ResNet18-152 with a 3x3 stride-1 stem and no max-pool (kuangliu/pytorch-cifar).

Module names and shapes follow upstream mdistiller, so released checkpoints (ResNet50 CIFAR teacher, ResNet18
Tiny-ImageNet teacher) load strictly. Global pooling is adaptive, so 64x64 inputs work. No op is in-place.
"""
from typing import Dict, List, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResNet", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152"]


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential, as upstream) unless the shape changes, then 1x1 conv + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        out = F.relu(self.bn1(self.conv1(x)))
        preact = self.bn2(self.conv2(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = _shortcut(in_planes, self.expansion * planes, stride)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        num_blocks: List[int],
        num_classes: int = 10,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-init of each residual branch's last BN makes blocks start as identities (Goyal et al., 2017).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)
        # Upstream hard-codes [256, 512, 1024, 2048] even for BasicBlock nets; these are the real stage widths.
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

    def _make_layer(
        self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for i, s in enumerate(strides):
            layers.append(block(self.in_planes, planes, s, i == num_blocks - 1))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        last = "bn3" if isinstance(self.layer1[0], Bottleneck) else "bn2"
        return [getattr(layer[-1], last) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def get_stage_channels(self) -> List[int]:
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = self.layer1(f0)
        f2, f2_pre = self.layer2(f1)
        f3, f3_pre = self.layer3(f2)
        f4, f4_pre = self.layer4(f3)
        avg = self.avgpool(f4).flatten(1)
        out = self.linear(avg)
        feats = {
            "feats": [f0, f1, f2, f3, f4],
            "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
            "pooled_feat": avg,
            "gap_feat": f4,
        }
        return out, feats


def ResNet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def ResNet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def ResNet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def ResNet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def ResNet152(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)
