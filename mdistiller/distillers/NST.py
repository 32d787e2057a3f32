"""Neuron selectivity transfer (Huang & Wang, 2017): squared MMD, polynomial kernel, between channel activations."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ._base import FeatureDistiller, register_distiller
from ._common import match_spatial


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = <a_i, b_j>² for (B, N, D) × (B, M, D) → (B, M, N)."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2)


def single_stage_nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    f_s, f_t = match_spatial(f_s, f_t)
    f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return (
        poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()
    )


def nst_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(single_stage_nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


@register_distiller("NST", defaults={"LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 50.0}})
class NST(FeatureDistiller):

    def feature_loss(self, feats_student, feats_teacher):
        return nst_loss(feats_student["feats"][1:], feats_teacher["feats"][1:])
