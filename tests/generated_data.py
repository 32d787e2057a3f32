"""Writers of small generated data sets in the real on-disk layouts, for the tests (no download).

Images are random uint8 but learnable: every image is its class's fixed random pattern (derived from the class name,
so identical across splits and calls) plus uniform noise.
"""
import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from mdistiller.dataset.shapes import (
    SHAPE_CLASSES,
    TRAIN_SEED,
    VAL_SEED,
    ShapesDataset,
    make_shape_sample,
    shapes_transform,
)

PathLike = Union[str, Path]

_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]  # numpy's array reconstructor, whatever its module


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the official files: `str`/`bytes` as py2 strings
    (BINSTRING) and numpy's reconstructor as `numpy.core.multiarray._reconstruct`."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: Union[str, bytes]) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)



def _pattern(name: str, shape: tuple) -> np.ndarray:
    """The fixed random pattern of a class, from its name: the same in every split and every call."""
    return np.random.default_rng(zlib.crc32(name.encode())).integers(0, 256, size=shape)


def _noisy(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (0.6 * pattern + 0.4 * rng.integers(0, 256, size=pattern.shape)).astype(np.uint8)


def write_cifar100(root: PathLike, num_train: int = 200, num_test: int = 100, seed: int = 0) -> Path:
    """Writes `root/cifar-100-python/{train,test,meta}` in the official layout (Python-2 pickles of dicts with
    `data` uint8 [N, 3072] as R, G, B planes of 32x32 row-major, `fine_labels`, `coarse_labels`, `filenames`,
    `batch_label`; `meta` with `fine_label_names` and `coarse_label_names`). Labels cycle over the 100 classes in
    a shuffled order, so every class appears once `num >= 100`. Returns `root` (the value for DATASET.ROOT)."""
    if num_train < 1 or num_test < 1:
        raise ValueError(f"write_cifar100: num_train={num_train} and num_test={num_test} must both be >= 1")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    patterns = np.stack([_pattern(f"cifar100/{c}", (3, 32, 32)) for c in range(100)])
    splits = (("train", num_train, "training batch 1 of 1"), ("test", num_test, "testing batch 1 of 1"))
    for split, n, batch_label in splits:
        fine = rng.permutation(np.arange(n) % 100)
        data = _noisy(patterns[fine], rng).reshape(n, 3072)
        entry = {
            "filenames": [f"synthetic_{split}_{i:06d}.png" for i in range(n)],
            "batch_label": batch_label,
            "fine_labels": [int(v) for v in fine],
            "coarse_labels": [int(v) // 5 for v in fine],
            "data": data,
        }
        _dump_py2(entry, folder / split)
    meta = {
        "fine_label_names": [f"fine_{i:03d}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
    }
    _dump_py2(meta, folder / "meta")
    return Path(root)


def write_cifar10(root: PathLike, num_train: int = 50, num_test: int = 20, seed: int = 0) -> Path:
    """Writes `root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` in the official layout
    (Python-2 pickles: `data` uint8 [N, 3072] as R, G, B planes, `labels`, `filenames`, `batch_label`; meta with
    `label_names`); the training images are spread over the five batches. Returns `root`."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    patterns = np.stack([_pattern(f"cifar10/{c}", (3, 32, 32)) for c in range(10)])
    train_parts = np.array_split(np.arange(num_train), 5)
    batches = [(f"data_batch_{i + 1}", len(part)) for i, part in enumerate(train_parts)] + [("test_batch", num_test)]
    for name, n in batches:
        labels = rng.permutation(np.arange(n) % 10)
        entry = {"batch_label": name, "labels": [int(v) for v in labels],
                 "data": _noisy(patterns[labels], rng).reshape(n, 3072),
                 "filenames": [f"synthetic_{name}_{i:05d}.png" for i in range(n)]}
        _dump_py2(entry, folder / name)
    _dump_py2({"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 10000, "num_vis": 3072},
              folder / "batches.meta")
    return Path(root)


def write_idx(folder: PathLike, num_train: int = 60, num_test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """Writes the four MNIST-family IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
    `t10k-...`) into `folder`: big-endian headers (magic 2051 / 2049, counts, 28, 28) and uint8 payloads."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    patterns = np.stack([_pattern(f"idx/{c}", (28, 28)) for c in range(10)])
    for split, n in (("train", num_train), ("t10k", num_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = _noisy(patterns[labels], rng)
        files = {f"{split}-images-idx3-ubyte": struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes(),
                 f"{split}-labels-idx1-ubyte": struct.pack(">II", 2049, n) + labels.tobytes()}
        for name, payload in files.items():
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(payload)
            else:
                (folder / name).write_bytes(payload)
    return folder


def _dump_py2(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_image_folder(
    root: PathLike,
    classes: Sequence[str],
    per_class: int,
    size: Union[int, tuple] = 32,
    ext: str = "png",
    seed: int = 0,
) -> Path:
    """Writes `root/<class>/<class>_<i>.<ext>` (torchvision ImageFolder layout), `per_class` RGB images of `size`
    (int or (height, width)) per class; `ext` is png, jpg, jpeg or JPEG. Returns `root`."""
    if ext.lower() not in ("png", "jpg", "jpeg"):
        raise ValueError(f"write_image_folder: ext={ext!r}, expected png, jpg, jpeg or JPEG")
    if not classes or per_class < 1:
        raise ValueError(
            f"write_image_folder: need at least one class and per_class >= 1 (got {len(classes)}, {per_class})"
        )
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    for name in classes:
        pattern = _pattern(name, (height, width, 3))
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_noisy(pattern, rng)).save(folder / f"{name}_{i:04d}.{ext}")
    return Path(root)


def get_shapes_dataloaders(
    batch_size: int,
    val_batch_size: int,
    num_train: int = 2000,
    num_val: int = 400,
    size: int = 32,
    num_classes: int = 4,
    num_workers: int = 0,
) -> Tuple[DataLoader, DataLoader, int, int]:
    """Same return shape as `get_dataset(cfg)`: (train_loader, val_loader, num_data, num_classes)."""
    train = ShapesDataset(num_train, size, TRAIN_SEED, num_classes, shapes_transform(True, size), with_index=True)
    val = ShapesDataset(num_val, size, VAL_SEED, num_classes, shapes_transform(False, size))
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    val_loader = DataLoader(val, batch_size=val_batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader, num_train, num_classes


def export_image_folder(
    root: str, num_samples: int, size: int = 32, seed: int = TRAIN_SEED, num_classes: int = 4
) -> List[str]:
    """Write `root/<class>/<index>.png` (readable by torchvision's ImageFolder); returns the paths written."""
    paths = []
    for i in range(num_samples):
        image, _, label = make_shape_sample(i, seed, size, num_classes)
        folder = os.path.join(root, SHAPE_CLASSES[label])
        os.makedirs(folder, exist_ok=True)
        paths.append(os.path.join(folder, f"{i:06d}.png"))
        Image.fromarray(image).save(paths[-1])
    return paths
