"""Pieces shared by the feature distillers: shape probing, spatial matching, FitNet's regression connector."""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def probe_features(model: nn.Module, input_size: Sequence[int]) -> dict:
    """The feature dict of `model` on one random image, computed in eval mode so that no BatchNorm running
    statistics (the teacher's above all) are touched by the probe; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        _, feats = model(torch.randn(1, 3, *input_size, device=device))
    finally:
        model.train(was_training)
    return feats


def get_feat_shapes(
    student: nn.Module, teacher: nn.Module, input_size: Sequence[int]
) -> Tuple[List[torch.Size], List[torch.Size]]:
    """Shapes (1, C, H, W) of every entry of `feats` for the student and the teacher."""
    feat_s = probe_features(student, input_size)
    feat_t = probe_features(teacher, input_size)
    return [f.shape for f in feat_s["feats"]], [f.shape for f in feat_t["feats"]]


def match_spatial(f_s: torch.Tensor, f_t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two square maps to the other's size (upstream compares heights only)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


class ConvReg(nn.Module):
    """Maps a student map onto a teacher map's shape: stride-2 conv (2× larger student), stride-2 transposed conv
    (2× smaller student) or a 'valid' conv (any larger student), then BatchNorm (+ ReLU)."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg: student map {s_h}x{s_w} cannot be regressed onto teacher map {t_h}x{t_w} "
                "(expected the student at least half the teacher's size)"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


def count_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())
