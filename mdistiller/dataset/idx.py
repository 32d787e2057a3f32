"""MNIST and Fashion-MNIST from their standard IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte`,
`t10k-...`), read by our own code. The files are looked for in torchvision's `<ROOT>/<Name>/raw/` layout, then
directly in DATASET.ROOT (Debian's `dataset-fashion-mnist` installs the four .gz files in
/usr/share/datasets/fashion-mnist). The 28x28 grey images are served like CIFAR: zero-padded by 2 pixels to 32x32
and the channel replicated to RGB, so every CIFAR-sized model runs on them (data/README.md)."""
import gzip
import struct
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from torchvision import transforms

from ._common import ArrayImages, DatasetError
from .base import DatasetSpec, register_dataset

NUM_CLASSES = 10
PAD = 2  # 28 + 2·2 = 32
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _files(split: str) -> Tuple[str, str]:
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def _find(root: Path, torchvision_name: str, name: str) -> Optional[Path]:
    """The first of ROOT/<Name>/raw/<file>[.gz], ROOT/<file>[.gz] that exists."""
    for folder in (root / torchvision_name / "raw", root):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read(path: Path, magic: int, how_to_get: str) -> Tuple[List[int], bytes]:
    """(dimensions, payload) of an IDX file of unsigned bytes, checked against its header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path} cannot be read ({type(err).__name__}: {err}); {how_to_get}") from None
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(data) < header or struct.unpack(">I", data[:4])[0] != magic:
        found = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else "nothing"
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes with magic {magic} (found {found}); "
                           f"{how_to_get}")
    dims = list(struct.unpack(f">{ndim}I", data[4:header]))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetError(f"{path}: its header announces {dims} = {expected} bytes but it holds "
                           f"{len(data) - header} (truncated or corrupt); {how_to_get}")
    return dims, data[header:]


@lru_cache(maxsize=4)
def read_split(root: str, torchvision_name: str, train: bool, how_to_get: str) -> Tuple[np.ndarray, np.ndarray]:
    """(grey images uint8 [N, 32, 32], zero-padded, and labels int64 [N]); the transforms replicate the channel."""
    images_name, labels_name = _files("train" if train else "t10k")
    paths = [_find(Path(root), torchvision_name, name) for name in (images_name, labels_name)]
    for path, name in zip(paths, (images_name, labels_name)):
        if path is None:
            raise DatasetError(f"{name}[.gz] is missing: looked in {Path(root) / torchvision_name / 'raw'} and "
                               f"{root}; {how_to_get}")
    (count, rows, cols), pixels = _read(paths[0], IMAGES_MAGIC, how_to_get)
    (label_count,), label_bytes = _read(paths[1], LABELS_MAGIC, how_to_get)
    if (rows, cols) != (28, 28) or label_count != count:
        raise DatasetError(f"{paths[0]}: {count} images of {rows}x{cols} with {label_count} labels in {paths[1]}; "
                           f"expected 28x28 images, one label each; {how_to_get}")
    labels = np.frombuffer(label_bytes, np.uint8).astype(np.int64)
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{paths[1]}: label {int(labels.max())} is out of range [0, {NUM_CLASSES}); {how_to_get}")
    return np.pad(np.frombuffer(pixels, np.uint8).reshape(count, 28, 28), ((0, 0), (PAD, PAD), (PAD, PAD))), labels


def _idx_dataset(title: str, torchvision_name: str, mean: float, std: float, flip: bool):
    def factory(data_cfg) -> DatasetSpec:
        root = str(data_cfg.ROOT)
        how_to_get = (f"put the four {title} IDX files (.gz or not) in {root} or {root}/{torchvision_name}/raw, "
                      f"or set DATASET.DOWNLOAD True with a network")
        stats = ((mean,) * 3, (std,) * 3)
        augment = [transforms.RandomCrop(32, padding=PAD + 2)] + ([transforms.RandomHorizontalFlip()] if flip else [])
        to_input = [transforms.Grayscale(num_output_channels=3), transforms.ToTensor(), transforms.Normalize(*stats)]

        def split(train: bool, transform):
            return ArrayImages(*read_split(root, torchvision_name, train, how_to_get), transform)

        def download() -> None:
            from torchvision import datasets

            try:
                getattr(datasets, torchvision_name)(root, train=True, download=True)
                getattr(datasets, torchvision_name)(root, train=False, download=True)
            except Exception as err:
                raise DatasetError(f"downloading {title} into {root}/{torchvision_name} failed "
                                   f"({type(err).__name__}: {err}); {how_to_get}") from None

        return DatasetSpec(
            split=split, num_classes=NUM_CLASSES, mean=stats[0], std=stats[1],
            train_transform=lambda: transforms.Compose(augment + to_input),
            test_transform=lambda: transforms.Compose(to_input),
            download=download,
        )

    factory.__doc__ = f"DATASET.TYPE for {title} (60,000 training and 10,000 test images, 10 classes)."
    return factory


# Pixel statistics of the padded 32x32 training images (Fashion-MNIST measured on the files; MNIST from the usual
# 28x28 0.1307 / 0.3081); tests/test_datasets_open.py recomputes them where the data is installed.
register_dataset("mnist")(_idx_dataset("MNIST", "MNIST", 0.1001, 0.2752, flip=False))
register_dataset("fashion_mnist")(_idx_dataset("Fashion-MNIST", "FashionMNIST", 0.2190, 0.3318, flip=True))
