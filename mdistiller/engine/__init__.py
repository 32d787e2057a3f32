"""Training engine: the loop and its services (checkpoints, RNG, signals, locks, DDP, speed options, configs), and
the trainer registry `trainer_dict[cfg.SOLVER.TRAINER]` (upstream names)."""
from .crd_trainer import CRDTrainer
from .dot_trainer import CRDDOT, DOT
from .trainer import BaseTrainer, register_trainer, trainer_dict

__all__ = ["BaseTrainer", "CRDTrainer", "DOT", "CRDDOT", "register_trainer", "trainer_dict"]
