"""Distillation-oriented trainer (Zhao et al., ICCV 2023): SGD with separate momenta for the task and the
distillation gradients (task momentum − δ, distillation momentum + δ)."""
from typing import Callable, Dict, Iterable, Optional

import torch
from torch.optim.optimizer import Optimizer


class DistillationOrientedTrainer(Optimizer):
    """Two backward passes per step, same update as upstream mdistiller's `engine/dot.py`:

        optimizer.zero_grad(set_to_none=True); loss_kd.backward(retain_graph=True); optimizer.step_kd()
        optimizer.zero_grad(set_to_none=True); loss_task.backward(); optimizer.step()

    A parameter with both gradients keeps two buffers (task with `momentum`, distillation with `momentum_kd`); a
    parameter with one gradient uses the mean momentum. Weight decay goes with the task gradient, or with the
    distillation gradient for distillation-only parameters (connectors). Buffers start at the first gradient.
    Optimizer state keys are upstream's (`momentum_buffer`, `momentum_kd_buffer`), so checkpoints interchange."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.0,
        momentum_kd: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("momentum_kd", momentum_kd)):
            if value < 0.0:
                raise ValueError(f"DistillationOrientedTrainer: {name}={value} must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"DistillationOrientedTrainer: weight_decay={weight_decay} must be >= 0")
        defaults = dict(
            lr=lr, momentum=momentum, momentum_kd=momentum_kd, dampening=dampening, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"DistillationOrientedTrainer supports one parameter group, got {len(self.param_groups)}")
        self._kd_grads: Dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step_kd(self) -> None:
        """Remember the distillation gradients now in `.grad` (applied by the next `step()`)."""
        self._kd_grads = {id(p): p.grad for p in self.param_groups[0]["params"] if p.grad is not None}

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Apply the task gradients now in `.grad` and the distillation gradients stored by `step_kd()`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, weight_decay, dampening = group["lr"], group["weight_decay"], group["dampening"]
        momentum, momentum_kd = group["momentum"], group["momentum_kd"]
        mean_momentum = (momentum + momentum_kd) / 2.0
        kd_grads, self._kd_grads = self._kd_grads, {}
        params = group["params"]
        task_ids = {id(p) for p in params if p.grad is not None}

        for p in params:
            if p.grad is None:
                continue
            d_p = p.grad.add(p, alpha=weight_decay) if weight_decay != 0 else p.grad
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    buf.mul_(momentum if id(p) in kd_grads else mean_momentum).add_(d_p, alpha=1 - dampening)
                d_p = buf
            p.add_(d_p, alpha=-lr)

        for p in params:
            d_p = kd_grads.get(id(p))
            if d_p is None:
                continue
            state = self.state[p]
            buf = state.get("momentum_kd_buffer")
            if buf is None:
                buf = state["momentum_kd_buffer"] = torch.clone(d_p).detach()
            elif id(p) in task_ids:
                buf.mul_(momentum_kd).add_(d_p, alpha=1 - dampening)
            else:
                if weight_decay != 0:
                    d_p = d_p.add(p, alpha=weight_decay)
                buf.mul_(mean_momentum).add_(d_p, alpha=1 - dampening)
            p.add_(buf, alpha=-lr)
        return loss
