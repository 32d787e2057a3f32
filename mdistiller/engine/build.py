"""Models, teachers and distillers from a config, as upstream's `tools/train.py` builds them.

Model registries by DATASET.TYPE: "imagenet" -> `imagenet_model_dict` (constructors taking `pretrained=`),
"tiny_imagenet" -> `tiny_imagenet_model_dict`, every other (CIFAR-sized) data set -> `cifar_model_dict`.
"""
import inspect
import os

import torch
import torch.nn as nn

from ..distillers import distiller_dict
from ..models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from .checkpoint import CheckpointError, load_checkpoint, load_weights, model_state_dict
from .config import ConfigError

TEACHER_HELP = "download_ckpts/README.md"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _registry(dataset_type: str):
    if dataset_type == "imagenet":
        return imagenet_model_dict
    if dataset_type == "tiny_imagenet":
        return tiny_imagenet_model_dict
    return cifar_model_dict


def registry_entry(dataset_type: str, name: str, key: str):
    registry = _registry(dataset_type)
    if name not in registry:
        raise ConfigError(
            f"{key} = {name!r} is not in the {dataset_type} model registry; expected one of {', '.join(registry)}"
        )
    return registry[name]


def build_model(dataset_type: str, name: str, num_classes: int, key: str = "DISTILLER.STUDENT") -> nn.Module:
    """A freshly initialised model from the registry of `dataset_type` (ImageNet models: no pretrained weights)."""
    entry = registry_entry(dataset_type, name, key)
    if dataset_type == "imagenet":
        return entry(pretrained=False)
    return entry[0](num_classes=num_classes)


def teacher_checkpoint_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT, or the registry's default teacher file ('' for ImageNet's torchvision weights)."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if cfg.DATASET.TYPE == "imagenet":
        return ""
    entry = registry_entry(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, "DISTILLER.TEACHER")
    if entry[1] is None:
        raise ConfigError(
            f"DISTILLER.TEACHER = {cfg.DISTILLER.TEACHER!r} has no default teacher checkpoint in the "
            f"{cfg.DATASET.TYPE} registry; set DISTILLER.TEACHER_CKPT to a trained model file (e.g. a student_best)"
        )
    return entry[1]


def load_teacher(cfg, num_classes: int) -> nn.Module:
    """The teacher of `cfg` with its trained weights; a missing file is a CheckpointError pointing to the help."""
    name = cfg.DISTILLER.TEACHER
    path = teacher_checkpoint_path(cfg)
    if cfg.DATASET.TYPE == "imagenet" and not path:
        return registry_entry(cfg.DATASET.TYPE, name, "DISTILLER.TEACHER")(pretrained=True)
    model = build_model(cfg.DATASET.TYPE, name, num_classes, "DISTILLER.TEACHER")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"teacher checkpoint not found: {path} (DISTILLER.TEACHER = {name!r}); get the teachers as described in "
            f"{TEACHER_HELP}, or set DISTILLER.TEACHER_CKPT"
        )
    state = model_state_dict(load_checkpoint(path), path)
    load_weights(model, state, path, f"teacher {name} with {num_classes} classes")
    return model


# Numbers the solver would otherwise accept silently (LR 0 trains nothing) or crash on deep inside the run.
POSITIVE_KEYS = (
    "SOLVER.LR", "SOLVER.EPOCHS", "SOLVER.BATCH_SIZE", "DATASET.TEST.BATCH_SIZE", "LOG.SAVE_CHECKPOINT_FREQ"
)
NON_NEGATIVE_KEYS = ("DATASET.NUM_WORKERS",)


def check_values(cfg) -> None:
    """A ConfigError naming the key and value for a zero or negative count, size or learning rate."""
    for key in POSITIVE_KEYS + NON_NEGATIVE_KEYS:
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value < 0 or (value == 0 and key in POSITIVE_KEYS):
            expected = "a positive number" if key in POSITIVE_KEYS else "0 or more"
            raise ConfigError(f"{key} = {value!r}; expected {expected}")


def check_names(cfg) -> None:
    """Fail fast, before any data is read, on a distiller or model name that no registry knows (or a bad number)."""
    check_values(cfg)
    if cfg.DISTILLER.TYPE not in distiller_dict:
        raise ConfigError(
            f"DISTILLER.TYPE = {cfg.DISTILLER.TYPE!r} is not a registered distiller; "
            f"expected one of {', '.join(distiller_dict)}"
        )
    registry_entry(cfg.DATASET.TYPE, cfg.DISTILLER.STUDENT, "DISTILLER.STUDENT")
    if cfg.DISTILLER.TYPE != "NONE":
        registry_entry(cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, "DISTILLER.TEACHER")


def build_distiller(cfg, num_data: int, num_classes: int) -> nn.Module:
    """Student (+ teacher) wrapped in `distiller_dict[DISTILLER.TYPE]`, on CPU. Distillers whose constructor takes
    `num_data` (CRD's memory bank) receive the training-set size."""
    check_names(cfg)
    kind = cfg.DISTILLER.TYPE
    student = build_model(cfg.DATASET.TYPE, cfg.DISTILLER.STUDENT, num_classes)
    if kind == "NONE":
        return distiller_dict[kind](student)
    teacher = load_teacher(cfg, num_classes)
    cls = distiller_dict[kind]
    if "num_data" in inspect.signature(cls).parameters:
        return cls(student, teacher, cfg, num_data=num_data)
    return cls(student, teacher, cfg)
