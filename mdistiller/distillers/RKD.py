"""Relational knowledge distillation (Park et al., CVPR 2019): match pairwise distances and triplet angles."""
import torch
import torch.nn.functional as F

from ._base import Distiller, register_distiller


def _pdist(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """Pairwise Euclidean distances (squared if asked), clamped at eps, with an exact zero diagonal."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    off_diagonal = 1.0 - torch.eye(len(e), dtype=res.dtype, device=res.device)
    return res * off_diagonal


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every anchor j between (e_i - e_j) and (e_k - e_j), flattened."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    squared: bool = False,
    eps: float = 1e-12,
    distance_weight: float = 25,
    angle_weight: float = 50,
) -> torch.Tensor:
    """distance_weight·smoothL1(mean-normalised distances) + angle_weight·smoothL1(angles)."""
    stu = f_s.view(f_s.shape[0], -1)
    tea = f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = _pdist(tea, squared, eps)
        t_d = t_d / t_d[t_d > 0].mean()
        t_angle = _angles(tea)
    d = _pdist(stu, squared, eps)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    loss_a = F.smooth_l1_loss(_angles(stu), t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


@register_distiller("RKD", defaults={
    "DISTANCE_WEIGHT": 25.0, "ANGLE_WEIGHT": 50.0, "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 1.0},
    "PDIST": {"EPSILON": 1e-12, "SQUARED": False},
})
class RKD(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.distance_weight = cfg.RKD.DISTANCE_WEIGHT
        self.angle_weight = cfg.RKD.ANGLE_WEIGHT
        self.ce_loss_weight = cfg.RKD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.RKD.LOSS.FEAT_WEIGHT
        self.eps = cfg.RKD.PDIST.EPSILON
        self.squared = cfg.RKD.PDIST.SQUARED

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        loss_rkd = rkd_loss(
            feature_student["pooled_feat"],
            feature_teacher["pooled_feat"],
            self.squared,
            self.eps,
            self.distance_weight,
            self.angle_weight,
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_rkd,
        }
        return logits_student, losses_dict
