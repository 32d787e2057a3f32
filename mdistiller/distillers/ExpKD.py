"""Exp-KD: KD plus explanation-map transfer on the teacher's most likely classes.

The student learns to explain like the teacher: for each sample and each of the teacher's top-K classes, the student's
explanation map (CAM, Grad-CAM or LRP from `mdistiller.explain`) is pulled towards the teacher's. This is the method of
the Exp-KD fork (github.com/Blenderama/Exp-KD) as described, not as committed: the fork's loss normalises over the
batch and then averages, which is the constant 1/B and gives the student no gradient. Here every normalisation and
reduction is per (sample, class), so a sample's loss does not depend on the rest of its batch.
"""
from contextlib import nullcontext
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..explain import Tape, explain_from_features, explain_recorded, record, supports
from ._base import Distiller, register_distiller
from .DKD import dkd_warmup_factor
from .KD import kd_loss

EXPLAINERS = ("cam", "gradcam", "lrp")
NORMS = ("softmax", "l2", "none")
DISTANCES = ("mse", "kl", "cos")


def resize_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Average-pool `maps` [B,K,H,W] to `size`; bilinear upsampling where a side must grow (a smaller teacher map)."""
    if maps.shape[-2:] == size:
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def exp_loss(
    maps_student: torch.Tensor,
    maps_teacher: torch.Tensor,
    resolution: int,
    norm: str,
    temperature: float,
    distance: str,
    reduction: str = "mean",
) -> torch.Tensor:
    """Distance between student and teacher explanation maps [B,K,H,W], normalised over space per (b, k).

    `resolution` > 0 pools both maps to resolution x resolution; 0 keeps the student's size and resizes the teacher's.
    `reduction="none"` returns the [B,K] per-(sample, class) distances, "mean" their mean.
    """
    size = (resolution, resolution) if resolution > 0 else tuple(maps_student.shape[-2:])
    student = resize_maps(maps_student, size).flatten(2)
    teacher = resize_maps(maps_teacher, size).flatten(2)
    if distance == "kl":
        if norm != "softmax":
            raise ValueError(f"exp_loss: distance 'kl' needs norm 'softmax' (spatial distributions), got norm {norm!r}")
        log_student = F.log_softmax(student / temperature, dim=-1)
        log_teacher = F.log_softmax(teacher / temperature, dim=-1)
        per_map = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    else:
        if norm == "softmax":
            student = F.softmax(student / temperature, dim=-1)
            teacher = F.softmax(teacher / temperature, dim=-1)
        elif norm == "l2":
            student = F.normalize(student, dim=-1)
            teacher = F.normalize(teacher, dim=-1)
        elif norm != "none":
            raise ValueError(f"exp_loss: norm {norm!r}, expected one of {NORMS}")
        if distance == "mse":
            per_map = (student - teacher).pow(2).mean(-1)
        elif distance == "cos":
            per_map = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
        else:
            raise ValueError(f"exp_loss: distance {distance!r}, expected one of {DISTANCES}")
    if reduction == "none":
        return per_map
    return per_map.mean()


def top_classes(logits_teacher: torch.Tensor, topk: int) -> torch.Tensor:
    """The teacher's `topk` most likely classes per sample, LongTensor [B, K]; `topk` 0 = every class, in order."""
    batch_size, num_classes = logits_teacher.shape
    if topk == 0:
        return torch.arange(num_classes, device=logits_teacher.device).expand(batch_size, num_classes)
    return logits_teacher.topk(topk, dim=1).indices


def needs_tape(explainer: str, layer: str) -> bool:
    """CAM and Grad-CAM at the GAP input come from `feats` alone; other maps need the recorded layer outputs."""
    return not (explainer in ("cam", "gradcam") and layer == "gap")


