"""Knowledge review (Chen et al., CVPR 2021): attention-based fusion (ABF) of student stages from deep to shallow,
each fused map matched to the teacher's stage by the hierarchical context loss (HCL)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller, register_distiller
from ._common import count_parameters


def hcl_loss(fstudent: Sequence[torch.Tensor], fteacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_stages of MSE at full resolution plus MSEs of 4×4, 2×2, 1×1 average pools (those smaller than the map),
    weighted 1, 1/2, 1/4, 1/8 and divided by the sum of the weights used."""
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)) * cnt
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


class ABF(nn.Module):
    """1×1 conv to `mid_channel`, attention-weighted fusion with the upsampled deeper result (when `fuse`),
    resize to the teacher's size, 3×3 conv to the teacher's channels."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channel)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, y: Optional[torch.Tensor] = None, shape: Optional[int] = None, out_shape: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def _as_map(pooled: torch.Tensor) -> torch.Tensor:
    return pooled.reshape(pooled.shape[0], -1, 1, 1)


def _student_entries(feats: dict, stu_preact: bool) -> List[torch.Tensor]:
    return list(feats["preact_feats"] if stu_preact else feats["feats"]) + [_as_map(feats["pooled_feat"])]


def _teacher_entries(feats: dict) -> List[torch.Tensor]:
    return list(feats["preact_feats"][1:]) + [_as_map(feats["pooled_feat"])]


def reviewkd_layout(feats_student: dict, feats_teacher: dict, stu_preact: bool = False) -> Dict[str, List[int]]:
    """The REVIEWKD.{IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES} values for a pair, from its feature dicts:
    the teacher's preact_feats[1:] + pooled_feat are the targets, the student's last as many entries the inputs;
    channels shallow→deep, shapes deep→shallow (as upstream's configs)."""
    teacher = _teacher_entries(feats_teacher)
    student = _student_entries(feats_student, stu_preact)[-len(teacher) :]
    return {
        "IN_CHANNELS": [f.shape[1] for f in student],
        "OUT_CHANNELS": [f.shape[1] for f in teacher],
        "SHAPES": [f.shape[2] for f in student][::-1],
        "OUT_SHAPES": [f.shape[2] for f in teacher][::-1],
    }


@register_distiller("REVIEWKD", defaults={
    "CE_WEIGHT": 1.0, "REVIEWKD_WEIGHT": 1.0, "WARMUP_EPOCHS": 20,
    "SHAPES": [1, 8, 16, 32], "OUT_SHAPES": [1, 8, 16, 32],
    "IN_CHANNELS": [64, 128, 256, 256], "OUT_CHANNELS": [64, 128, 256, 256],
    "MAX_MID_CHANNEL": 512, "STU_PREACT": False,
})
class ReviewKD(Distiller):
    """CE + the review (HCL) loss over fused student features, ramped in over WARMUP_EPOCHS."""

    warmup_key = "WARMUP_EPOCHS"

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        node = cfg.REVIEWKD
        self.shapes = list(node.SHAPES)
        self.out_shapes = list(node.OUT_SHAPES)
        self.in_channels = list(node.IN_CHANNELS)
        self.out_channels = list(node.OUT_CHANNELS)
        lengths = {len(self.shapes), len(self.out_shapes), len(self.in_channels), len(self.out_channels)}
        if len(lengths) != 1:
            raise ValueError(
                "REVIEWKD.SHAPES, OUT_SHAPES, IN_CHANNELS and OUT_CHANNELS must have the same length, got "
                f"{self.shapes}, {self.out_shapes}, {self.in_channels}, {self.out_channels}"
            )
        self.ce_loss_weight = node.CE_WEIGHT
        self.reviewkd_loss_weight = node.REVIEWKD_WEIGHT
        self.warmup_epochs = node.WARMUP_EPOCHS
        self.stu_preact = node.STU_PREACT
        self.max_mid_channel = node.MAX_MID_CHANNEL
        mid_channel = min(self.max_mid_channel, self.in_channels[-1])
        last = len(self.in_channels) - 1
        abfs = [
            ABF(in_channel, mid_channel, self.out_channels[idx], idx < last)
            for idx, in_channel in enumerate(self.in_channels)
        ]
        self.abfs = nn.ModuleList(abfs[::-1])

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.abfs.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.abfs)

    def _check_layout(self, feats_student: dict, feats_teacher: dict) -> None:
        """One clear error when the REVIEWKD.* channel/shape config does not describe this pair."""
        actual = reviewkd_layout(feats_student, feats_teacher, self.stu_preact)
        configured = {
            "IN_CHANNELS": self.in_channels,
            "OUT_CHANNELS": self.out_channels,
            "SHAPES": self.shapes,
            "OUT_SHAPES": self.out_shapes,
        }
        for key, value in configured.items():
            if list(value) != actual[key]:
                raise ValueError(
                    f"REVIEWKD.{key}={list(value)} does not match this teacher/student pair, expected {actual[key]} "
                    f"(full layout for the pair: {actual}; see configs/cifar100/reviewkd/)"
                )

    def forward_train(self, image, target, **kwargs):
        logits_student, features_student = self.student(image)
        with torch.no_grad():
            _, features_teacher = self.teacher(image)
        self._check_layout(features_student, features_teacher)
        x = _student_entries(features_student, self.stu_preact)[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        warmup = min(kwargs["epoch"] / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.reviewkd_loss_weight * warmup * hcl_loss(results, _teacher_entries(features_teacher)),
        }
        return logits_student, losses_dict
