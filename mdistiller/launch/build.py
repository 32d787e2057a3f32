"""Models, teachers, distillers and trainers from a config, as upstream's `tools/train.py` builds them, and the one
way every tool loads a model by name with its weights."""
import inspect
import os
from typing import Type

import torch
import torch.nn as nn

from ..distillers import StudentTraining, distiller_class
from ..engine import trainer_dict
from ..engine.checkpoint import CheckpointError, load_checkpoint, load_weights, model_state_dict
from ..errors import ConfigError
from ..models import build_model, default_checkpoint, zoo_entry

TEACHER_HELP = "download_ckpts/README.md"
PRETRAIN = "pretrain"  # the registry's teacher checkpoint (torchvision's weights on ImageNet)
RANDOM = "none"  # a freshly initialised model (smoke tests of the tools)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str, dataset: str, num_classes: int, ckpt: str, key: str = "-m/--model",
               ckpt_key: str = "-c/--ckpt") -> nn.Module:
    """Model `name` of the zoo of `dataset` with the weights of `ckpt`: a file (any checkpoint format the framework
    writes or upstream's teacher files), PRETRAIN (the registry's teacher) or RANDOM; in eval mode."""
    if ckpt == PRETRAIN and dataset == "imagenet":
        return build_model(name, num_classes, dataset, pretrained=True, key=key).eval()
    model = build_model(name, num_classes, dataset, key=key)
    if ckpt == RANDOM:
        return model.eval()
    path = ckpt
    if ckpt == PRETRAIN:
        path = default_checkpoint(name, dataset, key)
        if path is None:
            raise ConfigError(f"{key} {name!r} has no pretrained checkpoint in the {dataset} registry; pass "
                              f"{ckpt_key} CKPT")
    _load_file(model, path, f"model {name} with {num_classes} classes",
               f"checkpoint not found: {path} ({ckpt_key} {ckpt}, {key} {name!r}); get the teachers as described "
               f"in {TEACHER_HELP}")
    return model.eval()


def _load_file(model: nn.Module, path: str, what: str, missing: str) -> None:
    """The weights of the checkpoint file `path` into `model`; `missing` is the error when there is no such file."""
    if not os.path.isfile(path):
        raise CheckpointError(missing)
    load_weights(model, model_state_dict(load_checkpoint(path), path), path, what)


def teacher_checkpoint_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT, or the registry's default teacher file ('' for ImageNet's torchvision weights)."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if cfg.DATASET.TYPE == "imagenet":
        return ""
    path = default_checkpoint(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE, "DISTILLER.TEACHER")
    if path is None:
        raise ConfigError(
            f"DISTILLER.TEACHER = {cfg.DISTILLER.TEACHER!r} has no default teacher checkpoint in the "
            f"{cfg.DATASET.TYPE} registry; set DISTILLER.TEACHER_CKPT to a trained model file (e.g. a student_best)"
        )
    return path


def load_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher of `cfg` with its trained weights; a missing file is a CheckpointError pointing to the help."""
    name = cfg.DISTILLER.TEACHER
    path = teacher_checkpoint_path(cfg)
    if cfg.DATASET.TYPE == "imagenet" and not path:
        return build_model(name, num_classes, cfg.DATASET.TYPE, pretrained=True, key="DISTILLER.TEACHER")
    model = build_model(name, num_classes, cfg.DATASET.TYPE, key="DISTILLER.TEACHER")
    _load_file(model, path, f"teacher {name} with {num_classes} classes",
               f"teacher checkpoint not found: {path} (DISTILLER.TEACHER = {name!r}); get the teachers as described "
               f"in {TEACHER_HELP}, or set DISTILLER.TEACHER_CKPT")
    return model


# Numbers the solver would otherwise accept silently (LR 0 trains nothing) or crash on deep inside the run.
POSITIVE_KEYS = (
    "SOLVER.LR", "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "DATASET.TEST.BATCH_SIZE", "LOG.SAVE_CHECKPOINT_FREQ"
)
NON_NEGATIVE_KEYS = ("DATASET.NUM_WORKERS", "LOG.TENSORBOARD_FREQ")


def check_values(cfg) -> None:
    """A ConfigError naming the key and value for a zero or negative count, size or learning rate."""
    for key in POSITIVE_KEYS + NON_NEGATIVE_KEYS:
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value < 0 or (value == 0 and key in POSITIVE_KEYS):
            expected = "a positive number" if key in POSITIVE_KEYS else "0 or more"
            raise ConfigError(f"{key} = {value!r}; expected {expected}")


def trainer_class(cfg) -> type:
    """The SOLVER.TRAINER class, checked against the distiller: both must agree on CRD's contrastive batches."""
    trainer = trainer_dict.lookup(cfg.SOLVER.TRAINER)
    method = distiller_class(cfg.DISTILLER.TYPE)
    if trainer.contrastive_batches != method.contrastive_batches:
        wanted = "contrastive batches (image, target, index, contrastive_index)" if method.contrastive_batches else \
            "plain batches (image, target, index)"
        fitting = [name for name, cls in trainer_dict.items() if cls.contrastive_batches == method.contrastive_batches]
        raise ConfigError(f"SOLVER.TRAINER = {cfg.SOLVER.TRAINER!r} does not fit DISTILLER.TYPE = "
                          f"{cfg.DISTILLER.TYPE!r}, which trains on {wanted}; use one of {', '.join(fitting)}")
    return trainer


def check_names(cfg) -> None:
    """Fail fast, before any data is read, on a distiller, trainer or model name that no registry knows (or a bad
    number)."""
    check_values(cfg)
    method = distiller_class(cfg.DISTILLER.TYPE)
    zoo_entry(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, "DISTILLER.STUDENT")
    if method.needs_teacher:
        zoo_entry(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE, "DISTILLER.TEACHER")
    trainer_class(cfg)


def build_distiller(cfg, num_data: int, num_classes: int) -> nn.Module:
    """Student (+ teacher) wrapped in the DISTILLER.TYPE class, on CPU. Distillers whose constructor takes
    `num_data` (CRD's memory bank) receive the training-set size."""
    check_names(cfg)
    cls: Type[StudentTraining] = distiller_class(cfg.DISTILLER.TYPE)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes, cfg.DATASET.TYPE, key="DISTILLER.STUDENT")
    if not cls.needs_teacher:
        return cls(student)
    teacher = load_teacher(cfg, num_classes)
    if "num_data" in inspect.signature(cls).parameters:
        return cls(student, teacher, cfg, num_data=num_data)
    return cls(student, teacher, cfg)
