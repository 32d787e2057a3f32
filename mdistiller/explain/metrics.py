"""Scores of the Transformer-Explainability evaluation protocols (perturbation AUC, segmentation test).

Pure functions on arrays, so the tools, the tests and notebooks compute the same numbers. The segmentation scores
follow TE's `imagenet_seg_eval.py` / `utils/metrices.py` exactly (pixel accuracy and IoU accumulated over the
dataset, AP averaged over images), except the F1, which is a true per-image F1 (TE averages F1 over image rows).
"""
from typing import Dict, Sequence, Union

import numpy as np
import torch
from sklearn.metrics import average_precision_score

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

PERTURBATION_FRACTIONS = tuple(i / 10 for i in range(10))


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def perturbation_auc(accuracies: ArrayLike) -> float:
    """Trapezoid area under accuracy-vs-removed-fraction over x = 0, 0.1, ..., 0.9, times 100 (worked example in
    docs/evaluation.md).

    `accuracies[0]` is the unperturbed accuracy; the result lies in [0, 90].
    """
    acc = _numpy(accuracies).reshape(-1)
    if acc.shape[0] != len(PERTURBATION_FRACTIONS):
        raise ValueError(f"perturbation_auc: accuracies has {acc.shape[0]} values, expected 10 (at 0, 0.1, ..., 0.9)")
    x = np.asarray(PERTURBATION_FRACTIONS)
    return float(np.sum((acc[1:] + acc[:-1]) * np.diff(x)) / 2 * 100)


def normalize_map(relevance: ArrayLike) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes NaN in TE and its NaNs are zeroed, so it is all zeros here."""
    r = _numpy(relevance)
    lo, hi = r.min(), r.max()
    if hi <= lo:
        return np.zeros_like(r)
    return (r - lo) / (hi - lo)


class SegmentationMeter:
    """Streams (map, mask) pairs of one image at a time, so a dataset never has to sit in memory."""

    def __init__(self) -> None:
        self.correct = 0.0
        self.labeled = 0.0
        self.inter = np.zeros(2)
        self.union = np.zeros(2)
        self.ap = []
        self.f1 = []

    def update(self, relevance: ArrayLike, mask: ArrayLike) -> None:
        """Add one image: `relevance` (H, W) at the mask's resolution, `mask` (H, W) in {0, 1}."""
        r = _numpy(relevance)
        gt = _numpy(mask).astype(np.int64)
        if r.shape != gt.shape or r.ndim != 2:
            raise ValueError(f"SegmentationMeter.update: map shape {r.shape} must equal mask shape {gt.shape} (H, W)")
        if not np.isin(gt, (0, 1)).all():
            raise ValueError(f"SegmentationMeter.update: mask values {np.unique(gt)[:5]} must be 0 (bg) or 1 (fg)")
        constant = r.max() <= r.min()
        r = normalize_map(r)
        fg = (r > r.mean()) if not constant else np.zeros_like(gt, dtype=bool)
        pred = fg.astype(np.int64)
        self.correct += float((pred == gt).sum())
        self.labeled += float(gt.size)
        for c in (0, 1):
            inter = float(((pred == c) & (gt == c)).sum())
            self.inter[c] += inter
            self.union[c] += float((pred == c).sum() + (gt == c).sum()) - inter
        # TE ranks bg scores (1 - R) and fg scores (R) jointly against one-hot labels; a constant map scores 0.
        bg_score = 1.0 - r if not constant else np.zeros_like(r)
        scores = np.concatenate([bg_score.reshape(-1), r.reshape(-1)])
        labels = np.concatenate([(gt == 0).reshape(-1), (gt == 1).reshape(-1)]).astype(np.int64)
        self.ap.append(float(np.nan_to_num(average_precision_score(labels, scores))))
        tp = float((fg & (gt == 1)).sum())
        denom = float(fg.sum() + (gt == 1).sum())
        self.f1.append(2 * tp / denom if denom > 0 else 0.0)

    def result(self) -> Dict[str, float]:
        if not self.ap:
            raise ValueError("SegmentationMeter.result: no image was added")
        eps = np.spacing(1)
        iou = self.inter / (eps + self.union)
        return {
            "pixel_accuracy": float(self.correct / (eps + self.labeled)),
            "miou": float(iou.mean()),
            "iou_bg": float(iou[0]),
            "iou_fg": float(iou[1]),
            "map": float(np.mean(self.ap)),
            "f1": float(np.mean(self.f1)),
            "num_images": len(self.ap),
        }


def segmentation_scores(maps: ArrayLike, masks: ArrayLike) -> Dict[str, float]:
    """TE segmentation test on `maps`, `masks` of shape (N, H, W): keys pixel_accuracy, miou, map, f1 (+ iou_bg,
    iou_fg, num_images). Maps are raw relevance; each is min-max normalised and thresholded at its mean."""
    maps_np, masks_np = _numpy(maps), _numpy(masks)
    if maps_np.ndim == 2:
        maps_np, masks_np = maps_np[None], masks_np[None]
    if maps_np.shape != masks_np.shape or maps_np.ndim != 3:
        raise ValueError(f"segmentation_scores: maps {maps_np.shape} and masks {masks_np.shape} must both be (N, H, W)")
    meter = SegmentationMeter()
    for r, m in zip(maps_np, masks_np):
        meter.update(r, m)
    return meter.result()
