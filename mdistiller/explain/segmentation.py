"""Segmentation test on ImageNet-Segmentation's `gtsegs_ijcv.mat` (MATLAB v7.3 = HDF5) or a file in its layout.

Layout (as TE's `data/Imagenet.py` reads it): `/value/img` is an (N, 1) array of object references, each to a
(3, W, H) uint8 dataset; `/value/gt` is an (N, 1) array of references, each to a (1, 1) array of references to a
(W, H) uint8 {0, 1} mask. The explained class is the model's prediction (the file carries no ImageNet label).
"""
from typing import Callable, Dict, Iterable, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .metrics import SegmentationMeter

MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CPU = torch.device("cpu")  # the evaluation loops' default device
_MAT_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: mdistiller. HDF5 schema 1.00 ."


def write_gtsegs(path: str, images: Iterable[np.ndarray], masks: Iterable[np.ndarray]) -> int:
    """Write (H, W, 3) uint8 images and (H, W) {0, 1} masks in the `gtsegs_ijcv.mat` layout; returns the count."""
    import h5py

    images, masks = list(images), list(masks)
    if len(images) != len(masks) or not images:
        raise ValueError(f"write_gtsegs: {len(images)} images and {len(masks)} masks, expected equal and non-zero")
    ref_dtype = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        value.attrs["MATLAB_class"] = np.bytes_("struct")
        img_refs = value.create_dataset("img", (len(images), 1), dtype=ref_dtype)
        gt_refs = value.create_dataset("gt", (len(images), 1), dtype=ref_dtype)
        for c in (img_refs, gt_refs):
            c.attrs["MATLAB_class"] = np.bytes_("cell")
        for i, (img, mask) in enumerate(zip(images, masks)):
            img = np.asarray(img, dtype=np.uint8)
            mask = np.asarray(mask, dtype=np.uint8)
            if img.ndim != 3 or img.shape[2] != 3 or mask.shape != img.shape[:2]:
                raise ValueError(f"write_gtsegs: sample {i} image {img.shape} / mask {mask.shape}, "
                                 "expected (H, W, 3) / (H, W)")
            d_img = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0))
            d_img.attrs["MATLAB_class"] = np.bytes_("uint8")
            d_mask = refs.create_dataset(f"mask{i}", data=mask.transpose(1, 0))
            d_mask.attrs["MATLAB_class"] = np.bytes_("uint8")
            cell = refs.create_dataset(f"gt{i}", (1, 1), dtype=ref_dtype)
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            cell[0, 0] = d_mask.ref
            img_refs[i, 0] = d_img.ref
            gt_refs[i, 0] = cell.ref
    with open(path, "r+b") as fh:
        fh.write(_MAT_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return len(images)


class GtSegsDataset(Dataset):
    """Items are (image in [0, 1] (3, S, S), mask long (S, S)): PIL bilinear resize of the image, nearest of the
    mask."""

    def __init__(self, path: str, size: int = 224, limit: int = 0) -> None:
        import h5py

        self.path, self.size = path, size
        with h5py.File(path, "r") as f:
            if "value" not in f or "img" not in f["value"] or "gt" not in f["value"]:
                raise ValueError(f"{path}: not in the gtsegs_ijcv.mat layout (needs /value/img and /value/gt)")
            n = f["value/img"].shape[0]
        self.length = min(n, limit) if limit > 0 else n
        self._file = None

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The stored (H, W, 3) uint8 image and (H, W) mask, read exactly as TE does."""
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        f = self._file
        img = np.array(f[f["value/img"][index, 0]]).transpose(2, 1, 0)
        mask = np.array(f[f[f["value/gt"][index, 0]][0, 0]]).transpose(1, 0)
        return img.astype(np.uint8), mask.astype(np.uint8)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.raw(index)
        s = (self.size, self.size)
        img = np.asarray(Image.fromarray(img).convert("RGB").resize(s, Image.BILINEAR), dtype=np.float32) / 255.0
        mask = np.asarray(Image.fromarray(mask).resize(s, Image.NEAREST), dtype=np.int64)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def upsample_maps(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps to (B, H, W), bilinear with align_corners=False as in TE."""
    if maps.shape[-2:] == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def segmentation_evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    map_fn: MapFn,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device = CPU,
    keep: int = 0,
    seed: int = 0,
) -> Dict[str, object]:
    """Run the test over `loader` of (image01, mask) batches; `map_fn(x_normalised, classes (B,)) -> (B, h, w)`.

    Returns "scores" (the data-set aggregates), "uncertainty" (per score: std over images and a 95 % interval, the
    bootstrap ones seeded with `seed`; SegmentationMeter.uncertainty), "per_image" (index, pred and each image's own
    scores) and "examples", the first `keep` (image, mask, map) triples for figures.
    """
    meter = SegmentationMeter()
    kept = {"image": [], "mask": [], "map": []}
    preds = []
    model.eval()
    for image, mask in loader:
        x = normalize(image.to(device))
        with torch.no_grad():
            pred = model(x)[0].argmax(1)
        maps = upsample_maps(map_fn(x, pred).detach(), mask.shape[-2:]).cpu()
        for r, m in zip(maps, mask):
            meter.update(r, m)
        preds.append(pred.cpu())
        n_keep = keep - sum(t.shape[0] for t in kept["image"])
        if n_keep > 0:
            kept["image"].append(image[:n_keep])
            kept["mask"].append(mask[:n_keep])
            kept["map"].append(maps[:n_keep])
    scores = meter.result()
    per_image = {"index": np.arange(scores["num_images"]), "pred": torch.cat(preds).numpy(), **meter.per_image()}
    return {"scores": scores, "uncertainty": meter.uncertainty(seed), "per_image": per_image,
            "examples": {k: torch.cat(v) for k, v in kept.items() if v}}
