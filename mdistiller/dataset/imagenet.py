"""ImageNet (ILSVRC-2012) in ImageFolder layout under `DATASET.ROOT/imagenet/{train,val}`."""
from pathlib import Path

from torchvision import transforms

from .folder import Folder

NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FOLDER = "imagenet"
CRD_REPLACE = True  # upstream ImageNetInstanceSample always draws negatives with replacement


def _how_to_get(root) -> str:
    return (
        f"ImageNet cannot be downloaded automatically: get ILSVRC-2012 from https://image-net.org and put it in "
        f"{Path(root) / FOLDER}/train/<wnid>/*.JPEG and {Path(root) / FOLDER}/val/<wnid>/*.JPEG (see data/README.md)"
    )


def train_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def test_transform() -> transforms.Compose:
    return transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )


class ImageNet(Folder):
    """The train or val split; items (img, target); class index = position of the wnid folder in sorted order."""

    def __init__(self, root, train: bool = True, transform=None):
        folder = Path(root) / FOLDER
        classes = () if train else Folder(folder / "train", how_to_get=_how_to_get(root)).classes
        super().__init__(folder / ("train" if train else "val"), transform, _how_to_get(root), NUM_CLASSES, classes)

