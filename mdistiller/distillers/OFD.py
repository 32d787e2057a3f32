"""Overhaul of feature distillation (Heo et al., ICCV 2019): partial L2 between connector(student pre-ReLU) and
teacher pre-ReLU maps, with a margin derived from the teacher's BatchNorm statistics."""
import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller, register_distiller
from ._common import count_parameters


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def ofd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel E[x | x < 0] of N(beta, |gamma|) (the teacher's pre-ReLU response), or -3σ when that negative
    tail holds under 0.1 % of the mass. Shape (1, C, 1, 1)."""
    margin = []
    for std, mean in zip(bn.weight.detach().tolist(), bn.bias.detach().tolist()):
        std = abs(std)
        if _normal_cdf(-mean / std) > 0.001:
            margin.append(
                -std * math.exp(-((mean / std) ** 2) / 2) / math.sqrt(2 * math.pi) / _normal_cdf(-mean / std) + mean
            )
        else:
            margin.append(-3 * std)
    return torch.tensor(margin, dtype=torch.float32).view(1, -1, 1, 1)


def ofd_feat_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Partial L2: no penalty where both the student and the (margin-clipped) teacher are inactive.
    Summed over C, H, W and averaged over the batch."""
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return loss.abs().mean(dim=0).sum()


def _align_from_end(*lists: Sequence) -> List[list]:
    """Keep the last min-length entries of every list (deep stages are paired with deep stages)."""
    min_len = min(len(items) for items in lists)
    return [list(items)[len(items) - min_len :] for items in lists]


def _connector(s_channel: int, t_channel: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv2d(
        s_channel, t_channel, kernel_size=kernel_size, stride=1, padding=(kernel_size - 1) // 2, bias=False
    )
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / (kernel_size * kernel_size * t_channel)))
    bn = nn.BatchNorm2d(t_channel)
    return nn.Sequential(conv, bn)


class _Connectors(nn.Module):
    """Container kept so that state_dict keys match upstream (`connectors.connectors.<i>.<0|1>.*`)."""

    def __init__(self, connectors: List[nn.Module]):
        super().__init__()
        self.connectors = nn.ModuleList(connectors)


@register_distiller("OFD", defaults={
    "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 0.001},
    "CONNECTOR": {"KERNEL_SIZE": 1},
    "TEACHER_TRAIN_MODE": False,  # True: upstream's behaviour (teacher BatchNorm in train mode during distillation)
})
class OFD(Distiller):
    """`OFD.TEACHER_TRAIN_MODE: True` reproduces upstream, which leaves the teacher in train mode (batch statistics
    in its BatchNorm, running statistics updated); the default keeps the teacher in eval mode like every other
    distiller."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.OFD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.OFD.LOSS.FEAT_WEIGHT
        self.teacher_train_mode = cfg.OFD.TEACHER_TRAIN_MODE
        for name, model in (("teacher", teacher), ("student", student)):
            if not hasattr(model, "get_stage_channels"):
                raise ValueError(f"OFD needs {name} {type(model).__name__} to define get_stage_channels()")
        if not hasattr(teacher, "get_bn_before_relu"):
            raise ValueError(f"OFD needs teacher {type(teacher).__name__} to define get_bn_before_relu()")
        t_channels, s_channels, bns = _align_from_end(
            teacher.get_stage_channels()[1:], student.get_stage_channels()[1:], teacher.get_bn_before_relu()
        )
        kernel_size = cfg.OFD.CONNECTOR.KERNEL_SIZE
        self.connectors = _Connectors([_connector(s, t, kernel_size) for s, t in zip(s_channels, t_channels)])
        for idx, (bn, t_channel) in enumerate(zip(bns, t_channels)):
            if bn.num_features != t_channel:
                raise ValueError(
                    f"OFD: teacher {type(teacher).__name__} get_bn_before_relu()[{idx}] has {bn.num_features} "
                    f"channels, expected {t_channel} from get_stage_channels()"
                )
            self.register_buffer(f"margin_{idx}", ofd_margin(bn), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_train_mode:
            self.teacher.train(mode)
        return self

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.connectors.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.connectors)

    def ofd_loss(self, feature_student: Sequence[torch.Tensor], feature_teacher: Sequence[torch.Tensor]):
        """Σ_i partial-L2 of stage i, weighted 1/2^(n−1−i) so the deepest stage counts most."""
        connectors = self.connectors.connectors
        margins = [getattr(self, f"margin_{i}") for i in range(len(connectors))]
        feature_student, feature_teacher, connectors, margins = _align_from_end(
            feature_student, feature_teacher, connectors, margins
        )
        num = len(connectors)
        loss = 0.0
        for i, (f_s, f_t, connector, margin) in enumerate(zip(feature_student, feature_teacher, connectors, margins)):
            f_s = connector(f_s)
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:]).detach()
            loss = loss + ofd_feat_loss(f_s, f_t, margin) / 2 ** (num - i - 1)
        return loss

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight
            * self.ofd_loss(feature_student["preact_feats"][1:], feature_teacher["preact_feats"][1:]),
        }
        return logits_student, losses_dict
