"""FitNets (Romero et al., ICLR 2015): regress one intermediate student map onto the teacher's (the hint)."""
import torch
import torch.nn.functional as F

from ._base import Distiller, register_distiller
from ._common import ConvReg, count_parameters, get_feat_shapes


def fitnet_loss(f_s_regressed: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student hint and the teacher hint."""
    return F.mse_loss(f_s_regressed, f_t)


@register_distiller("FITNET", defaults={
    "HINT_LAYER": 2, "INPUT_SIZE": (32, 32), "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 100.0},
})
class FitNet(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.FITNET.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.FITNET.LOSS.FEAT_WEIGHT
        self.hint_layer = cfg.FITNET.HINT_LAYER
        feat_s_shapes, feat_t_shapes = get_feat_shapes(student, teacher, cfg.FITNET.INPUT_SIZE)
        if not (-len(feat_s_shapes) <= self.hint_layer < len(feat_s_shapes)) or not (
            -len(feat_t_shapes) <= self.hint_layer < len(feat_t_shapes)
        ):
            raise ValueError(
                f"FITNET.HINT_LAYER={self.hint_layer} is out of range: student has {len(feat_s_shapes)} feats, "
                f"teacher has {len(feat_t_shapes)}"
            )
        self.conv_reg = ConvReg(feat_s_shapes[self.hint_layer], feat_t_shapes[self.hint_layer])

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.conv_reg.parameters())

    def get_extra_parameters(self) -> int:
        return count_parameters(self.conv_reg)

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        f_s = self.conv_reg(feature_student["feats"][self.hint_layer])
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight * fitnet_loss(f_s, feature_teacher["feats"][self.hint_layer]),
        }
        return logits_student, losses_dict
