"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match row-normalised batch Gram matrices."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ._base import Distiller


def _normalised_gram(f: torch.Tensor) -> torch.Tensor:
    flat = f.reshape(f.shape[0], -1)
    return F.normalize(flat @ flat.t())


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖norm(G_t) − norm(G_s)‖²_F / B² with G the B×B Gram matrix of flattened features."""
    batch_size = f_s.shape[0]
    return (_normalised_gram(f_t) - _normalised_gram(f_s)).pow(2).sum() / (batch_size * batch_size)


def sp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


class SP(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.SP.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.SP.LOSS.FEAT_WEIGHT

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight
            * sp_loss([feature_student["feats"][-1]], [feature_teacher["feats"][-1]]),
        }
        return logits_student, losses_dict
