"""Variational information distillation (Ahn et al., CVPR 2019): Gaussian likelihood of each teacher map given a
regression of the student's, with a learned per-channel variance."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._base import Distiller, register_distiller
from ._common import count_parameters, get_feat_shapes, match_spatial


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False)


def vid_loss(
    regressor: nn.Module, log_scale: torch.Tensor, f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Mean of 0.5·((μ(f_s) − f_t)²/σ² + log σ²) with σ² = softplus(log_scale) + eps per channel."""
    f_s, f_t = match_spatial(f_s, f_t)
    pred_mean = regressor(f_s)
    pred_var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1).to(pred_mean)
    return torch.mean(0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var)))


@register_distiller("VID", defaults={
    "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 1.0}, "EPS": 1e-5, "INIT_PRED_VAR": 5.0, "INPUT_SIZE": (32, 32),
})
class VID(Distiller):
    """Unlike upstream, the log-scales are registered parameters: they are optimised, saved and moved with the
    module (upstream kept them in a plain list, so they stayed at their initial value)."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.VID.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.VID.LOSS.FEAT_WEIGHT
        self.init_pred_var = cfg.VID.INIT_PRED_VAR
        self.eps = cfg.VID.EPS
        feat_s_shapes, feat_t_shapes = get_feat_shapes(student, teacher, cfg.VID.INPUT_SIZE)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        init_log_scale = math.log(math.exp(self.init_pred_var - self.eps) - 1.0)
        for s_shape, t_shape in zip(feat_s_shapes[1:], feat_t_shapes[1:]):
            s, t = s_shape[1], t_shape[1]
            self.regressors.append(
                nn.Sequential(_conv1x1(s, t), nn.ReLU(), _conv1x1(t, t), nn.ReLU(), _conv1x1(t, t))
            )
            self.log_scales.append(nn.Parameter(torch.full((t,), init_log_scale)))

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.regressors.parameters()) + list(self.log_scales)

    def get_extra_parameters(self) -> int:
        return count_parameters(self.regressors, self.log_scales)

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        loss_vid = sum(
            vid_loss(regressor, log_scale, f_s, f_t, self.eps)
            for regressor, log_scale, f_s, f_t in zip(
                self.regressors, self.log_scales, feature_student["feats"][1:], feature_teacher["feats"][1:]
            )
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_vid,
        }
        return logits_student, losses_dict
