"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match cosine-similarity distributions."""
import torch

from ._base import FeatureDistiller, register_distiller


def _similarity_distribution(f: torch.Tensor, eps: float) -> torch.Tensor:
    """Rows of (cos + 1) / 2 between samples, each row normalised to sum to one."""
    f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    f = f.masked_fill(torch.isnan(f), 0.0)
    similarity = (f @ f.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Mean over all entries of p_t·log((p_t + eps) / (p_s + eps)) (upstream's smoothed KL)."""
    p_s = _similarity_distribution(f_s, eps)
    p_t = _similarity_distribution(f_t, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register_distiller("PKT", defaults={"LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 30000.0}})
class PKT(FeatureDistiller):

    def feature_loss(self, feats_student, feats_teacher):
        return pkt_loss(feats_student["pooled_feat"], feats_teacher["pooled_feat"])
