"""Trainers for the distillation-oriented optimizer (upstream's `dot`, and `crd_dot` with CRD's batches)."""

import torch

from ..errors import ConfigError
from .crd_trainer import CRDTrainer
from .dot import DistillationOrientedTrainer
from .trainer import BaseTrainer, TrainMeters, register_trainer


@register_trainer("dot")
class DOT(BaseTrainer):
    """Distillation-oriented trainer: the distillation gradient gets momentum MOMENTUM + DOT.DELTA and the task
    gradient MOMENTUM − DOT.DELTA (one parameter group; the distiller must return exactly loss_ce and loss_kd).
    SOLVER.CLIP_GRAD clips the distillation and the task gradient separately (docs/recipes.md)."""

    def init_optimizer(self, cfg) -> torch.optim.Optimizer:
        if cfg.SOLVER.TYPE != "SGD":
            raise ConfigError(f"SOLVER.TYPE = {cfg.SOLVER.TYPE!r} is not supported by the DOT trainer; expected 'SGD'")
        return DistillationOrientedTrainer(
            self.distiller.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM - cfg.SOLVER.DOT.DELTA,
            momentum_kd=cfg.SOLVER.MOMENTUM + cfg.SOLVER.DOT.DELTA,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )

    def train_iter(self, data, epoch: int, train_meters: TrainMeters) -> None:
        image, target, extra = self.unpack_batch(data)
        image, target = self.to_device(image.float()), self.to_device(target)
        extra = {key: self.to_device(value) for key, value in extra.items()}
        preds, losses_dict = self.distiller(image=image, target=target, epoch=epoch, **extra)
        if set(losses_dict) != {"loss_ce", "loss_kd"}:
            raise ValueError(
                f"the DOT trainer needs a distiller returning exactly loss_ce and loss_kd, got {sorted(losses_dict)}"
            )
        loss_ce, loss_kd = losses_dict["loss_ce"].mean(), losses_dict["loss_kd"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss_kd.backward(retain_graph=True)
        self.precision.clip_gradients(self.optimizer)  # SOLVER.CLIP_GRAD: each of the two gradients on its own
        self.optimizer.step_kd()
        self.optimizer.zero_grad(set_to_none=True)
        loss_ce.backward()
        self.precision.clip_gradients(self.optimizer)
        self.optimizer.step()
        train_meters.update(preds, target, loss_ce.detach() + loss_kd.detach(), losses_dict)


@register_trainer("crd_dot")
class CRDDOT(CRDTrainer, DOT):
    """CRD batches with the DOT optimizer."""
