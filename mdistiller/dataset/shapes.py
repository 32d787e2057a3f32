"""Procedural "shapes": one coloured shape on a textured background, with its exact object mask.

The class is the shape. Sample `i` of seed `s` is a pure function of (s, i, size, num_classes), so train/val splits
are seed choices and nothing is stored. It serves three uses without any download: an ImageFolder-like
classification set to train a small model (`ShapesDataset`), and the segmentation test's ground truth, written in the
`gtsegs_ijcv.mat` layout (`write_shapes_gtsegs` in `mdistiller.launch.eval_common`).
"""
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "ellipse")
# Per-channel statistics of seed-0 samples (all six classes), rounded; used as the training normalisation.
MEAN = (0.49, 0.50, 0.49)
STD = (0.24, 0.24, 0.23)
TRAIN_SEED, VAL_SEED = 0, 1


def _inside(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the shape in its own frame (unit circumradius, centred at the origin)."""
    rho = np.sqrt(u**2 + v**2)
    if name == "circle":
        return rho <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if name == "triangle":
        normals = np.deg2rad([270.0, 30.0, 150.0])
        return np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0) <= 0.5
    if name == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if name == "ring":
        return (rho <= 1.0) & (rho >= 0.55)
    if name == "ellipse":
        return u**2 + (v / 0.45) ** 2 <= 1.0
    raise ValueError(f"shapes: unknown shape {name!r}, expected one of {SHAPE_CLASSES}")


def _texture(rng: np.random.Generator, size: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A [0, 1] blend field: stripes, a checkerboard or smooth noise."""
    kind = rng.integers(3)
    if kind == 0:
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) / size + phase)
    if kind == 1:
        cells = rng.integers(3, 9)
        return (((x * cells) // size + (y * cells) // size) % 2).astype(np.float64)
    grid = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float64)


def make_shape_sample(
    index: int, seed: int = 0, size: int = 32, num_classes: int = 4
) -> Tuple[np.ndarray, np.ndarray, int]:
    """(image (size, size, 3) uint8, mask (size, size) uint8 in {0, 1}, label); classes are balanced by index."""
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"shapes: num_classes={num_classes}, expected 2..{len(SHAPE_CLASSES)}")
    if size < 16:
        raise ValueError(f"shapes: size={size}, expected at least 16 pixels")
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    # a low-contrast texture, so the object (not the background's edges) is what separates the classes
    c1 = rng.uniform(0.15, 0.85, 3)
    c2 = np.clip(c1 + rng.uniform(-0.25, 0.25, 3), 0, 1)
    t = _texture(rng, size, y, x)[..., None]
    image = c1 * (1 - t) + c2 * t
    colour = rng.uniform(0, 1, 3)
    for _ in range(50):  # keep the object visible against both background colours
        if min(np.abs(colour - c1).sum(), np.abs(colour - c2).sum()) > 0.6:
            break
        colour = rng.uniform(0, 1, 3)
    cy, cx = rng.uniform(0.32, 0.68, 2) * size
    radius = rng.uniform(0.22, 0.34) * size
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = (y - cy) / radius, (x - cx) / radius
    u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _inside(SHAPE_CLASSES[label], u, v)
    shade = 0.85 + 0.15 * _texture(rng, size, y, x)[..., None]
    image = np.where(mask[..., None], colour * shade, image)
    image = np.clip(image + rng.normal(0, 0.03, image.shape), 0, 1)
    return (image * 255).round().astype(np.uint8), mask.astype(np.uint8), int(label)


class ShapesDataset(Dataset):
    """ImageFolder-like view (`classes`, `class_to_idx`, `targets`): items are (transform(PIL image), label) and,
    with `with_index`, (image, label, index) as mdistiller's trainers expect."""

    def __init__(
        self,
        num_samples: int,
        size: int = 32,
        seed: int = TRAIN_SEED,
        num_classes: int = 4,
        transform: Optional[Callable] = None,
        with_index: bool = False,
    ) -> None:
        make_shape_sample(0, seed, size, num_classes)  # validates the arguments once
        self.num_samples, self.size, self.seed = num_samples, size, seed
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [i % num_classes for i in range(num_samples)]
        self.transform = transform
        self.with_index = with_index

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray, int]:
        return make_shape_sample(index, self.seed, self.size, len(self.classes))

    def __getitem__(self, index: int):
        image, _, label = self.sample(index)
        img = Image.fromarray(image)
        if self.transform is not None:
            img = self.transform(img)
        return (img, label, index) if self.with_index else (img, label)


def shapes_transform(train: bool, size: int = 32) -> transforms.Compose:
    """Train: flips and a padded crop (masks stay valid only for the val transform); val: tensor + normalise."""
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    if not train:
        return transforms.Compose(norm)
    augment = [transforms.RandomCrop(size, padding=size // 8), transforms.RandomHorizontalFlip()]
    return transforms.Compose(augment + norm)
