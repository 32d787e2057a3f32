"""Detector construction: FPN backbones, ReviewKD fusion, and the RCNNKD distiller."""
from .rcnn import RCNNKD, build_distiller, build_student, build_teacher, rcnn_dkd_loss

__all__ = ["RCNNKD", "build_distiller", "build_student", "build_teacher", "rcnn_dkd_loss"]
