"""Decoupled knowledge distillation (Zhao et al., CVPR 2022): target-class (TCKD) plus non-target-class (NCKD) KD."""
import torch
import torch.nn.functional as F

from ._base import Distiller, register_distiller

# Upstream masks the target logit with -1000 (issue #1/#27 of mdistiller); kept for numerical identity.
_TARGET_MASK_OFFSET = 1000.0


def _binary_log_probs(logits: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """log [p_target, 1 - p_target] of softmax(logits), computed stably with logsumexp (no log of a 0 probability)."""
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
    log_target = (logits * gt_mask).sum(1, keepdim=True) - log_norm
    log_other = torch.logsumexp(logits.masked_fill(gt_mask.bool(), float("-inf")), dim=1, keepdim=True) - log_norm
    return torch.cat([log_target, log_other], dim=1)


def dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """alpha·TCKD + beta·NCKD, each T²-scaled and summed over the batch then divided by its size (as upstream)."""
    batch_size = target.shape[0]
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1.0)
    scaled_student = logits_student / temperature
    scaled_teacher = logits_teacher / temperature
    tckd = F.kl_div(
        _binary_log_probs(scaled_student, gt_mask),
        _binary_log_probs(scaled_teacher, gt_mask),
        reduction="sum",
        log_target=True,
    )
    nckd = F.kl_div(
        F.log_softmax(scaled_student - _TARGET_MASK_OFFSET * gt_mask, dim=1),
        F.log_softmax(scaled_teacher - _TARGET_MASK_OFFSET * gt_mask, dim=1),
        reduction="sum",
        log_target=True,
    )
    scale = temperature**2 / batch_size
    return alpha * tckd * scale + beta * nckd * scale


def dkd_warmup_factor(epoch: int, warmup: int) -> float:
    """Linear ramp of the DKD term over the first `warmup` epochs (epochs are 1-based)."""
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0


@register_distiller("DKD", defaults={"CE_WEIGHT": 1.0, "ALPHA": 1.0, "BETA": 8.0, "T": 4.0, "WARMUP": 20})
class DKD(Distiller):
    """CE + alpha·TCKD + beta·NCKD, the KD term ramped in over WARMUP epochs."""

    warmup_key = "WARMUP"

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.DKD.CE_WEIGHT
        self.alpha = cfg.DKD.ALPHA
        self.beta = cfg.DKD.BETA
        self.temperature = cfg.DKD.T
        self.warmup = cfg.DKD.WARMUP

    def forward_train(self, image, target, **kwargs):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        loss_dkd = dkd_warmup_factor(kwargs["epoch"], self.warmup) * dkd_loss(
            logits_student, logits_teacher, target, self.alpha, self.beta, self.temperature
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": loss_dkd,
        }
        return logits_student, losses_dict
