"""torchvision ImageFolder (`<split>/<class>/<image>`) with errors that name the folder and how to fill it, and the
"folder" data set type (a user's own ImageFolder tree)."""
from pathlib import Path
from typing import Sequence

from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ._common import DatasetError
from .base import DatasetSpec, register_dataset


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:
        raise DatasetError(f"image {path} cannot be read ({type(err).__name__}: {err}); replace or delete it") from None


class Folder(ImageFolder):
    """One split of an ImageFolder data set; items (img, target). `how_to_get` ends every error message;
    `num_classes` bounds the number of class folders (the models' output size); `classes`, if given, must be the
    train split's, so that a class gets the same index in both splits."""

    def __init__(
        self,
        root,
        transform=None,
        how_to_get: str = "",
        num_classes: int = 0,
        classes: Sequence[str] = (),
    ):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                f"{root} does not exist; expected one sub-folder of images per class there: {how_to_get}"
            )
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb)
        except (FileNotFoundError, RuntimeError) as err:
            raise DatasetError(f"{root} is not a usable ImageFolder ({err}); {how_to_get}") from None
        if num_classes and len(self.classes) > num_classes:
            raise DatasetError(
                f"{root} has {len(self.classes)} class folders, more than the {num_classes} classes of this data "
                f"set; {how_to_get}"
            )
        if classes and list(classes) != self.classes:
            missing = sorted(set(classes) ^ set(self.classes))[:3]
            raise DatasetError(
                f"{root} has class folders {self.classes[:3]}... that differ from the train split's "
                f"(first differences: {missing}); both splits need the same class folders: {how_to_get}"
            )


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGES = 64  # up to this size: CIFAR-style augmentation; above: ImageNet-style


def folder_transforms(size: int, mean: Sequence[float], std: Sequence[float]):
    """(train, test) transforms for square inputs of `size`: CIFAR-style (resize, padded random crop, flip) for small
    images, ImageNet-style (random resized crop, flip; resize to 256/224 of the size, centre crop) for large ones."""
    finish = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if size <= SMALL_IMAGES:
        train = [transforms.Resize((size, size)), transforms.RandomCrop(size, padding=max(size // 8, 1)),
                 transforms.RandomHorizontalFlip()]
        test = [transforms.Resize((size, size))]
    else:
        train = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        test = [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)]
    return transforms.Compose(train + finish), transforms.Compose(test + finish)


@register_dataset("folder")
def folder_dataset(data_cfg) -> DatasetSpec:
    """Your own images: DATASET.ROOT/train/<class>/* and DATASET.ROOT/val/<class>/* (classes are the sorted folder
    names of train), served at DATASET.IMAGE_SIZE with DATASET.MEAN / DATASET.STD (empty: ImageNet's statistics)."""
    root, size = Path(data_cfg.ROOT), int(data_cfg.IMAGE_SIZE)
    how_to_get = f"put one folder of images per class in {root / 'train'} and in {root / 'val'} (data/README.md)"
    if size <= 0:
        raise DatasetError(f"DATASET.IMAGE_SIZE = {size}; expected a positive number of pixels")
    mean = tuple(data_cfg.MEAN) or IMAGENET_MEAN
    std = tuple(data_cfg.STD) or IMAGENET_STD
    for key, value in (("DATASET.MEAN", mean), ("DATASET.STD", std)):
        if len(value) != 3:
            raise DatasetError(f"{key} = {list(value)}; expected 3 numbers (one per RGB channel) or [] for ImageNet's")
    if min(std) <= 0:
        raise DatasetError(f"DATASET.STD = {list(std)}; expected positive numbers")
    classes = Folder(root / "train", how_to_get=how_to_get).classes
    train_transform, test_transform = folder_transforms(size, mean, std)

    def split(train: bool, transform):
        return Folder(root / ("train" if train else "val"), transform, how_to_get, classes=() if train else classes)

    return DatasetSpec(split=split, num_classes=len(classes), mean=mean, std=std,
                       train_transform=lambda: train_transform, test_transform=lambda: test_transform)
