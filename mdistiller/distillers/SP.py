"""Similarity-preserving KD (Tung & Mori, ICCV 2019): match row-normalised batch Gram matrices."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ._base import FeatureDistiller, register_distiller


def _normalised_gram(f: torch.Tensor) -> torch.Tensor:
    flat = f.reshape(f.shape[0], -1)
    return F.normalize(flat @ flat.t())


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖norm(G_t) − norm(G_s)‖²_F / B² with G the B×B Gram matrix of flattened features."""
    batch_size = f_s.shape[0]
    return (_normalised_gram(f_t) - _normalised_gram(f_s)).pow(2).sum() / (batch_size * batch_size)


def sp_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


@register_distiller("SP", defaults={"LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 3000.0}})
class SP(FeatureDistiller):

    def feature_loss(self, feats_student, feats_teacher):
        return sp_loss([feats_student["feats"][-1]], [feats_teacher["feats"][-1]])
