"""Vanilla knowledge distillation (Hinton et al., 2015)."""
import torch
import torch.nn.functional as F

from ._base import Distiller, register_distiller


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), summed over classes and averaged over the batch."""
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    log_pred_teacher = F.log_softmax(logits_teacher / temperature, dim=1)
    loss = F.kl_div(log_pred_student, log_pred_teacher, reduction="none", log_target=True).sum(1).mean()
    return loss * temperature**2


@register_distiller("KD", defaults={"TEMPERATURE": 4.0, "LOSS": {"CE_WEIGHT": 0.1, "KD_WEIGHT": 0.9}})
class KD(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.temperature = cfg.KD.TEMPERATURE
        self.ce_loss_weight = cfg.KD.LOSS.CE_WEIGHT
        self.kd_loss_weight = cfg.KD.LOSS.KD_WEIGHT

    def forward_train(self, image, target, **kwargs):
        logits_student, _ = self.student(image)
        with torch.no_grad():
            logits_teacher, _ = self.teacher(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.kd_loss_weight * kd_loss(logits_student, logits_teacher, self.temperature),
        }
        return logits_student, losses_dict
