"""Self-supervised KD with SVD (Lee et al., ECCV 2018): match RBF relations between consecutive stages' leading
right-singular vectors."""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ._base import FeatureDistiller, register_distiller
from ._common import match_spatial


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def svd(feat: torch.Tensor, n: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of each sample's map viewed as (C·H) × W; the first n singular vectors/values, each L2-normalised."""
    b, c, h, w = feat.shape
    u, s, vh = torch.linalg.svd(feat.reshape(b, c * h, w).float(), full_matrices=False)
    v = vh.transpose(-2, -1)
    u, s, v = _finite(u), _finite(s), _finite(v)
    if n > 0:
        u = F.normalize(u[:, :, :n], dim=1)
        s = F.normalize(s[:, :n], dim=1)
        v = F.normalize(v[:, :, :n], dim=1)
    return u, s, v


def align_rsv(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select and sign-flip the columns of `a` that best match (|cos|) each column of `b`."""
    cosine = a.transpose(-2, -1) @ b
    max_abs_cosine, _ = torch.max(cosine.abs(), 1, keepdim=True)
    mask = torch.where(max_abs_cosine == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return a @ mask, b


def kdsvd_loss(g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Σ over consecutive stage pairs of Σ(RBF_s − RBF_t)² / B. Maps of unequal size are average-pooled to the
    smaller one first (upstream requires equal widths, so heterogeneous pairs crashed)."""
    v_sb = v_tb = None
    losses = []
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        f_s, f_t = match_spatial(f_s, f_t)
        _, s_t, v_t = svd(f_t, k)
        _, _, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t = v_t * s_t
        v_s = v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            losses.append(_finite((s_rbf - t_rbf.detach()).pow(2)).sum())
        v_tb, v_sb = v_t, v_s
    return sum(losses) / g_s[0].shape[0]


@register_distiller("KDSVD", defaults={"K": 1, "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 1.0}})
class KDSVD(FeatureDistiller):

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher, cfg)
        self.k = cfg.KDSVD.K

    def feature_loss(self, feats_student, feats_teacher):
        return kdsvd_loss(feats_student["feats"][1:], feats_teacher["feats"][1:], self.k)
