"""DATASET.TYPE "digits": scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the wheel), served like
CIFAR (10 classes, 32x32 RGB) so that every CIFAR model and the whole pipeline run anywhere with no download."""
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

from ._common import ArrayImages

NUM_CLASSES = 10
NUM_TEST = 360  # 1437 train / 360 test
SPLIT_SEED = 0
# Per-channel mean/std of the train split after ToTensor (the three channels are identical); recomputed by the tests.
MEAN = (0.3056,) * 3
STD = (0.3239,) * 3


def train_transform() -> transforms.Compose:
    """Light augmentation: a 2-pixel shifted crop (half an original pixel); no flips, digits are not symmetric."""
    return transforms.Compose(
        [transforms.RandomCrop(32, padding=2), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )


def test_transform() -> transforms.Compose:
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


@lru_cache(maxsize=1)
def _images_and_labels() -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [N, 32, 32, 3] (bilinear 4x upsampling of the 0..16 ink values scaled to [0, 1],
    channel replicated) and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1)
    big = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    gray = (big.squeeze(1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(gray[..., None], 3, axis=3), digits.target.astype(np.int64)


def split_indices() -> Tuple[np.ndarray, np.ndarray]:
    """The fixed (train, test) indices into the 1,797 digits: a seeded permutation, test = its first 360, sorted."""
    order = np.random.RandomState(SPLIT_SEED).permutation(len(_images_and_labels()[1]))
    return np.sort(order[NUM_TEST:]), np.sort(order[:NUM_TEST])


class Digits(ArrayImages):
    """The train (1,437) or test (360) split; items (img, target). `root` is ignored: scikit-learn ships the data."""

    def __init__(self, root=None, train: bool = True, transform=None):
        images, labels = _images_and_labels()
        chosen = split_indices()[0 if train else 1]
        super().__init__(images[chosen], labels[chosen], transform)
