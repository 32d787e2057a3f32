"""Pieces every data set shares: the error type, fixed train splits, the index/CRD wrappers and the loaders."""
import contextlib
import signal
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SPLIT_SEED = 0  # fixed: TRAIN_SUBSET and VALIDATION_FROM_TRAIN pick the same images in every run
# A batch that takes a loader worker longer than this is an error, not a silent stall (a hung network file system,
# a decoder stuck on a corrupt file); far above any real batch's loading time.
WORKER_TIMEOUT_S = 600


class DatasetError(ValueError):
    """Missing, malformed or mis-configured data; the message names the path or key, what was expected and the fix."""


class ArrayImages(Dataset):
    """In-memory uint8 images [N, H, W, 3] with integer labels; items are (PIL image through `transform`, target)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform=None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def split_train(num_images: int, subset: int, holdout: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(train indices, held-out indices or None) into a train set of `num_images`, both sorted. The held-out images
    come first in a fixed permutation, so the validation images do not depend on `subset`; the subset is drawn from
    the rest."""
    for key, value in (("DATASET.TRAIN_SUBSET", subset), ("DATASET.VALIDATION_FROM_TRAIN", holdout)):
        if value < 0:
            raise DatasetError(f"{key}={value}: expected 0 (off) or a positive number of images")
    if holdout >= num_images:
        raise DatasetError(
            f"DATASET.VALIDATION_FROM_TRAIN={holdout}: the train set has only {num_images} images; "
            "hold out fewer so that some remain for training"
        )
    if subset > num_images - holdout:
        raise DatasetError(
            f"DATASET.TRAIN_SUBSET={subset}: only {num_images - holdout} train images are available "
            f"({num_images} minus DATASET.VALIDATION_FROM_TRAIN={holdout}); use at most that many or 0 for all"
        )
    if subset == 0 and holdout == 0:
        return np.arange(num_images), None
    order = np.random.RandomState(SPLIT_SEED).permutation(num_images)  # RandomState: stream fixed across numpy
    held, rest = order[:holdout], order[holdout:]
    train = rest[:subset] if subset else rest
    return np.sort(train), (np.sort(held) if holdout else None)


class Instance(Dataset):
    """Items (img, target, index) of `base` restricted to `indices`; `index` is the position in this restricted set
    (what CRD's memory rows and `num_data = len(self)` refer to)."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]] = None):
        self.base = base
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.targets = [base.targets[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        img, target = self.base[int(self.indices[index])]
        return img, target, index


class InstanceSample(Instance):
    """CRD's sample set: items (img, target, index, sample_idx), `sample_idx` = [positive] + `k` negatives (int64),
    negatives drawn uniformly from the other classes, with replacement when `replace` or when there are fewer than
    `k` (upstream CIFAR); the positive is the item itself (mode "exact") or a random item of its class ("relax").
    Draws use torch's RNG, so seeding torch (and DataLoader workers) makes them reproducible."""

    def __init__(
        self,
        base: Dataset,
        k: int,
        mode: str = "exact",
        indices: Optional[Sequence[int]] = None,
        replace: bool = False,
    ):
        super().__init__(base, indices)
        if mode not in ("exact", "relax"):
            raise DatasetError(f"CRD.MODE={mode!r}: expected 'exact' or 'relax'")
        if k < 1:
            raise DatasetError(f"CRD.NCE.K={k}: expected a positive number of negatives")
        self.k, self.mode, self.replace = k, mode, replace
        targets = torch.as_tensor(self.targets, dtype=torch.int64)
        # Items sorted by class: class c occupies by_class[start[c]:start[c] + count[c]], so the negatives of c are
        # everything outside that block and are drawn without materialising per-class lists.
        self.by_class = torch.argsort(targets, stable=True)
        self.count = torch.bincount(targets)
        self.start = torch.cumsum(self.count, 0) - self.count
        if int((self.count > 0).sum()) < 2:
            raise DatasetError("CRD needs negatives from other classes, but the train set has a single class")

    def sample(self, index: int, target: int) -> torch.Tensor:
        start, count = int(self.start[target]), int(self.count[target])
        num_negatives = len(self) - count
        if self.replace or self.k > num_negatives:
            draws = torch.randint(num_negatives, (self.k,))
        else:
            draws = torch.randperm(num_negatives)[: self.k]
        negatives = self.by_class[draws + count * (draws >= start)]
        if self.mode == "exact":
            positive = index
        else:
            positive = int(self.by_class[start + int(torch.randint(count, ()))])
        return torch.cat([torch.tensor([positive]), negatives])

    def __getitem__(self, index: int):
        img, target, index = super().__getitem__(index)
        return img, target, index, self.sample(index, target)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT/SIGTERM (a Ctrl-C reaches the whole process group) to the trainer, which stops
    at a step boundary (engine/signals.py); a worker dying under it would turn a clean stop into a loader error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def batches(loader: Iterable) -> Iterator[Iterator]:
    """`with batches(loader) as stream: for batch in stream: ...`, which stops the loader's worker processes however
    the loop ends. An error leaves the DataLoader iterator referenced from its traceback, and its workers ignore
    SIGTERM (above): without this they outlive the loop and the interpreter's exit, which joins them, never ends.
    A worker still stuck after the DataLoader's own shutdown (a hung read) is killed."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown_workers = getattr(iterator, "_shutdown_workers", None)  # DataLoader's multi-process iterator
        if shutdown_workers is not None:
            shutdown_workers()
        for worker in getattr(iterator, "_workers", ()):
            if worker.is_alive():  # stuck in a read: the DataLoader's SIGTERM is ignored (above), so kill it
                worker.kill()
                worker.join()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    """drop_last off (every image counts); pin_memory only where CUDA can use it. A worker that crashes is reported
    by the DataLoader as an error, and one that hangs fails after WORKER_TIMEOUT_S (no silent stall)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        timeout=WORKER_TIMEOUT_S if num_workers > 0 else 0,
    )
