"""Opt-in training recipes read from SOLVER (docs/recipes.md): a cosine schedule and linear warm-up, and an
exponential moving average (EMA) of the student. AdamW is built by `BaseTrainer.init_optimizer`, gradient clipping
by `speed.StepPrecision` and label smoothing by the distiller (`StudentTraining.ce_loss`). Every default is off, so
a config that names none of them trains bit-for-bit as upstream.
"""
import math
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .utils import validate

OPTIMIZERS = ("SGD", "AdamW")
SCHEDULERS = ("step", "cosine")

__all__ = ["OPTIMIZERS", "SCHEDULERS", "lr_factor", "build_scheduler", "build_ema", "validate_student"]


def lr_factor(solver, epoch: int) -> float:
    """LR of the 1-based `epoch` over SOLVER.LR: warm-up e/W for e <= W, then the step decay or the cosine
    (MIN_LR + ½(LR − MIN_LR)(1 + cos(π(e − W − 1)/(EPOCHS − W)))) / LR; with "step" the warm-up multiplies the decay."""
    warmup = solver.WARMUP_EPOCHS
    warm = epoch / warmup if epoch <= warmup else 1.0
    if solver.SCHEDULER == "cosine":
        if epoch <= warmup:
            return warm
        floor = solver.MIN_LR / solver.LR
        progress = (epoch - warmup - 1) / (solver.EPOCHS - warmup)
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * progress))
    # the same power as `adjust_learning_rate`, so LR · factor is its value exactly once warm-up is over
    decay = solver.LR_DECAY_RATE ** sum(epoch > stage for stage in solver.LR_DECAY_STAGES)
    return decay * warm


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> Optional[LambdaLR]:
    """A LambdaLR stepped once after every epoch (its `last_epoch` is the number of finished epochs); None for
    upstream's step decay without warm-up, which `adjust_learning_rate` keeps doing (no state, no checkpoint key).
    The lambda is not part of its state dict: a resumed trainer builds it again, then loads the state."""
    if cfg.SOLVER.SCHEDULER == "step" and cfg.SOLVER.WARMUP_EPOCHS == 0:
        return None
    solver = cfg.SOLVER
    return LambdaLR(optimizer, lambda finished: lr_factor(solver, finished + 1))


def build_ema(cfg, student: nn.Module) -> Optional[AveragedModel]:
    """With SOLVER.EMA_DECAY > 0, an EMA of the student's parameters and buffers (a deep copy: no gradients, not
    compiled); None otherwise. Its step counter stays on the CPU, so an update costs no host synchronisation."""
    if cfg.SOLVER.EMA_DECAY == 0:
        return None
    ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(cfg.SOLVER.EMA_DECAY), use_buffers=True)
    return ema.requires_grad_(False)


class _StudentLogits(nn.Module):
    """`validate` asks `model(image=...)` for logits, as a distiller in eval mode answers; a student returns
    (logits, features)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image)[0]


def validate_student(val_loader, student: nn.Module, prefix: str) -> Dict[str, float]:
    """`validate` of a bare student (the EMA) as {prefix_test_acc, prefix_test_acc_top5, prefix_test_loss}. The RNG
    states are restored afterwards (iterating a DataLoader draws a seed), so the raw student trains exactly as
    without it."""
    device = next(student.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        results = validate(val_loader, _StudentLogits(student))
    return dict(zip((f"{prefix}_test_acc", f"{prefix}_test_acc_top5", f"{prefix}_test_loss"), results))
