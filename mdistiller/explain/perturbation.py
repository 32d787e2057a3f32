"""Perturbation test: black out the most (positive) or least (negative) relevant pixels, 10 % ... 90 %.

Pixels are set to 0 in all channels in [0, 1] image space and only then normalised with the statistics the model was
trained with (TE's CNN copies wrongly normalise with 0.5). Equal relevance (the zero plateaus of a ReLU'd map) needs a
tie rule, and it moves the accuracies (docs/evaluation.md, "Ties"):

- "random" (default): a descending sort whose ties fall in a seeded random order per image (seed, image index), so a
  plateau is removed uniformly, not from the top rows down, and the result does not depend on the batch size;
- "raster": a stable descending sort, ties in pixel-index order (top rows first; biased);
- "topk": `torch.topk(map, k)` computed afresh at every step, exactly the reference's call (its tie order is
  torch's, implementation-defined: it differs between devices and versions, and the sets need not be nested).

The negative test ranks the negated map, so `negative=True` on `m` equals `negative=False` on `-m` exactly in every
mode. The protocol is in docs/evaluation.md.
"""
from typing import Callable, Dict, Iterable, Optional, Sequence

import numpy as np
import torch

from .metrics import PERTURBATION_FRACTIONS, mean_interval, perturbation_auc, perturbation_aucs
from .segmentation import CPU, upsample_maps

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TIES = ("random", "raster", "topk")


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"perturbation ties={ties!r}: expected one of {TIES}")


def _scores(maps: torch.Tensor, negative: bool) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return -flat if negative else flat


def image_seeds(seed: int, indices: Sequence[int]) -> list:
    """One random-tie seed per image, from the run's seed and the image's index in the data set (not its batch).
    Mixed by numpy's SeedSequence into 32 bits: torch's CPU generator keeps only the low 32 bits of a seed."""
    return [int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]) for i in indices]


def pixel_order(maps: torch.Tensor, negative: bool = False, ties: str = "random",
                seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) pixel indices, most relevant first (least relevant first if `negative`).

    `seeds`: one per image for `ties="random"` (default 0 ... B-1). For "topk" this is `torch.topk` over all pixels;
    the test itself calls topk per step (`removed_indices`), as the reference does.
    """
    _check_ties(ties)
    score = _scores(maps, negative)
    if ties == "topk":
        return torch.topk(score, score.shape[1], dim=1).indices
    if ties == "raster":
        return torch.argsort(-score, dim=1, stable=True)
    seeds = range(score.shape[0]) if seeds is None else seeds
    if len(seeds) != score.shape[0]:
        raise ValueError(f"pixel_order: {len(seeds)} seeds for {score.shape[0]} maps")
    perms = torch.stack([torch.randperm(score.shape[1], generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(score.device)
    return perms.gather(1, torch.argsort(-score.gather(1, perms), dim=1, stable=True))


def removed_indices(maps: torch.Tensor, fraction: float, negative: bool = False, ties: str = "random",
                    seeds: Optional[Sequence[int]] = None, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, k) indices of the pixels removed at `fraction`, k = int(H*W*fraction) as in the reference. `order`
    (from `pixel_order`, same ties) saves re-sorting at every step; "topk" never uses it."""
    _check_ties(ties)
    k = int(maps.shape[-2] * maps.shape[-1] * fraction)
    if ties == "topk":
        return torch.topk(_scores(maps, negative), k, dim=1).indices
    if order is None:
        order = pixel_order(maps, negative, ties, seeds)
    return order[:, :k]


def remove_pixels(images: torch.Tensor, order: torch.Tensor, fraction: float) -> torch.Tensor:
    """Copy of [0, 1] `images` (B, C, H, W) with the first `int(H*W*fraction)` pixels of `order` set to black."""
    b, c, h, w = images.shape
    k = int(h * w * fraction)
    keep = torch.ones(b, h * w, dtype=images.dtype, device=images.device)
    keep.scatter_(1, order[:, :k], 0.0)
    return images * keep.view(b, 1, h, w)


def perturbation_hits(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    maps: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    negative: bool = False,
    fractions: Sequence[float] = PERTURBATION_FRACTIONS,
    ties: str = "random",
    seeds: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """(len(fractions), B) booleans: is the top-1 prediction still the label after removing each fraction."""
    full = upsample_maps(maps, images.shape[-2:])
    order = None if ties == "topk" else pixel_order(full, negative, ties, seeds)
    hits = []
    with torch.no_grad():
        for p in fractions:
            removed = removed_indices(full, p, negative, ties, seeds, order)
            logits = model(normalize(remove_pixels(images, removed, p)))[0]
            hits.append(logits.argmax(1) == labels)
    return torch.stack(hits)


def perturbation_test(
    model: torch.nn.Module,
    loader: Iterable,
    map_fn: MapFn,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    negative: bool = False,
    target: str = "top",
    device: torch.device = CPU,
    ties: str = "random",
    seed: int = 0,
) -> Dict[str, object]:
    """Accuracy per removed fraction and its AUC over `loader` of ([0, 1] images, labels) batches.

    `map_fn(x_normalised, classes (B,)) -> (B, h, w)` explains the predicted class (`target="top"`) or the label
    (`target="label"`). Returns the aggregates (the accuracy curve is the mean of the per-image 0/1 curves, and the
    AUC the mean of the per-image AUCs, the area being linear), their std and 95 % interval over images
    ("uncertainty"), and the per-image records ("per_image": index, label, pred, explained, hits (N, 10), auc).
    """
    if target not in ("top", "label"):
        raise ValueError(f"perturbation_test: target={target!r}, expected 'top' or 'label'")
    _check_ties(ties)
    model.eval()
    rows = {"index": [], "label": [], "pred": [], "explained": [], "hits": []}
    offset = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        x = normalize(images)
        with torch.no_grad():
            pred = model(x)[0].argmax(1)
        classes = pred if target == "top" else labels
        batch_maps = map_fn(x, classes).detach()
        index = range(offset, offset + images.shape[0])
        hits = perturbation_hits(model, images, labels, batch_maps, normalize, negative, ties=ties,
                                 seeds=image_seeds(seed, index))
        for key, value in (("index", torch.tensor(index)), ("label", labels), ("pred", pred),
                           ("explained", classes), ("hits", hits.T)):
            rows[key].append(value.cpu())
        offset += images.shape[0]
    if not offset:
        raise ValueError("perturbation_test: the loader yielded no batch")
    per_image = {k: torch.cat(v).numpy() for k, v in rows.items()}
    per_image["auc"] = perturbation_aucs(per_image["hits"])
    steps = [mean_interval(column) for column in per_image["hits"].T.astype(np.float64)]
    auc = mean_interval(per_image["auc"])
    return {
        "fractions": list(PERTURBATION_FRACTIONS),
        "accuracies": [s["mean"] for s in steps],
        "auc": perturbation_auc([s["mean"] for s in steps]),
        "clean_accuracy": steps[0]["mean"],
        "num_images": offset,
        "uncertainty": {"auc": auc, "accuracies": steps},
        "per_image": per_image,
    }
