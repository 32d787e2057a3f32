"""The data-set registry: DATASET.TYPE -> a factory that reads the DATASET config node and describes the data set
(its splits, classes, normalisation and transforms). Users add theirs with `@register_dataset` in a file loaded
through EXPERIMENT.IMPORTS (docs/extending.md)."""
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from ..registry import Registry

Transform = Callable[[Any], Any]


@dataclass(frozen=True)
class DatasetSpec:
    """What `get_dataset` needs of a data set. `split(train, transform)` gives a Dataset of (image, target) items
    with a `targets` list; transforms end with Normalize(mean, std); `crd_replace`: CRD draws its negatives with
    replacement (upstream's ImageNet rule); `download()` fetches the files for DATASET.DOWNLOAD True."""

    split: Callable[[bool, Optional[Transform]], Dataset]
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    train_transform: Callable[[], Transform]
    test_transform: Callable[[], Transform]
    crd_replace: bool = False
    download: Optional[Callable[[], None]] = None


DatasetFactory = Callable[[Any], DatasetSpec]
dataset_dict: Registry = Registry("data set", "DATASET.TYPE")


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator for `factory(data_cfg) -> DatasetSpec`, `data_cfg` being the DATASET config node."""
    return dataset_dict.register(name)


def data_node(root: str = "data", image_size: int = 32, mean: Sequence[float] = (), std: Sequence[float] = ()):
    """A stand-in for the DATASET node, for tools that name a data set and a root but have no config."""
    return SimpleNamespace(ROOT=root, IMAGE_SIZE=image_size, MEAN=list(mean), STD=list(std), DOWNLOAD=False)


def module_dataset(module: ModuleType, split_class: type, download: bool = False) -> DatasetFactory:
    """The factory of a fixed data set whose module defines NUM_CLASSES, MEAN, STD, train_transform(),
    test_transform() (and CRD_REPLACE, ensure_downloaded(root))."""

    def factory(data_cfg) -> DatasetSpec:
        root = data_cfg.ROOT
        return DatasetSpec(
            split=lambda train, transform: split_class(root, train, transform),
            num_classes=module.NUM_CLASSES,
            mean=tuple(module.MEAN),
            std=tuple(module.STD),
            train_transform=module.train_transform,
            test_transform=module.test_transform,
            crd_replace=getattr(module, "CRD_REPLACE", False),
            download=(lambda: module.ensure_downloaded(root)) if download else None,
        )

    factory.__doc__ = module.__doc__
    return factory
