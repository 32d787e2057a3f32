"""`DATASET.LOADER: device`: the uint8 CIFAR training set kept on the training device, augmented there in batch.

Same distribution as torchvision's `RandomCrop(32, padding=4)` + `RandomHorizontalFlip()` + `ToTensor()` +
`Normalize(MEAN, STD)` (zero padding; crop offsets uniform in [0, 2·padding]; flip with probability 1/2), but one
gather per batch instead of PIL work per image in worker processes. Shuffling, offsets and flips are drawn per epoch
from `self.generator` (a CPU generator that `engine.rng` checkpoints). Under torchrun each rank takes its share of the
same shuffled order (padded to equal length) and BATCH_SIZE / WORLD_SIZE images per step.
"""
from typing import Iterator, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DeviceLoader", "random_crop_flip"]


def random_crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                     padding: int) -> torch.Tensor:
    """Crops of `images` [B,C,H,W] zero-padded by `padding`, at (`top`, `left`) per image, mirrored where `flip`."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(height, device=images.device)
    steps = torch.arange(width, device=images.device)
    cols = left[:, None] + torch.where(flip[:, None], width - 1 - steps, steps)
    b = torch.arange(batch, device=images.device)[:, None, None, None]
    c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches (image float32 normalised, target int64, index int64), all on `device`; `index` as `Instance`."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], batch_size: int, device: torch.device,
                 mean: Sequence[float], std: Sequence[float], padding: int = 4, seed: int = 0,
                 rank: int = 0, num_replicas: int = 1):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)
        self.targets = torch.as_tensor(list(targets), dtype=torch.int64, device=device)
        self.batch_size = batch_size
        self.device = device
        self.padding = padding
        self.mean = torch.tensor(mean, device=device).reshape(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).reshape(1, -1, 1, 1) * 255.0
        self.rank, self.num_replicas = rank, num_replicas
        self.generator = torch.Generator().manual_seed(seed)
        self.dataset = self.targets  # len(loader.dataset) = number of training images, as a DataLoader

    def _per_rank(self) -> int:
        return -(-len(self.targets) // self.num_replicas)

    def __len__(self) -> int:
        return -(-self._per_rank() // self.batch_size)

    def _epoch_draws(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        total = len(self.targets)
        order = torch.randperm(total, generator=self.generator)
        order = torch.cat([order, order[: self._per_rank() * self.num_replicas - total]])[self.rank::self.num_replicas]
        offsets = torch.randint(0, 2 * self.padding + 1, (2, len(order)), generator=self.generator)
        flips = torch.rand(len(order), generator=self.generator) < 0.5
        return (order.to(self.device), offsets[0].to(self.device), offsets[1].to(self.device),
                flips.to(self.device))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order, top, left, flip = self._epoch_draws()
        for start in range(0, len(order), self.batch_size):
            part = slice(start, start + self.batch_size)
            index = order[part]
            crops = random_crop_flip(self.images[index], top[part], left[part], flip[part], self.padding)
            yield (crops.float() - self.mean) / self.std, self.targets[index], index
