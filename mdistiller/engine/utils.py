"""Training helpers with upstream mdistiller's names and behaviour: meters, top-k accuracy, validation, LR steps."""
import sys
import time
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..dataset import batches
from .checkpoint import load_checkpoint, save_checkpoint  # noqa: F401  (upstream imports them from here)
from .distributed import all_reduce_sum, unwrap

# Seconds between two refreshes of a live progress bar; also the longest a NaN can go unnoticed.
REFRESH_SECONDS = 1.0


class AverageMeter:
    """Running average of a value weighted by batch size."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def correct_counts(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> torch.Tensor:
    """Number of samples whose target is in the top-k predictions, one float entry per k (stays on the device)."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.reshape(1, -1).expand(maxk, -1))
        return torch.stack([correct[:k].reshape(-1).float().sum() for k in topk])


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[torch.Tensor]:
    """Top-k accuracies in percent, each a 1-element tensor on the output's device (upstream's return format)."""
    counts = correct_counts(output, target, topk).mul_(100.0 / target.size(0))
    return [count.reshape(1) for count in counts]


def adjust_learning_rate(epoch: int, cfg, optimizer: torch.optim.Optimizer) -> float:
    """Step decay (epochs are 1-based): LR·RATE^#(stages < epoch); groups are left untouched before the first stage."""
    steps = int(np.sum(epoch > np.asarray(cfg.SOLVER.LR_DECAY_STAGES)))  # a Python int: no numpy scalar in checkpoints
    if steps > 0:
        new_lr = cfg.SOLVER.LR * (cfg.SOLVER.LR_DECAY_RATE**steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = new_lr
        return new_lr
    return cfg.SOLVER.LR


def log_msg(msg: str, mode: str = "INFO") -> str:
    """`[MODE] msg`, coloured as upstream on a terminal and plain in redirected logs."""
    if not sys.stdout.isatty():
        return "[{}] {}".format(mode, msg)
    color_map = {"INFO": 36, "TRAIN": 32, "EVAL": 31}
    return "\033[{}m[{}] {}\033[0m".format(color_map[mode], mode, msg)


def is_interactive() -> bool:
    """Live bars only on a terminal; logs redirected to a file get one line per epoch instead."""
    return sys.stderr.isatty()


def progress_bar(total: int) -> tqdm:
    """A tqdm bar that redraws at most every REFRESH_SECONDS and is silent when stderr is not a terminal."""
    return tqdm(total=total, dynamic_ncols=True, mininterval=REFRESH_SECONDS, disable=not is_interactive())


def unpack_eval_batch(batch: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validation batches are (image, target); extra fields (an index) are ignored."""
    image, target = batch[0], batch[1]
    return image, target


def validate(val_loader, distiller: nn.Module) -> Tuple[float, float, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of `distiller(image=...)` in eval mode over `val_loader`
    (under torchrun: this rank's shard, summed over ranks; the DDP wrapper is bypassed, shards may differ in length)."""
    distiller = unwrap(distiller)
    device = next(distiller.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss·n, correct@1, correct@5
    count = 0
    pbar = progress_bar(len(val_loader))
    last_refresh = time.monotonic()
    distiller.eval()
    with torch.no_grad():
        with batches(val_loader) as stream:
            for batch in stream:
                image, target = unpack_eval_batch(batch)
                image = image.float().to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                output = distiller(image=image)
                batch_size = image.size(0)
                loss = F.cross_entropy(output, target, reduction="sum").reshape(1)
                sums += torch.cat([loss, correct_counts(output, target, (1, 5))]).double()
                count += batch_size
                pbar.update()
                if not pbar.disable and time.monotonic() - last_refresh >= REFRESH_SECONDS:
                    loss_sum, c1, c5 = sums.tolist()
                    message = "Top-1:{:.3f}| Top-5:{:.3f}".format(100 * c1 / count, 100 * c5 / count)
                    pbar.set_description(log_msg(message, "EVAL"))
                    last_refresh = time.monotonic()
    pbar.close()
    totals = all_reduce_sum(torch.cat([sums, torch.tensor([count], dtype=torch.float64, device=device)]))
    loss_sum, c1, c5, count = totals.tolist()
    if count == 0:
        raise ValueError("validate: the validation loader yielded no images")
    return 100.0 * c1 / count, 100.0 * c5 / count, loss_sum / count
