"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017): match normalised spatial attention maps per stage."""
from typing import Sequence

import torch
import torch.nn.functional as F

from ._base import FeatureDistiller, register_distiller
from ._common import match_spatial


def _attention(feat: torch.Tensor, p: float) -> torch.Tensor:
    """L2-normalised mean over channels of |f|^p (f^p as upstream), flattened per sample."""
    return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))


def single_stage_at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    f_s, f_t = match_spatial(f_s, f_t)
    return (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()


def at_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """Sum over stage pairs of the mean squared difference of attention maps."""
    return sum(single_stage_at_loss(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t))


@register_distiller("AT", defaults={"P": 2, "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 1000.0}})
class AT(FeatureDistiller):

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher, cfg)
        self.p = cfg.AT.P

    def feature_loss(self, feats_student, feats_teacher):
        return at_loss(feats_student["feats"][1:], feats_teacher["feats"][1:], self.p)
