"""CIFAR-100 from the standard `cifar-100-python/{train,test,meta}` pickles, read by our own code: torchvision's
class rejects any copy whose checksum it does not know (so generated test copies could not be used), and the
pickles are read with an unpickler that can only rebuild lists, dicts, strings, numbers and uint8 numpy arrays,
so a crafted file cannot run code."""
import pickle
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from torchvision import transforms

from ._common import ArrayImages, DatasetError, Instance, InstanceSample

NUM_CLASSES = 100
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FILES = ("train", "test", "meta")

# The only globals the official (Python 2, protocol 2) files reference; numpy 2 renamed numpy.core to numpy._core.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def train_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def _how_to_get(root: Path) -> str:
    return (
        f"download {URL} and untar it into {root} (giving {root / FOLDER}/train, test, meta), "
        "or set DATASET.DOWNLOAD True"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which no CIFAR file contains (refused, nothing was run)"
            ) from None


def load_pickle(path: Path, title: str = "CIFAR-100", how_to_get: str = "") -> dict:
    """One CIFAR pickle as a dict, without executing anything from the file."""
    how_to_get = how_to_get or _how_to_get(path.parent.parent)
    if not path.is_file():
        raise DatasetError(f"{title} file {path} is missing: {how_to_get}")
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except Exception as err:  # truncated, not a pickle, or a forbidden global: all mean "not a CIFAR file"
        reason = f"{type(err).__name__}: {err}"
        raise DatasetError(f"{path} is not a valid {title} pickle ({reason}); {how_to_get}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected the {title} dict; {how_to_get}")
    return obj


def _field(obj: dict, key: str, path: Path):
    if key not in obj:
        raise DatasetError(
            f"{path} has no '{key}' entry (found {sorted(obj)}), so it is not a CIFAR-100 file; "
            f"{_how_to_get(path.parent.parent)}"
        )
    return obj[key]


def read_split(root, train: bool) -> Tuple[np.ndarray, List[int]]:
    """(images uint8 [N, 32, 32, 3], fine labels) of `root/cifar-100-python/{train|test}`, after checking `meta`."""
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        raise DatasetError(f"CIFAR-100 folder {folder} does not exist: {_how_to_get(Path(root))}")
    meta_path = folder / "meta"
    names = _field(load_pickle(meta_path), "fine_label_names", meta_path)
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise DatasetError(f"{meta_path}: 'fine_label_names' should list 100 names; {_how_to_get(Path(root))}")
    path = folder / ("train" if train else "test")
    entry = load_pickle(path)
    data, labels = _field(entry, "data", path), _field(entry, "fine_labels", path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(
            f"{path}: 'data' should be a uint8 array [N, 3072], found {found}; {_how_to_get(Path(root))}"
        )
    if not (isinstance(labels, list) and len(labels) == len(data)):
        raise DatasetError(f"{path}: 'fine_labels' should be a list of {len(data)} labels (one per image)")
    if not all(isinstance(v, int) and 0 <= v < NUM_CLASSES for v in labels):
        raise DatasetError(f"{path}: 'fine_labels' should hold integers in [0, 100)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def ensure_downloaded(root) -> None:
    """Downloads and untars the official archive (its MD5 is checked) unless all three files are already there."""
    folder = Path(root) / FOLDER
    if all((folder / name).is_file() for name in FILES):
        return
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, str(root), md5=ARCHIVE_MD5)
    except Exception as err:
        raise DatasetError(
            f"downloading CIFAR-100 from {URL} into {root} failed ({type(err).__name__}: {err}); "
            f"download it by hand and untar it into {root}, or check the network"
        ) from None


class CIFAR100(ArrayImages):
    """The train (50,000) or test (10,000) split; items (img, target)."""

    def __init__(self, root, train: bool = True, transform=None):
        super().__init__(*read_split(root, train), transform)


class CIFAR100Instance(Instance):
    """Upstream's train set: items (img, target, index); `indices` restricts it to a subset."""

    def __init__(self, root, train: bool = True, transform=None, indices: Optional[Sequence[int]] = None):
        super().__init__(CIFAR100(root, train, transform), indices)


class CIFAR100InstanceSample(InstanceSample):
    """Upstream's CRD train set: items (img, target, index, sample_idx) with `k` negatives (see InstanceSample)."""

    def __init__(
        self,
        root,
        train: bool = True,
        transform=None,
        k: int = 4096,
        mode: str = "exact",
        indices: Optional[Sequence[int]] = None,
    ):
        super().__init__(CIFAR100(root, train, transform), k, mode, indices)
