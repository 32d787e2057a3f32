"""Tiny-ImageNet-200 in ImageFolder layout under `DATASET.ROOT/tiny-imagenet-200/{train,val}`. The official
archive's val split is flat (`val/images/*.JPEG` + `val/val_annotations.txt`): `rearrange_val`, or
`python -m mdistiller.dataset tiny-imagenet-val ROOT`, moves it into class folders once. The official train split
(`train/<wnid>/images/*.JPEG` plus a boxes file) is an ImageFolder already: images are found recursively."""
from pathlib import Path

from torchvision import transforms

from ._common import DatasetError
from .folder import Folder

NUM_CLASSES = 200
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CRD_REPLACE = True  # upstream ImageFolderInstanceSample always draws negatives with replacement


def _how_to_get(root) -> str:
    return (
        f"download {URL}, unzip it into {root} and run `python -m mdistiller.dataset tiny-imagenet-val {root}` "
        "to sort its val images into class folders (see data/README.md)"
    )


def train_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.RandomRotation(20),
            transforms.RandomHorizontalFlip(0.5),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


class TinyImageNet(Folder):
    """The train or val split (64x64 images, no resize); items (img, target)."""

    def __init__(self, root, train: bool = True, transform=None):
        folder = Path(root) / FOLDER
        if not train and (folder / "val" / "val_annotations.txt").is_file():
            raise DatasetError(
                f"{folder / 'val'} is still in the archive's flat layout (images/ + val_annotations.txt); run "
                f"`python -m mdistiller.dataset tiny-imagenet-val {root}` once to sort it into class folders"
            )
        classes = () if train else Folder(folder / "train", how_to_get=_how_to_get(root)).classes
        super().__init__(folder / ("train" if train else "val"), transform, _how_to_get(root), NUM_CLASSES, classes)


def rearrange_val(root) -> int:
    """Moves `tiny-imagenet-200/val/images/<file>` to `val/<wnid>/<file>` following `val/val_annotations.txt`
    (tab-separated: file, wnid, box), then removes the emptied `images/` folder and renames the annotation file to
    `val_annotations.done.txt`. Returns the number of images moved."""
    val = Path(root) / FOLDER / "val"
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetError(f"{annotations} not found: nothing to rearrange in {val} ({_how_to_get(root)})")
    moved = 0
    for line_number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(f"{annotations} line {line_number}: expected 'file<TAB>wnid<TAB>...', got {line!r}")
        source, target = val / "images" / fields[0], val / fields[1] / fields[0]
        if source.is_file():
            target.parent.mkdir(exist_ok=True)
            source.rename(target)
            moved += 1
        elif not target.is_file():
            raise DatasetError(f"{annotations} line {line_number}: {source} does not exist")
    images = val / "images"
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    annotations.rename(val / "val_annotations.done.txt")
    return moved

