"""Training engine: trainer registry `trainer_dict[cfg.SOLVER.TRAINER]` (upstream names)."""
from .trainer import BaseTrainer
from .trainers_extra import CRDDOT, DOT, CRDTrainer

trainer_dict = {
    "base": BaseTrainer,
    "crd": CRDTrainer,
    "dot": DOT,
    "crd_dot": CRDDOT,
}
