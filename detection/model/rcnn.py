"""Faster R-CNN (FPN) student distilled from a frozen Faster R-CNN teacher: DKD on ROI logits, ReviewKD on FPN maps."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from yacs.config import CfgNode

from mdistiller.distillers.DKD import dkd_loss

from .backbone import FPN_CHANNELS, build_backbone, cached_torchvision_file, load_state_dict_file
from .reviewkd import ReviewKDFusion, hcl_loss

_FPN_LEVELS = 5
_TORCHVISION_COCO_TEACHERS = {"resnet50": FasterRCNN_ResNet50_FPN_Weights.COCO_V1}  # 37.0 box AP


def rcnn_dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Sequence[torch.Tensor],
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """DKD over all sampled ROIs of the batch, the matched class (0 = background) playing the target's role."""
    return dkd_loss(student_logits, teacher_logits, torch.cat(list(labels)), alpha, beta, temperature)


class TrainTestTransform(GeneralizedRCNNTransform):
    """torchvision's resize/normalise/pad, but resizing to MIN_SIZE_TEST in eval mode (torchvision would reuse the
    last training size)."""

    def __init__(self, min_size_train: Sequence[int], min_size_test: int, max_size: int, mean, std):
        super().__init__(tuple(min_size_train), max_size, list(mean), list(std))
        self.min_sizes = {True: tuple(min_size_train), False: (min_size_test,)}

    def train(self, mode: bool = True):
        super().train(mode)
        self.min_size = self.min_sizes[mode]
        return self


