"""COCO 2017 in its standard layout (ROOT/<split>/*.jpg, ROOT/annotations/instances_<split>.json) as detection
samples."""
import contextlib
import io
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor


def coco_paths(root: str, split: str) -> Tuple[Path, Path]:
    """(image folder, annotation file) of `split`, with one clear error when either is absent."""
    image_dir = Path(root) / split
    ann_file = Path(root) / "annotations" / f"instances_{split}.json"
    for path in (ann_file, image_dir):
        if not path.exists():
            raise FileNotFoundError(
                f"COCO data not found: {path.resolve()} is missing (expected the COCO 2017 layout under "
                f"DATASETS.ROOT={root}: {split}/ and annotations/instances_{split}.json; see detection/README.md)"
            )
    return image_dir, ann_file


class CocoDetection(Dataset):
    """Images as float RGB in [0, 1] and targets {boxes (xyxy), labels (category ids), image_id}.

    Training drops crowd and degenerate boxes and then images left without boxes (Detectron2's filtering);
    evaluation keeps every image.
    """

    def __init__(self, root: str, split: str, num_classes: int, train: bool, hflip_prob: float = 0.5):
        self.image_dir, ann_file = coco_paths(root, split)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        too_large = [c for c in self.coco.getCatIds() if c >= num_classes]
        if too_large:
            raise ValueError(
                f"{ann_file}: category ids {too_large[:5]} do not fit MODEL.NUM_CLASSES={num_classes} "
                f"(labels are category ids; expected ids < NUM_CLASSES)"
            )
        self.train = train
        self.hflip_prob = hflip_prob if train else 0.0
        self.image_ids = sorted(self.coco.getImgIds())
        if train:
            self.image_ids = [i for i in self.image_ids if len(self._annotations(i)[1])]

    def _annotations(self, image_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        boxes, labels = [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(ann["category_id"])
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.loadImgs(image_id)[0]
        with Image.open(self.image_dir / info["file_name"]) as img:
            image = pil_to_tensor(img.convert("RGB")).float() / 255.0
        boxes, labels = self._annotations(image_id)
        if self.hflip_prob and torch.rand(()) < self.hflip_prob:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(image_id)}


def collate(batch: List) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