@register_distiller("EXPKD", defaults={
    "CE_WEIGHT": 0.1,
    "KD_WEIGHT": 0.9,
    "KD_T": 4.0,
    "EXP_WEIGHT": 100.0,  # tuned on digits with NORM l2 at 4x4 maps (docs/expkd.md)
    "WARMUP": 20,  # epochs of linear ramp of the explanation term
    "TOPK": 5,  # teacher's top-K classes; 0 = all classes
    "EXPLAINER": "cam",  # "cam", "gradcam", "lrp" (mdistiller.explain)
    "LAYER": "gap",  # "gap" or a stage index / module name (gradcam, lrp)
    "RULE": "epsilon_plus_flat",  # LRP rule or composite
    "DETACH_NORMALIZERS": False,  # lrp: the student's rule normalisers are constants (cheaper, approximate)
    "RESOLUTION": 0,  # pool both maps to RxR; 0 = the student's map size
    "NORM": "l2",  # per (sample, class) over space: "softmax" (temperature T), "l2", "none"
    "T": 1.0,
    "DISTANCE": "mse",  # "mse", "kl" (needs NORM softmax), "cos"
})
class ExpKD(Distiller):
    """CE_WEIGHT·CE + KD_WEIGHT·KD(T=KD_T) + EXP_WEIGHT·warmup(epoch)·L_exp, from the config node `EXPKD`."""

    warmup_key = "WARMUP"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        settings, config_keys = self.settings(cfg)
        # Explainers that walk the model's own conv/BN modules need the teacher's BatchNorm unfolded.
        self.fold_teacher = not needs_tape(settings["EXPLAINER"], settings["LAYER"])
        super().__init__(student, teacher)
        self.config_keys = config_keys
        self.ce_weight = settings["CE_WEIGHT"]
        self.kd_weight = settings["KD_WEIGHT"]
        self.kd_temperature = settings["KD_T"]
        self.exp_weight = settings["EXP_WEIGHT"]
        self.warmup = settings["WARMUP"]
        self.topk = settings["TOPK"]
        self.explainer = settings["EXPLAINER"]
        self.layer = settings["LAYER"]
        self.rule = settings["RULE"]
        self.detach_normalizers = settings["DETACH_NORMALIZERS"]
        self.resolution = settings["RESOLUTION"]
        self.norm = settings["NORM"]
        self.temperature = settings["T"]
        self.distance = settings["DISTANCE"]
        self._validate()

    @staticmethod
    def settings(cfg) -> Tuple[Dict[str, object], Dict[str, str]]:
        """(the loss settings by EXPKD key, the config key each was read from, for error messages)."""
        return dict(cfg.EXPKD), {key: f"EXPKD.{key}" for key in cfg.EXPKD}

    def _validate(self) -> None:
        key = self.config_keys
        num_classes = self.student.get_classifier().out_features
        for name, value, allowed in (("EXPLAINER", self.explainer, EXPLAINERS), ("NORM", self.norm, NORMS),
                                     ("DISTANCE", self.distance, DISTANCES)):
            if value not in allowed:
                raise ConfigError(f"config {key[name]}: {value!r}, expected one of {allowed}")
        if not 0 <= self.topk <= num_classes:
            raise ConfigError(f"config {key['TOPK']}: {self.topk}, expected 0 (all classes) to {num_classes} "
                             f"(the number of classes of the student)")
        if self.resolution < 0:
            raise ConfigError(f"config {key['RESOLUTION']}: {self.resolution}, expected 0 (the student's map size) "
                             f"or a positive side")
        if self.distance == "kl" and self.norm != "softmax":
            raise ConfigError(f"config {key['DISTANCE']} 'kl' compares spatial distributions: set {key['NORM']} "
                             f"'softmax' (got {self.norm!r})")
        if self.explainer == "cam" and self.layer != "gap":
            raise ConfigError(f"config {key['LAYER']}: {self.layer!r}, but EXPLAINER 'cam' is defined at 'gap' only "
                             f"(use 'gradcam' or 'lrp' for other layers)")
        if self.detach_normalizers and self.explainer != "lrp":
            raise ConfigError(f"config {key['DETACH_NORMALIZERS']}: True needs {key['EXPLAINER']} 'lrp' (only LRP has "
                              f"normalisers), got {self.explainer!r}")
        if self.norm == "softmax" and self.temperature <= 0:
            raise ConfigError(f"config {key['T']}: {self.temperature}, expected > 0")
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            reason = supports(model, self.explainer, self.layer)
            if reason is not None:
                raise ConfigError(f"config {key['EXPLAINER']} {self.explainer!r} at {key['LAYER']} {self.layer!r}: "
                                  f"the {role} cannot be explained: {reason}")

    def _recording(self, model: nn.Module):
        """A tape that keeps only what maps at the configured layer read (for the no_grad teacher, the difference
        between holding a few activations and all of them)."""
        return record(model, self.layer) if needs_tape(self.explainer, self.layer) else nullcontext()

    def explanation_maps(self, model: nn.Module, feats: Dict[str, object], tape: Optional[Tape],
                         classes: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """Maps [B,K,H,W] of `classes` from the forward of `model` that produced `feats` (and `tape`), not rerun."""
        if tape is None:
            return explain_from_features(model, feats, classes, self.explainer, create_graph=create_graph)
        return explain_recorded(tape, classes, self.explainer, self.layer, self.rule, create_graph=create_graph,
                                detach_normalizers=self.detach_normalizers and create_graph)

    def teacher_maps(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The teacher's logits, its top classes and their maps. Run before the student's forward, so that the
        teacher's recorded activations are released before the student's exist."""
        with torch.no_grad(), self._recording(self.teacher) as tape:
            logits_teacher, feats_teacher = self.teacher(image)
        classes = top_classes(logits_teacher, self.topk)
        return logits_teacher, classes, self.explanation_maps(self.teacher, feats_teacher, tape, classes, False)

    def forward_train(self, image, target, **kwargs):
        logits_teacher, classes, maps_teacher = self.teacher_maps(image)
        with self._recording(self.student) as tape_student:
            logits_student, feats_student = self.student(image)
        maps_student = self.explanation_maps(self.student, feats_student, tape_student, classes, create_graph=True)
        loss_exp = exp_loss(maps_student, maps_teacher, self.resolution, self.norm, self.temperature, self.distance)
        losses_dict = {
            "loss_ce": self.ce_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.kd_weight * kd_loss(logits_student, logits_teacher, self.kd_temperature),
            "loss_exp": self.exp_weight * dkd_warmup_factor(kwargs["epoch"], self.warmup) * loss_exp,
        }
        return logits_student, losses_dict


# The fork's node; ALPHA, BETA, METHOD and UPSAMPLE are read by nothing, as in the fork.
@register_distiller("CAM", defaults={
    "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 5.0},
    "ALPHA": 1.0, "BETA": 8.0, "T": 1.0, "K": 50, "WARMUP": 1, "METHOD": 0, "UPSAMPLE": 1,
})
class ExpKDFork(ExpKD):
    """Exp-KD configured by the Exp-KD fork's registry key "CAM" and its `CAM.*` keys (not the CAM explainer).

    As the fork: KD weight 0.9 at temperature 4 (hard-coded there), CAMs of the teacher's top-`CAM.K` classes, the
    teacher's map resized to the student's, a softmax at temperature `CAM.T` (over space here, not over the batch),
    squared differences weighted by `CAM.LOSS.FEAT_WEIGHT` (read but ignored by the fork), warm-up `CAM.WARMUP`.
    `CAM.ALPHA/BETA/METHOD/UPSAMPLE` are unused, as in the fork.
    """

    @staticmethod
    def settings(cfg) -> Tuple[Dict[str, object], Dict[str, str]]:
        node = cfg.CAM
        settings = {"CE_WEIGHT": node.LOSS.CE_WEIGHT, "KD_WEIGHT": 0.9, "KD_T": 4.0,
                    "EXP_WEIGHT": node.LOSS.FEAT_WEIGHT, "WARMUP": node.WARMUP, "TOPK": node.K,
                    "EXPLAINER": "cam", "LAYER": "gap", "RULE": None, "DETACH_NORMALIZERS": False, "RESOLUTION": 0,
                    "NORM": "softmax", "T": node.T, "DISTANCE": "mse"}
        keys = {"CE_WEIGHT": "CAM.LOSS.CE_WEIGHT", "EXP_WEIGHT": "CAM.LOSS.FEAT_WEIGHT", "WARMUP": "CAM.WARMUP",
                "TOPK": "CAM.K", "T": "CAM.T"}
        return settings, {name: keys.get(name, f"CAM (fixed {name})") for name in settings}
