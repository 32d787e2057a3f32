"""CIFAR-10 from the standard `cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` pickles, read with
CIFAR-100's restricted unpickler (a crafted file cannot run code) and CIFAR's transforms."""
from pathlib import Path
from typing import List, Tuple

import numpy as np
from torchvision import transforms

from ._common import ArrayImages, DatasetError
from .cifar100 import load_pickle

NUM_CLASSES = 10
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
FOLDER = "cifar-10-batches-py"
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
TITLE = "CIFAR-10"


def train_transform() -> transforms.Compose:
    return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def _how_to_get(root: Path) -> str:
    return (f"download {URL} and untar it into {root} (giving {root / FOLDER}/data_batch_1 ...), "
            "or set DATASET.DOWNLOAD True")


def read_split(root, train: bool) -> Tuple[np.ndarray, List[int]]:
    """(images uint8 [N, 32, 32, 3], labels) of the five training batches or the test batch (meta checked)."""
    root = Path(root)
    folder, how = root / FOLDER, _how_to_get(root)
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-10 folder {folder} does not exist: {how}")
    meta = load_pickle(folder / "batches.meta", TITLE, how)
    if len(meta.get("label_names", [])) != NUM_CLASSES:
        raise DatasetError(f"{folder / 'batches.meta'}: 'label_names' should list 10 names; {how}")
    images, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = folder / name
        batch = load_pickle(path, TITLE, how)
        data, batch_labels = batch.get("data"), batch.get("labels")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise DatasetError(f"{path}: 'data' should be a uint8 array [N, 3072]; {how}")
        if not (isinstance(batch_labels, list) and len(batch_labels) == len(data)):
            raise DatasetError(f"{path}: 'labels' should be a list of {len(data)} labels (one per image); {how}")
        if not all(isinstance(v, int) and 0 <= v < NUM_CLASSES for v in batch_labels):
            raise DatasetError(f"{path}: 'labels' should hold integers in [0, {NUM_CLASSES})")
        images.append(data)
        labels += batch_labels
    return np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def ensure_downloaded(root) -> None:
    """Downloads and untars the official archive (its MD5 is checked) unless every batch file is already there."""
    folder = Path(root) / FOLDER
    if all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES + ("batches.meta",)):
        return
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, str(root), md5=ARCHIVE_MD5)
    except Exception as err:
        raise DatasetError(f"downloading CIFAR-10 from {URL} into {root} failed ({type(err).__name__}: {err}); "
                           f"download it by hand and untar it into {root}, or check the network") from None


class CIFAR10(ArrayImages):
    """The train (50,000) or test (10,000) split; items (img, target)."""

    def __init__(self, root, train: bool = True, transform=None):
        super().__init__(*read_split(root, train), transform)

