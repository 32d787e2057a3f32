"""Teacher-student explanation agreement: what Exp-KD claims to transfer, measured per sample.

Both maps are brought to a common resolution (bilinear), then compared by the cosine of the flattened maps and by
the IoU of their top-`top` fraction of pixels (a stable sort, so ties are broken identically for both maps).
"""
from typing import Callable, Dict, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import mean_interval
from .segmentation import CPU, upsample_maps

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_region(maps: torch.Tensor, top: float) -> torch.Tensor:
    """(B, H, W) -> boolean (B, H*W) marking the `int(H*W*top)` (at least 1) most relevant pixels."""
    flat = maps.reshape(maps.shape[0], -1)
    k = max(1, int(flat.shape[1] * top))
    order = torch.argsort(-flat, dim=1, stable=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)


def map_agreement(maps_teacher: torch.Tensor, maps_student: torch.Tensor, top: float = 0.2) -> Dict[str, torch.Tensor]:
    """Per-sample cosine similarity and top-region IoU of (B, h, w) maps; the student map is resized to the
    teacher's."""
    if not 0 < top <= 1:
        raise ValueError(f"map_agreement: top={top}, expected a fraction in (0, 1]")
    if maps_teacher.shape[0] != maps_student.shape[0]:
        raise ValueError(f"map_agreement: batch sizes differ, teacher {tuple(maps_teacher.shape)} "
                         f"student {tuple(maps_student.shape)}")
    t = maps_teacher.float()
    s = upsample_maps(maps_student.float(), t.shape[-2:])
    cosine = F.cosine_similarity(t.reshape(t.shape[0], -1), s.reshape(s.shape[0], -1), dim=1, eps=1e-12)
    rt, rs = top_region(t, top), top_region(s, top)
    iou = (rt & rs).sum(1).float() / (rt | rs).sum(1).float()
    return {"cosine": cosine, "iou": iou}


def agreement_test(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    loader: Iterable,
    map_fn_teacher: MapFn,
    map_fn_student: MapFn,
    normalize_teacher: Callable[[torch.Tensor], torch.Tensor],
    normalize_student: Callable[[torch.Tensor], torch.Tensor],
    target: str = "teacher",
    top: float = 0.2,
    device: torch.device = CPU,
) -> Dict[str, object]:
    """Mean agreement over ([0, 1] images, labels) batches, both models explaining the same class: the teacher's
    prediction (`target="teacher"`) or the label (`"label"`).

    Returns the means ("cosine", "iou"), both models' clean accuracies (agreement alone does not say whether the
    student is any good), "uncertainty" (std and normal 95 % interval over samples) and "per_image" (index, label,
    teacher_pred, student_pred, explained, cosine, iou).
    """
    if target not in ("teacher", "label"):
        raise ValueError(f"agreement_test: target={target!r}, expected 'teacher' or 'label'")
    teacher.eval()
    student.eval()
    rows = {k: [] for k in ("label", "teacher_pred", "student_pred", "explained", "cosine", "iou")}
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        xt, xs = normalize_teacher(images), normalize_student(images)
        with torch.no_grad():
            teacher_pred, student_pred = teacher(xt)[0].argmax(1), student(xs)[0].argmax(1)
        classes = teacher_pred if target == "teacher" else labels
        scores = map_agreement(map_fn_teacher(xt, classes).detach(), map_fn_student(xs, classes).detach(), top)
        for k, v in (("label", labels), ("teacher_pred", teacher_pred), ("student_pred", student_pred),
                     ("explained", classes), *scores.items()):
            rows[k].append(v.cpu())
    if not rows["cosine"]:
        raise ValueError("agreement_test: the loader yielded no batch")
    per_image = {k: torch.cat(v).numpy() for k, v in rows.items()}
    n = per_image["cosine"].shape[0]
    per_image = {"index": np.arange(n), **per_image}
    return {
        "cosine": float(per_image["cosine"].mean()),
        "iou": float(per_image["iou"].mean()),
        "teacher_accuracy": float((per_image["teacher_pred"] == per_image["label"]).mean()),
        "student_accuracy": float((per_image["student_pred"] == per_image["label"]).mean()),
        "num_images": n,
        "uncertainty": {k: mean_interval(per_image[k]) for k in ("cosine", "iou")},
        "per_image": per_image,
    }
