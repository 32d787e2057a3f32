"""Perturbation test: black out the most (positive) or least (negative) relevant pixels, 10 % ... 90 %.

Pixels are set to 0 in all channels in [0, 1] image space and only then normalised with the statistics the model was
trained with (TE's CNN copies wrongly normalise with 0.5). The pixel order is a stable descending sort of the map
(ties broken by pixel index), computed once per batch; the negative test sorts the negated map, so
`negative=True` on `m` equals `negative=False` on `-m` exactly. The protocol is in docs/evaluation.md.
"""
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

from .metrics import PERTURBATION_FRACTIONS, perturbation_auc
from .segmentation import CPU, upsample_maps

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pixel_order(maps: torch.Tensor, negative: bool = False) -> torch.Tensor:
    """(B, H, W) maps -> (B, H*W) pixel indices, most relevant first (least relevant first if `negative`)."""
    flat = maps.reshape(maps.shape[0], -1)
    return torch.argsort(flat if negative else -flat, dim=1, stable=True)


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
) -> torch.Tensor:
    """(len(fractions), B) booleans: is the top-1 prediction still the label after removing each fraction."""
    order = pixel_order(upsample_maps(maps, images.shape[-2:]), negative)
    hits = []
    with torch.no_grad():
        for p in fractions:
            logits = model(normalize(remove_pixels(images, order, p)))[0]
            hits.append(logits.argmax(1) == labels)
    return torch.stack(hits)


def perturbation_test(
    model: torch.nn.Module,
    loader: Iterable,
    map_fn: Optional[MapFn],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    negative: bool = False,
    target: str = "top",
    device: torch.device = CPU,
    maps: Optional[List[torch.Tensor]] = None,
) -> Dict[str, object]:
    """Accuracy per removed fraction and its AUC over `loader` of ([0, 1] images, labels) batches.

    `map_fn(x_normalised, classes (B,)) -> (B, h, w)` explains the predicted class (`target="top"`) or the label
    (`target="label"`). Pass `maps` (one low-resolution tensor per batch, e.g. from a cache) to skip `map_fn`; the
    maps used are returned under "maps" so a caller can cache them.
    """
    if target not in ("top", "label"):
        raise ValueError(f"perturbation_test: target={target!r}, expected 'top' or 'label'")
    model.eval()
    hits, used = [], []
    for i, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        if maps is not None:
            batch_maps = maps[i].to(device)
        else:
            x = normalize(images)
            with torch.no_grad():
                pred = model(x)[0].argmax(1)
            batch_maps = map_fn(x, pred if target == "top" else labels).detach()
        used.append(batch_maps.cpu())
        hits.append(perturbation_hits(model, images, labels, batch_maps, normalize, negative))
    if not hits:
        raise ValueError("perturbation_test: the loader yielded no batch")
    acc = torch.cat(hits, dim=1).float().mean(1).tolist()
    return {
        "fractions": list(PERTURBATION_FRACTIONS),
        "accuracies": acc,
        "auc": perturbation_auc(acc),
        "num_images": int(sum(h.shape[1] for h in hits)),
        "maps": used,
    }
