"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): match cosine-similarity distributions."""
import torch
import torch.nn.functional as F

from ._base import Distiller


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


class PKT(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.PKT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.PKT.LOSS.FEAT_WEIGHT

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * F.cross_entropy(logits_student, target),
            "loss_kd": self.feat_loss_weight
            * pkt_loss(feature_student["pooled_feat"], feature_teacher["pooled_feat"]),
        }
        return logits_student, losses_dict
