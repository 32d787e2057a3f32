"""torchvision ImageFolder (`<split>/<class>/<image>`) with errors that name the folder and how to fill it."""
from pathlib import Path
from typing import Sequence

from PIL import Image
from torchvision.datasets import ImageFolder

from ._common import DatasetError


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
