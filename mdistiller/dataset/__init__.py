"""`get_dataset(cfg) -> (train_loader, val_loader, num_data, num_classes)` as upstream mdistiller, for every
DATASET.TYPE of the registry (`dataset_dict`): cifar100, imagenet, tiny_imagenet, digits (the embedded default that
needs no download), cifar10, mnist, fashion_mnist, folder (your own ImageFolder tree), and users' own
(`register_dataset`, docs/extending.md).

Batches: train (image, target, index), or (image, target, index, sample_idx) for CRD; val (image, target).
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from . import cifar10, cifar100, digits, idx, imagenet, shapes, tiny_imagenet  # noqa: F401  (idx registers itself)
from ._common import ArrayImages, DatasetError, Instance, InstanceSample, batches, make_loader, split_train
from .base import DatasetSpec, data_node, dataset_dict, module_dataset, register_dataset
from .device_loader import DeviceLoader
from .folder import folder_dataset  # noqa: F401  (registers "folder")

__all__ = ["ArrayImages", "DatasetError", "DatasetSpec", "batches", "get_dataset", "get_val_loader", "normalization",
           "dataset_spec", "dataset_dict", "register_dataset", "num_classes", "DATASETS"]

register_dataset("cifar100")(module_dataset(cifar100, cifar100.CIFAR100, download=True))
register_dataset("imagenet")(module_dataset(imagenet, imagenet.ImageNet))
register_dataset("tiny_imagenet")(module_dataset(tiny_imagenet, tiny_imagenet.TinyImageNet))
register_dataset("digits")(module_dataset(digits, digits.Digits))
register_dataset("cifar10")(module_dataset(cifar10, cifar10.CIFAR10, download=True))
DATASETS = dataset_dict  # the name tools use for the choices of -d/--dataset
UPSTREAM_CONTRASTIVE_TYPES = ("CRD",)  # upstream's rule, for callers of get_dataset(cfg) that do not say


def dataset_spec(data_cfg) -> DatasetSpec:
    """The DatasetSpec of data_cfg.TYPE (the DATASET node, or `data_node(...)` plus a TYPE)."""
    if data_cfg.TYPE not in dataset_dict:
        raise DatasetError(f"DATASET.TYPE={data_cfg.TYPE!r} is unknown; expected one of {sorted(dataset_dict)}")
    return dataset_dict[data_cfg.TYPE](data_cfg)


def get_dataset(cfg, contrastive: Optional[bool] = None) -> Tuple[DataLoader, DataLoader, int, int]:
    """Train loader (shuffled; DATASET.TRAIN_SUBSET images if > 0), val loader (the test split, or the
    DATASET.VALIDATION_FROM_TRAIN held-out train images with test transforms if > 0), num_data (train images used,
    CRD's memory size) and num_classes. `contrastive`: training batches carry CRD's contrastive indices (the
    distiller class's `contrastive_batches`; when not given, upstream's rule: DISTILLER.TYPE CRD)."""
    data = cfg.DATASET
    if contrastive is None:
        contrastive = cfg.DISTILLER.TYPE in UPSTREAM_CONTRASTIVE_TYPES
    spec = dataset_spec(data)
    if data.DOWNLOAD:
        if spec.download is None:
            raise DatasetError(f"DATASET.DOWNLOAD is True but DATASET.TYPE={data.TYPE!r} cannot be downloaded; put "
                               f"its files under DATASET.ROOT={data.ROOT!r} (data/README.md)")
        spec.download()
    train_base = spec.split(True, spec.train_transform())
    train_indices, held_out = split_train(len(train_base), data.TRAIN_SUBSET, data.VALIDATION_FROM_TRAIN)
    if contrastive:
        train_set = InstanceSample(train_base, cfg.CRD.NCE.K, cfg.CRD.MODE, train_indices, spec.crd_replace)
    else:
        train_set = Instance(train_base, train_indices)
    if cfg.SOLVER.BATCH_SIZE > len(train_set):
        raise DatasetError(
            f"SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE} is larger than the {len(train_set)} training images of "
            f"DATASET.TYPE={data.TYPE!r} (after TRAIN_SUBSET/VALIDATION_FROM_TRAIN); use a smaller batch"
        )
    if held_out is None:
        val_set = spec.split(False, spec.test_transform())
    else:
        val_set = Subset(spec.split(True, spec.test_transform()), held_out.tolist())
    if data.LOADER == "device":
        if data.TYPE != "cifar100" or contrastive:
            raise DatasetError(f"DATASET.LOADER='device' supports DATASET.TYPE 'cifar100' without contrastive batches "
                               f"(CRD), got DATASET.TYPE={data.TYPE!r}, DISTILLER.TYPE={cfg.DISTILLER.TYPE!r}")
        train_loader = _device_loader(cfg, spec, train_base, train_indices)
    elif data.LOADER == "torch":
        train_loader = make_loader(train_set, cfg.SOLVER.BATCH_SIZE, shuffle=True, num_workers=data.NUM_WORKERS)
    else:
        raise DatasetError(f"DATASET.LOADER={data.LOADER!r} is unknown; expected 'torch' or 'device'")
    val_loader = make_loader(val_set, data.TEST.BATCH_SIZE, shuffle=False, num_workers=data.NUM_WORKERS)
    return train_loader, val_loader, len(train_set), spec.num_classes


def _device_loader(cfg, spec: DatasetSpec, train_base, indices) -> DeviceLoader:
    """The training set on the training device (CIFAR-100 only; under torchrun, this rank's share of the batch)."""
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if cfg.SOLVER.BATCH_SIZE % world:
        raise DatasetError(f"SOLVER.BATCH_SIZE={cfg.SOLVER.BATCH_SIZE} (the global batch) is not divisible by the "
                           f"{world} processes of this torchrun")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    targets = [train_base.targets[i] for i in indices]
    return DeviceLoader(train_base.images[indices], targets, cfg.SOLVER.BATCH_SIZE // world, device, spec.mean,
                        spec.std, seed=max(int(cfg.EXPERIMENT.SEED), 0), rank=rank,
                        num_replicas=world)


def get_val_loader(dataset_type: str, root: str = "data", batch_size: int = 64, num_workers: int = 0,
                   data_cfg=None):
    """(loader over the test/val split with test transforms, num_classes): what tools/eval.py evaluates on.
    `data_cfg` (the DATASET node) gives the keys some data sets read (the folder type's IMAGE_SIZE, MEAN, STD)."""
    spec = dataset_spec(_node(dataset_type, root, data_cfg))
    val_set = spec.split(False, spec.test_transform())
    return make_loader(val_set, batch_size, shuffle=False, num_workers=num_workers), spec.num_classes


def _node(dataset_type: str, root: str, data_cfg=None):
    node = data_node(root) if data_cfg is None else data_node(root, data_cfg.IMAGE_SIZE, data_cfg.MEAN, data_cfg.STD)
    node.TYPE = dataset_type
    return node


def num_classes(dataset_type: str, root: str = "data") -> int:
    return dataset_spec(_node(dataset_type, root)).num_classes


def normalization(dataset_type: str, root: str = "data") -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) that the data set's transforms normalise with, for inputs that do not come through them; also
    for "shapes", the explainability tests' generated data."""
    if dataset_type == "shapes":
        return tuple(shapes.MEAN), tuple(shapes.STD)
    spec = dataset_spec(_node(dataset_type, root))
    return spec.mean, spec.std
