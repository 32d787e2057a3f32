"""Trainers for CRD batches and for the distillation-oriented optimizer (upstream's `crd`, `dot`, `crd_dot`)."""
from typing import Dict, Tuple

import torch

from .config import ConfigError
from .dot import DistillationOrientedTrainer
from .trainer import BaseTrainer, TrainMeters


class CRDTrainer(BaseTrainer):
    """Batches (image, target, index, contrastive_index) from the CRD sample datasets; the distiller receives the
    indices (and `epoch`, which upstream's CRD trainer did not pass)."""

    def unpack_batch(self, data) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        if len(data) != 4:
            raise ValueError(
                f"the '{self.cfg.SOLVER.TRAINER}' trainer expects batches (image, target, index, contrastive_index), "
                f"got {len(data)} items: use DISTILLER.TYPE CRD so the dataset returns contrastive indices"
            )
        image, target, index, contrastive_index = data
        return image, target, {"index": index, "contrastive_index": contrastive_index}


class DOT(BaseTrainer):
    """Distillation-oriented trainer: the distillation gradient gets momentum MOMENTUM + DOT.DELTA and the task
    gradient MOMENTUM − DOT.DELTA (one parameter group; the distiller must return exactly loss_ce and loss_kd)."""

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
        self.optimizer.step_kd()
        self.optimizer.zero_grad(set_to_none=True)
        loss_ce.backward()
        self.optimizer.step()
        train_meters.update(preds, target, loss_ce.detach() + loss_kd.detach(), losses_dict)


class CRDDOT(CRDTrainer, DOT):
    """CRD batches with the DOT optimizer."""
