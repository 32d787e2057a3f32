"""MobileNetV1 (Howard et al., 2017) for ImageNet, with upstream mdistiller's module names (`model.N`, `fc`).

Stage outputs are taken before their last ReLU (the pre-activations OFD/ReviewKD need); no op is in-place, so every
tensor returned in `feats` can be backpropagated through.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MobileNetV1"]


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, each followed by BN and ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    """Width-1.0 MobileNetV1; `pretrained=True` is refused because no public weights with these keys exist."""

    def __init__(self, num_classes: int = 1000, pretrained: bool = False):
        super().__init__()
        if pretrained:
            raise ValueError(
                "MobileNetV1(pretrained=True): no public ImageNet weights exist for this model; "
                "use pretrained=False (it is a student) or load your own checkpoint with load_state_dict"
            )
        self.model = nn.Sequential(
            conv_bn(3, 32, 2),
            conv_dw(32, 64, 1),
            conv_dw(64, 128, 2),
            conv_dw(128, 128, 1),
            conv_dw(128, 256, 2),
            conv_dw(256, 256, 1),
            conv_dw(256, 512, 2),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 512, 1),
            conv_dw(512, 1024, 2),
            conv_dw(1024, 1024, 1),
            # Upstream uses AvgPool2d(7), identical at 224x224; adaptive pooling also serves other input sizes.
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, object]]:
        feat1 = self.model[3][:-1](self.model[0:3](x))
        feat2 = self.model[5][:-1](self.model[4](F.relu(feat1)))
        feat3 = self.model[11][:-1](self.model[6:11](F.relu(feat2)))
        feat4 = self.model[13][:-1](self.model[12](F.relu(feat3)))
        gap = F.relu(feat4)
        avg = self.model[14](gap).flatten(1)
        out = self.fc(avg)
        feats = {
            "feats": [F.relu(feat1), F.relu(feat2), F.relu(feat3), gap],
            "preact_feats": [feat1, feat2, feat3, feat4],
            "pooled_feat": avg,
            "gap_feat": gap,
        }
        return out, feats

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return [self.model[3][-2], self.model[5][-2], self.model[11][-2], self.model[13][-2]]

    def get_stage_channels(self) -> List[int]:
        return [128, 256, 512, 1024]

    def get_classifier(self) -> nn.Linear:
        return self.fc
