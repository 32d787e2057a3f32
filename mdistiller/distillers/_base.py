"""The distiller interface every method implements (same API as upstream mdistiller), and its registry."""
import copy
from typing import Callable, List, Mapping, Optional, Type, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.fold import fold_batchnorm
from ..registry import Registry

# DISTILLER.TYPE -> class; filled by `register_distiller` as the modules of this package (and users' files named in
# EXPERIMENT.IMPORTS) are imported.
distiller_dict: Registry = Registry("distiller", "DISTILLER.TYPE")

C = TypeVar("C", bound=type)


def register_distiller(name: str, defaults: Optional[Mapping] = None,
                       config_node: Optional[str] = None) -> Callable[[C], C]:
    """Class decorator: `distiller_dict[name] = cls`. `defaults` (a nested mapping) becomes the config node
    `config_node` (default: `name`), e.g. `defaults={"T": 4.0}` creates CFG.<name>.T; docs/extending.md."""

    def add(cls: C) -> C:
        cls.config_node = config_node or (name if defaults is not None else None)
        cls.config_defaults = copy.deepcopy(dict(defaults)) if defaults is not None else None
        distiller_dict.add(name, cls)
        return cls

    return add


def _fold_teacher_on_first_call(teacher: nn.Module, args) -> None:
    """Forward pre-hook: fold the eval-mode teacher's BatchNorm into its convs once, probing with the real input."""
    if teacher.training or getattr(teacher, "_bn_fold_tried", False):
        return
    if args and isinstance(args[0], torch.Tensor):
        teacher._bn_fold_tried = True
        fold_batchnorm(teacher, args[0][:2])


class StudentTraining(nn.Module):
    """What the trainer needs of any method: `forward(image=..., target=..., epoch=...)` returns
    `(logits, {name: loss})` in train mode and the student's logits in eval mode.

    Class attributes are the facts about a method that the rest of the framework reads (never a list elsewhere):
    `config_node`/`config_defaults` (set by `register_distiller`), `needs_teacher`, `contrastive_batches` (the data
    set yields (image, target, index, contrastive_index), CRD) and `warmup_key` (the key of its config node that
    holds warm-up epochs, scaled when a schedule is shortened).

    `label_smoothing` (SOLVER.LABEL_SMOOTHING, set on the instance by the launcher: distillers never read the
    solver's config) smooths the student's cross-entropy term, which every method computes with `ce_loss`."""

    config_node: Optional[str] = None
    config_defaults: Optional[dict] = None
    needs_teacher = True
    contrastive_batches = False
    warmup_key: Optional[str] = None
    label_smoothing = 0.0

    def ce_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The student's cross-entropy against the labels, smoothed by `label_smoothing` (docs/recipes.md); with 0
        it is upstream's `F.cross_entropy(logits, target)` bit for bit."""
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def get_learnable_parameters(self) -> List[nn.Parameter]:
        return [param for param in self.student.parameters()]

    def get_extra_parameters(self) -> int:
        """Number of parameters the method adds on top of the student (connectors, memories)."""
        return 0

    def forward_train(self, **kwargs):
        raise NotImplementedError()

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class Distiller(StudentTraining):
    """A student trained against a frozen teacher; `forward_train` returns `(logits, {name: loss})`.

    The teacher's BatchNorm is folded into its convolutions on its first eval-mode call (exact, state dict
    unchanged; see `mdistiller.models.fold`); a method whose teacher must keep BatchNorm modules sets
    `fold_teacher = False`.
    """

    fold_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = teacher
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        if self.fold_teacher:
            self.teacher.register_forward_pre_hook(_fold_teacher_on_first_call)

    def train(self, mode: bool = True):
        """Set the student (and any connector) to `mode`; the teacher always stays in eval mode."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self


@register_distiller("NONE")
class Vanilla(StudentTraining):
    """Plain supervised training of the student alone (no teacher)."""

    needs_teacher = False

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward_train(self, image, target, **kwargs):
        logits_student, _ = self.student(image)
        loss = self.ce_loss(logits_student, target)
        return logits_student, {"ce": loss}


class FeatureDistiller(Distiller):
    """CE plus FEAT_WEIGHT times a loss between student and teacher features (AT, NST, SP, PKT, KDSVD).

    Subclasses are registered with a config node holding LOSS.CE_WEIGHT and LOSS.FEAT_WEIGHT and define
    `feature_loss`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg[self.config_node].LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg[self.config_node].LOSS.FEAT_WEIGHT

    def feature_loss(self, feats_student: dict, feats_teacher: dict):
        raise NotImplementedError()

    def forward_train(self, image, target, **kwargs):
        logits_student, feats_student = self.student(image)
        with torch.no_grad():
            _, feats_teacher = self.teacher(image)
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight * self.feature_loss(feats_student, feats_teacher),
        }
        return logits_student, losses_dict


def distiller_class(name: str) -> Type[StudentTraining]:
    """The class registered as DISTILLER.TYPE `name` (a ConfigError listing the registered names otherwise)."""
    return distiller_dict.lookup(name)
