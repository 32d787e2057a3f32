"""Exact-or-opt-in step speed-ups read from SOLVER: AMP, channels_last, torch.compile and the SGD kernel choice.

AMP is CUDA-only (on CPU the flag is ignored, so a config runs anywhere); "fp16" uses a GradScaler, "bf16" does not
need one. No helper here synchronises with the host.
"""
from contextlib import nullcontext
from typing import ContextManager, Dict

import torch
import torch.nn as nn

from ..errors import ConfigError

AMP_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "AMP_DTYPES", "amp_dtype", "StepPrecision", "prepare_model", "to_memory_format", "sgd_kwargs", "COMPILE_CHOICES",
]


def amp_dtype(cfg, device: torch.device):
    """The autocast dtype of SOLVER.AMP on `device` (None: full precision, always on CPU)."""
    if cfg.SOLVER.AMP not in AMP_DTYPES:
        raise ConfigError(f"SOLVER.AMP = {cfg.SOLVER.AMP!r}; expected one of {list(AMP_DTYPES)}")
    return AMP_DTYPES[cfg.SOLVER.AMP] if device.type == "cuda" else None


class StepPrecision:
    """Autocast context and the backward/step pair for SOLVER.AMP (a GradScaler for fp16), with SOLVER.CLIP_GRAD's
    gradient clipping between them (docs/recipes.md)."""

    def __init__(self, cfg, device: torch.device):
        self.device = device
        self.dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.clip_grad = float(cfg.SOLVER.CLIP_GRAD)

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def clip_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """With CLIP_GRAD > 0, scale the gradients of the optimizer's parameters so that their total L2 norm is at
        most CLIP_GRAD (no host sync). The gradients must be unscaled already."""
        if self.clip_grad > 0:
            params = [param for group in optimizer.param_groups for param in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            self.clip_gradients(optimizer)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(optimizer)  # clip the true gradients; `step` then skips a step with inf/NaN ones
            self.clip_gradients(optimizer)
        self.scaler.step(optimizer)
        self.scaler.update()


def to_memory_format(tensor: torch.Tensor, cfg) -> torch.Tensor:
    """NHWC for image batches when SOLVER.CHANNELS_LAST (other tensors unchanged)."""
    if cfg.SOLVER.CHANNELS_LAST and tensor.dim() == 4:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


COMPILE_CHOICES = ("", "teacher", "all")


def prepare_model(distiller: nn.Module, cfg) -> nn.Module:
    """channels_last weights and `torch.compile` (SOLVER.COMPILE "teacher" or "all"); state-dict keys unchanged.

    The frozen teacher's forward is compiled with inductor's `freezing` (weights become constants: BatchNorm folded,
    conv weights pre-packed), replacing the eager BatchNorm folding of `Distiller`."""
    if cfg.SOLVER.COMPILE not in COMPILE_CHOICES:
        raise ConfigError(f"SOLVER.COMPILE = {cfg.SOLVER.COMPILE!r}; expected one of {list(COMPILE_CHOICES)}")
    if cfg.SOLVER.CHANNELS_LAST:
        distiller.to(memory_format=torch.channels_last)
    teacher = getattr(distiller, "teacher", None)
    if cfg.SOLVER.COMPILE and isinstance(teacher, nn.Module):
        teacher._bn_fold_tried = True  # freezing folds BatchNorm itself, inside the graph
        teacher.forward = torch.compile(teacher.forward, options={"freezing": True})
    if cfg.SOLVER.COMPILE == "all":
        distiller.student.compile()
    return distiller


def sgd_kwargs(device: torch.device) -> Dict[str, bool]:
    """One fused kernel for the whole update on CUDA, multi-tensor (foreach) kernels elsewhere."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}