def _faster_rcnn(cfg: CfgNode, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> FasterRCNN:
    rpn, roi = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    detector = FasterRCNN(
        backbone,
        num_classes=cfg.MODEL.NUM_CLASSES,
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN,
        rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN,
        rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_nms_thresh=rpn.NMS_THRESH,
        rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE,
        box_positive_fraction=roi.POSITIVE_FRACTION,
        box_score_thresh=roi.SCORE_THRESH_TEST,
        box_nms_thresh=roi.NMS_THRESH_TEST,
        box_detections_per_img=roi.DETECTIONS_PER_IMAGE,
    )
    detector.transform = TrainTestTransform(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE, mean, std
    )
    return detector


def build_student(cfg: CfgNode) -> FasterRCNN:
    """The student detector; MODEL.WEIGHTS (a full detector checkpoint), when set, overrides the backbone weights."""
    bb = cfg.MODEL.BACKBONE
    backbone = build_backbone(bb.NAME, bb.NORM, "" if cfg.MODEL.WEIGHTS else bb.WEIGHTS, bb.TRAINABLE_LAYERS)
    student = _faster_rcnn(cfg, backbone, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD)
    if cfg.MODEL.WEIGHTS:
        student.load_state_dict(load_state_dict_file(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS"))
    return student


def build_teacher(cfg: CfgNode) -> FasterRCNN:
    """The frozen teacher: torchvision's COCO detector from the local cache, or a checkpoint of the same layout."""
    name, weights = cfg.TEACHER.BACKBONE.NAME, cfg.TEACHER.WEIGHTS
    backbone = build_backbone(name, cfg.TEACHER.BACKBONE.NORM)
    teacher = _faster_rcnn(cfg, backbone, cfg.TEACHER.PIXEL_MEAN, cfg.TEACHER.PIXEL_STD)
    if weights == "torchvision":
        if name not in _TORCHVISION_COCO_TEACHERS:
            raise ValueError(
                f"TEACHER.WEIGHTS: torchvision has no COCO Faster R-CNN FPN for {name!r} "
                f"(only {sorted(_TORCHVISION_COCO_TEACHERS)}); give a checkpoint path"
            )
        entry = _TORCHVISION_COCO_TEACHERS[name]
        state = torch.load(cached_torchvision_file(entry, "TEACHER.WEIGHTS"), map_location="cpu", weights_only=True)
    elif weights:
        state = load_state_dict_file(weights, "TEACHER.WEIGHTS")
    else:
        raise ValueError(f"TEACHER.WEIGHTS is empty for KD.TYPE {cfg.KD.TYPE}: give 'torchvision' or a checkpoint path")
    teacher.load_state_dict(state)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()


class RCNNKD(nn.Module):
    """Student Faster R-CNN trained with its own losses plus `loss_dkd` and/or `loss_reviewkd` from a frozen teacher.

    Training: `forward(images, targets) -> {loss name: loss}`; evaluation: `forward(images) -> detections`
    (the student's). Teacher and student see the same resized, padded batch, each with its own normalisation.
    """

    def __init__(self, student: FasterRCNN, teacher: Optional[FasterRCNN], cfg: CfgNode):
        super().__init__()
        self.kd_type = cfg.KD.TYPE
        if (teacher is None) != (self.kd_type == "NONE"):
            raise ValueError(f"KD.TYPE {self.kd_type}: a teacher is needed exactly when KD.TYPE is not NONE")
        self.student = student
        self.teacher = teacher
        self.use_dkd = self.kd_type in ("DKD", "ReviewDKD")
        self.use_reviewkd = self.kd_type in ("ReviewKD", "ReviewDKD")
        self.dkd_args = (cfg.KD.DKD.ALPHA, cfg.KD.DKD.BETA, cfg.KD.DKD.T)
        self.reviewkd_weight = cfg.KD.REVIEWKD.LOSS_WEIGHT
        self.kd_trans = (
            ReviewKDFusion([FPN_CHANNELS] * _FPN_LEVELS, [FPN_CHANNELS] * _FPN_LEVELS, FPN_CHANNELS)
            if self.use_reviewkd
            else None
        )

    def train(self, mode: bool = True):
        """Student (and fusion) follow `mode`; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Everything but the teacher, which is rebuilt from TEACHER.WEIGHTS (keeps checkpoints small)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        if not self.training:
            return self.student(images)
        if targets is None:
            raise ValueError("RCNNKD: targets are required in training mode")
        student = self.student
        image_list, targets = student.transform(images, targets)
        features = student.backbone(image_list.tensors)
        proposals, losses = student.rpn(image_list, features, targets)
        rois, _, labels, regression_targets = student.roi_heads.select_training_samples(proposals, targets)
        logits, box_regression = self._box_predictions(student, features, rois, image_list.image_sizes)
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, box_regression, labels, regression_targets)
        losses = {**losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.teacher is None:
            return losses
        with torch.no_grad():
            teacher_features = self.teacher.backbone(self._teacher_tensors(image_list))
        if self.use_dkd:
            with torch.no_grad():
                teacher_logits, _ = self._box_predictions(self.teacher, teacher_features, rois, image_list.image_sizes)
            losses["loss_dkd"] = rcnn_dkd_loss(logits, teacher_logits, labels, *self.dkd_args)
        if self.use_reviewkd:
            fused = self.kd_trans(list(features.values()))
            losses["loss_reviewkd"] = self.reviewkd_weight * hcl_loss(fused, list(teacher_features.values()))
        return losses

    @staticmethod
    def _box_predictions(
        detector: FasterRCNN, features: Dict[str, torch.Tensor], rois: List[torch.Tensor], image_sizes
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        heads = detector.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(features, rois, image_sizes)))

    def _teacher_tensors(self, image_list: ImageList) -> torch.Tensor:
        """Re-normalise the student's batch for the teacher; padding stays 0 as if the teacher had padded it."""
        x = image_list.tensors
        s_mean, s_std, t_mean, t_std = (
            x.new_tensor(v).view(1, -1, 1, 1)
            for v in (
                self.student.transform.image_mean,
                self.student.transform.image_std,
                self.teacher.transform.image_mean,
                self.teacher.transform.image_std,
            )
        )
        if torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std):
            return x
        y = (x * s_std + s_mean - t_mean) / t_std
        mask = torch.zeros_like(x[:, :1])
        for i, (h, w) in enumerate(image_list.image_sizes):
            mask[i, :, :h, :w] = 1.0
        return y * mask


def build_distiller(cfg: CfgNode) -> RCNNKD:
    teacher = None if cfg.KD.TYPE == "NONE" else build_teacher(cfg)
    return RCNNKD(build_student(cfg), teacher, cfg)
