"""Scores of the Transformer-Explainability evaluation protocols (perturbation AUC, segmentation test).

Pure functions on arrays, so the tools, the tests and notebooks compute the same numbers. The segmentation scores
follow TE's `imagenet_seg_eval.py` / `utils/metrices.py` exactly (pixel accuracy and IoU accumulated over the
dataset, AP averaged over images), except the F1, which is a true per-image F1 (TE averages F1 over image rows).
Every aggregate comes with its spread over images and a 95 % interval (`mean_interval`, `bootstrap_interval`).
"""
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from sklearn.metrics import average_precision_score

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

PERTURBATION_FRACTIONS = tuple(i / 10 for i in range(10))
Z95 = 1.959963984540054  # two-sided 95 % quantile of the normal distribution
BOOTSTRAP_RESAMPLES = 1000
NORMAL = "normal: mean ± 1.96·std/√n over images (std with ddof=1)"
BOOTSTRAP = "bootstrap: 2.5 and 97.5 percentiles of {} seeded resamples of the images (drawn with replacement)"


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
    return float(perturbation_aucs(acc[None])[0])


def perturbation_aucs(hits: ArrayLike) -> np.ndarray:
    """Per-image AUCs of (N, 10) 0/1 curves (one row per image); their mean is the AUC of the mean curve, since the
    trapezoid area is linear in the curve."""
    h = _numpy(hits)
    if h.ndim != 2 or h.shape[1] != len(PERTURBATION_FRACTIONS):
        raise ValueError(f"perturbation_aucs: hits has shape {h.shape}, expected (N, 10)")
    return np.sum((h[:, 1:] + h[:, :-1]) * np.diff(np.asarray(PERTURBATION_FRACTIONS)), axis=1) / 2 * 100


def _std(values: np.ndarray) -> Optional[float]:
    return float(np.std(values, ddof=1)) if values.size > 1 else None


def mean_interval(values: ArrayLike) -> Dict[str, object]:
    """Mean over images with its std (ddof=1) and the normal-approximation 95 % interval mean ± 1.96·std/√n (std and
    interval are None for a single image)."""
    v = _numpy(values).reshape(-1)
    if not v.size:
        raise ValueError("mean_interval: no value")
    mean, std = float(v.mean()), _std(v)
    half = None if std is None else Z95 * std / np.sqrt(v.size)
    ci = None if half is None else [mean - half, mean + half]
    return {"mean": mean, "std": std, "ci95": ci, "interval": NORMAL, "n": int(v.size)}


def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> Optional[list]:
    """Percentile 95 % interval of a statistic of n images: `statistic(counts)` gets a (resamples, n) matrix of how
    often each image was drawn (sampling with replacement, seeded) and returns one value per resample."""
    if n < 2:
        return None
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    low, high = np.percentile(statistic(counts), [2.5, 97.5])
    return [float(low), float(high)]


def normalize_map(relevance: ArrayLike) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes NaN in TE and its NaNs are zeroed, so it is all zeros here."""
    r = _numpy(relevance)
    lo, hi = r.min(), r.max()
    if hi <= lo:
        return np.zeros_like(r)
    return (r - lo) / (hi - lo)


class SegmentationMeter:
    """Streams (map, mask) pairs of one image at a time, so a dataset never has to sit in memory; keeps each image's
    counts and scores for the per-image records and the intervals."""

    def __init__(self) -> None:
        self.correct: list = []
        self.labeled: list = []
        self.inter: list = []
        self.union: list = []
        self.ap: list = []
        self.f1: list = []

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
        self.correct.append(float((pred == gt).sum()))
        self.labeled.append(float(gt.size))
        inter, union = np.zeros(2), np.zeros(2)
        for c in (0, 1):
            inter[c] = float(((pred == c) & (gt == c)).sum())
            union[c] = float((pred == c).sum() + (gt == c).sum()) - inter[c]
        self.inter.append(inter)
        self.union.append(union)
        # TE ranks bg scores (1 - R) and fg scores (R) jointly against one-hot labels; a constant map scores 0.
        bg_score = 1.0 - r if not constant else np.zeros_like(r)
        scores = np.concatenate([bg_score.reshape(-1), r.reshape(-1)])
        labels = np.concatenate([(gt == 0).reshape(-1), (gt == 1).reshape(-1)]).astype(np.int64)
        self.ap.append(float(np.nan_to_num(average_precision_score(labels, scores))))
        tp = float((fg & (gt == 1)).sum())
        denom = float(fg.sum() + (gt == 1).sum())
        self.f1.append(2 * tp / denom if denom > 0 else 0.0)

    def _sums(self, weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """Pixel accuracy and IoUs from counts summed over images, each image weighted (bootstrap counts)."""
        arrays = {"correct": np.asarray(self.correct), "labeled": np.asarray(self.labeled),
                  "inter": np.stack(self.inter), "union": np.stack(self.union)}
        w = np.ones((1, len(self.ap))) if weights is None else weights
        sums = {k: w @ v for k, v in arrays.items()}
        eps = np.spacing(1)
        iou = sums["inter"] / (eps + sums["union"])
        return {"pixel_accuracy": sums["correct"] / (eps + sums["labeled"]), "iou_bg": iou[:, 0], "iou_fg": iou[:, 1],
                "miou": iou.mean(1)}

    def result(self) -> Dict[str, float]:
        if not self.ap:
            raise ValueError("SegmentationMeter.result: no image was added")
        accumulated = {k: float(v[0]) for k, v in self._sums().items()}
        return {**accumulated, "map": float(np.mean(self.ap)), "f1": float(np.mean(self.f1)),
                "num_images": len(self.ap)}

    def per_image(self) -> Dict[str, np.ndarray]:
        """Each image's own scores (N,): pixel_accuracy, iou_bg, iou_fg, miou (an IoU is 0 where the class is in
        neither prediction nor mask, TE's eps convention), map (its AP) and f1."""
        eps = np.spacing(1)
        iou = np.stack(self.inter) / (eps + np.stack(self.union))
        return {"pixel_accuracy": np.asarray(self.correct) / (eps + np.asarray(self.labeled)), "iou_bg": iou[:, 0],
                "iou_fg": iou[:, 1], "miou": iou.mean(1), "map": np.asarray(self.ap), "f1": np.asarray(self.f1)}

    def uncertainty(self, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> Dict[str, Dict[str, object]]:
        """Per score: "std" of the per-image scores (ddof=1) and a 95 % interval. map and f1 are means over images
        (normal interval); pixel_accuracy and the IoUs are ratios of sums over the data set, not means of the
        per-image column, so their interval is a seeded bootstrap over images."""
        per_image = self.per_image()
        out = {k: mean_interval(per_image[k]) for k in ("map", "f1")}
        n = len(self.ap)
        for k in ("pixel_accuracy", "iou_bg", "iou_fg", "miou"):
            ci = bootstrap_interval(lambda counts, k=k: self._sums(counts)[k], n, seed, resamples)
            out[k] = {"std": _std(per_image[k]), "ci95": ci, "interval": BOOTSTRAP.format(resamples), "n": n}
        return out


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
