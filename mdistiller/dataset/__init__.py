"""`get_dataset(cfg) -> (train_loader, val_loader, num_data, num_classes)` as upstream mdistiller, for
DATASET.TYPE cifar100, imagenet, tiny_imagenet and digits (the embedded default that needs no download).

Batches: train (image, target, index), or (image, target, index, sample_idx) for CRD; val (image, target).
"""
from types import ModuleType
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from . import cifar100, digits, imagenet, shapes, tiny_imagenet
from ._common import DatasetError, Instance, InstanceSample, batches, make_loader, split_train
from .device_loader import DeviceLoader

__all__ = ["DatasetError", "batches", "get_dataset", "get_val_loader", "normalization", "DATASETS"]

# DATASET.TYPE -> (module with NUM_CLASSES, train_transform, test_transform; its split dataset class)
DATASETS = {
    "cifar100": (cifar100, cifar100.CIFAR100),
    "imagenet": (imagenet, imagenet.ImageNet),
    "tiny_imagenet": (tiny_imagenet, tiny_imagenet.TinyImageNet),
    "digits": (digits, digits.Digits),
}
UPSTREAM_CONTRASTIVE_TYPES = ("CRD",)  # upstream's rule, for callers of get_dataset(cfg) that do not say


def _lookup(dataset_type: str) -> Tuple[ModuleType, type]:
    if dataset_type not in DATASETS:
        raise DatasetError(f"DATASET.TYPE={dataset_type!r} is unknown; expected one of {sorted(DATASETS)}")
    return DATASETS[dataset_type]


def get_dataset(cfg, contrastive: Optional[bool] = None) -> Tuple[DataLoader, DataLoader, int, int]:
    """Train loader (shuffled; DATASET.TRAIN_SUBSET images if > 0), val loader (the test split, or the
    DATASET.VALIDATION_FROM_TRAIN held-out train images with test transforms if > 0), num_data (train images used,
    CRD's memory size) and num_classes. `contrastive`: training batches carry CRD's contrastive indices (the
    distiller class's `contrastive_batches`; when not given, upstream's rule: DISTILLER.TYPE CRD)."""
    data = cfg.DATASET
    if contrastive is None:
        contrastive = cfg.DISTILLER.TYPE in UPSTREAM_CONTRASTIVE_TYPES
    module, split_class = _lookup(data.TYPE)
    if data.DOWNLOAD and data.TYPE == "cifar100":
        cifar100.ensure_downloaded(data.ROOT)
    train_base = split_class(data.ROOT, True, module.train_transform())
    train_indices, held_out = split_train(len(train_base), data.TRAIN_SUBSET, data.VALIDATION_FROM_TRAIN)
    if contrastive:
        replace = getattr(module, "CRD_REPLACE", False)
        train_set = InstanceSample(train_base, cfg.CRD.NCE.K, cfg.CRD.MODE, train_indices, replace)
    else:
        train_set = Instance(train_base, train_indices)
    if cfg.SOLVER.BATCH_SIZE > len(train_set):
        raise DatasetError(
            f"SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE} is larger than the {len(train_set)} training images of "
            f"DATASET.TYPE={data.TYPE!r} (after TRAIN_SUBSET/VALIDATION_FROM_TRAIN); use a smaller batch"
        )
    if held_out is None:
        val_set = split_class(data.ROOT, False, module.test_transform())
    else:
        val_set = Subset(split_class(data.ROOT, True, module.test_transform()), held_out.tolist())
    if data.LOADER == "device":
        if data.TYPE != "cifar100" or contrastive:
            raise DatasetError(f"DATASET.LOADER='device' supports DATASET.TYPE 'cifar100' without contrastive batches "
                               f"(CRD), got DATASET.TYPE={data.TYPE!r}, DISTILLER.TYPE={cfg.DISTILLER.TYPE!r}")
        train_loader = _device_loader(cfg, module, train_base, train_indices)
    elif data.LOADER == "torch":
        train_loader = make_loader(train_set, cfg.SOLVER.BATCH_SIZE, shuffle=True, num_workers=data.NUM_WORKERS)
    else:
        raise DatasetError(f"DATASET.LOADER={data.LOADER!r} is unknown; expected 'torch' or 'device'")
    val_loader = make_loader(val_set, data.TEST.BATCH_SIZE, shuffle=False, num_workers=data.NUM_WORKERS)
    return train_loader, val_loader, len(train_set), module.NUM_CLASSES


def _device_loader(cfg, module: ModuleType, train_base, indices) -> DeviceLoader:
    """The training set on the training device (CIFAR-100 only; under torchrun, this rank's share of the batch)."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if cfg.SOLVER.BATCH_SIZE % world:
        raise DatasetError(f"SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE} (the global batch) is not divisible by the "
                           f"{world} processes of this torchrun")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    targets = [train_base.targets[i] for i in indices]
    return DeviceLoader(train_base.images[indices], targets, cfg.SOLVER.BATCH_SIZE // world, device, module.MEAN,
                        module.STD, seed=max(int(cfg.EXPERIMENT.SEED), 0), rank=rank,
                        num_replicas=world)


def get_val_loader(dataset_type: str, root: str = "data", batch_size: int = 64, num_workers: int = 0):
    """(loader over the test/val split with test transforms, num_classes): what tools/eval.py evaluates on."""
    module, split_class = _lookup(dataset_type)
    val_set = split_class(root, False, module.test_transform())
    return make_loader(val_set, batch_size, shuffle=False, num_workers=num_workers), module.NUM_CLASSES


def normalization(dataset_type: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) that the data set's transforms normalise with, for inputs that do not come through them; also
    for "shapes", the explainability tests' generated data."""
    module = shapes if dataset_type == "shapes" else _lookup(dataset_type)[0]
    return tuple(module.MEAN), tuple(module.STD)
