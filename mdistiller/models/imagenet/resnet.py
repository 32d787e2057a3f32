"""ImageNet ResNets with torchvision's module names, so torchvision's weights load strictly and give the same logits.

As in upstream mdistiller, each block applies the ReLU of its input at its start instead of at its end, so the
pre-activation stage outputs (for OFD/ReviewKD) exist as tensors; the function computed is torchvision's. No op is
in-place, so every tensor returned in `feats` can be backpropagated through.
"""
import os
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]

# torchvision's IMAGENET1K_V1 file names (the weights upstream used), then upstream's older names for the same weights.
_WEIGHT_FILES = {
    "resnet18": ("resnet18-f37072fd.pth", "resnet18-5c106cde.pth"),
    "resnet34": ("resnet34-b627a593.pth", "resnet34-333f7ec4.pth"),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
    "resnet152": ("resnet152-394f9c45.pth", "resnet152-b121ed2d.pth"),
}
_WEIGHT_URL = "https://download.pytorch.org/models/"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(x) -> two 3x3 convs + shortcut; returns the sum before its ReLU (applied by the next block or head)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + residual


class Bottleneck(nn.Module):
    """relu(x) -> 1x1, 3x3 (strided), 1x1 x4 + shortcut; returns the sum before its ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + residual


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max-pool, four stages (strides 1,2,2,2), global average pooling, `fc`."""

    def __init__(self, block: Block, layers: List[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        # Upstream uses AvgPool2d(7), identical at 224x224; adaptive pooling also serves other input sizes.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.stage_channels = [c * block.expansion for c in (64, 128, 256, 512)]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """The last BN of stages 2-4 (upstream returns these three, not stage 1's)."""
        return [layer[-1].bn3 if isinstance(layer[-1], Bottleneck) else layer[-1].bn2
                for layer in (self.layer2, self.layer3, self.layer4)]

    def get_stage_channels(self) -> List[int]:
        """Output channels of the four stages; upstream hard-codes [256, 512, 1024, 2048], wrong for ResNet18/34."""
        return self.stage_channels

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        stem = self.bn1(self.conv1(x))
        feat1 = self.layer1(self.maxpool(self.relu(stem)))
        feat2 = self.layer2(feat1)
        feat3 = self.layer3(feat2)
        feat4 = self.layer4(feat3)
        gap = F.relu(feat4)
        avg = self.avgpool(gap).flatten(1)
        out = self.fc(avg)
        feats = {
            "feats": [F.relu(stem), F.relu(feat1), F.relu(feat2), F.relu(feat3), gap],
            "preact_feats": [stem, feat1, feat2, feat3, feat4],
            "pooled_feat": avg,
            "gap_feat": gap,
        }
        return out, feats


def _load_torchvision_weights(model: ResNet, arch: str) -> None:
    """Load torchvision's ImageNet weights from the torch hub cache; never downloads."""
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    names = _WEIGHT_FILES[arch]
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            return
    raise FileNotFoundError(
        f"{arch}(pretrained=True) needs torchvision's ImageNet weights {names[0]}: download {_WEIGHT_URL}{names[0]} "
        f"and put it at {os.path.join(directory, names[0])}"
    )


def _resnet(arch: str, block: Block, layers: List[int], pretrained: bool, **kwargs) -> ResNet:
    model = ResNet(block, layers, **kwargs)
    if pretrained:
        _load_torchvision_weights(model, arch)
    return model


def resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], pretrained, **kwargs)


def resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], pretrained, **kwargs)


def resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], pretrained, **kwargs)


def resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], pretrained, **kwargs)


def resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], pretrained, **kwargs)
