"""Models, teachers, distillers and trainers from a config, as upstream's `tools/train.py` builds them, and the one
way every tool loads a model by name with its weights."""
import inspect
import os
from typing import List, Sequence, Type

import torch
import torch.nn as nn

from ..distillers import StudentTraining, distiller_class, distiller_dict
from ..engine import trainer_dict
from ..engine.checkpoint import CheckpointError, load_weights
from ..engine.recipes import OPTIMIZERS, SCHEDULERS
from ..errors import ConfigError
from ..models import build_model, check_model_name, default_checkpoint, is_zoo_name
from .weights import read_state_dict

TEACHER_HELP = "download_ckpts/README.md"
PRETRAIN = "pretrain"  # the registry's teacher checkpoint (torchvision's weights on ImageNet)
RANDOM = "none"  # a freshly initialised model (smoke tests of the tools)
HUB = "hub"  # the hub's pretrained weights of a timm:/torchvision: model, downloaded (docs/models.md)
INPUT_SIZES = {"imagenet": 224, "tiny_imagenet": 64}  # the other data sets: DATASET.IMAGE_SIZE (default 32)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def input_size(dataset: str, configured: int = 32) -> int:
    """The side of the square images of DATASET.TYPE `dataset` that models are built for; `configured` is
    DATASET.IMAGE_SIZE, used for every data set but ImageNet's and Tiny-ImageNet's."""
    return INPUT_SIZES.get(dataset, configured)


def load_model(name: str, dataset: str, num_classes: int, ckpt: str, key: str = "-m/--model",
               ckpt_key: str = "-c/--ckpt") -> nn.Module:
    """Model `name` (docs/models.md) for `dataset` with the weights of `ckpt`: a file (any checkpoint format the
    framework writes, upstream's teacher files, timm/torchvision weight files), PRETRAIN (the registry's teacher),
    HUB (a timm:/torchvision: model's hub weights, downloaded) or RANDOM; in eval mode."""
    _check_hub(name, ckpt, key, ckpt_key)
    if ckpt == HUB or (ckpt == PRETRAIN and dataset == "imagenet" and is_zoo_name(name)):
        return build_model(name, num_classes, input_size(dataset), dataset, pretrained=True, key=key).eval()
    model = build_model(name, num_classes, input_size(dataset), dataset, key=key)
    if ckpt == RANDOM:
        return model.eval()
    path = ckpt
    if ckpt == PRETRAIN:
        path = default_checkpoint(name, dataset, key)
        if path is None:
            hub = "" if is_zoo_name(name) else f" (or {ckpt_key} {HUB} for the hub's pretrained weights)"
            raise ConfigError(f"{key} {name!r} has no pretrained checkpoint in the {dataset} registry; pass "
                              f"{ckpt_key} CKPT{hub}")
    _load_file(model, path, f"model {name} with {num_classes} classes",
               f"checkpoint not found: {path} ({ckpt_key} {ckpt}, {key} {name!r}); get the teachers as described "
               f"in {TEACHER_HELP}")
    return model.eval()


def _check_hub(name: str, ckpt: str, key: str, ckpt_key: str) -> None:
    """HUB is for open models: a zoo model's pretrained weights are its registry checkpoint."""
    if ckpt == HUB and is_zoo_name(name):
        raise ConfigError(f"{ckpt_key} {HUB} downloads the hub weights of timm:/torchvision: models; {key} {name!r} "
                          f"is a zoo model: use its registry checkpoint or a weights file")


def _load_file(model: nn.Module, path: str, what: str, missing: str) -> None:
    """The weights of the checkpoint file `path` into `model`; `missing` is the error when there is no such file."""
    if not os.path.isfile(path):
        raise CheckpointError(missing)
    load_weights(model, read_state_dict(path), path, what)


def teacher_checkpoint_path(cfg) -> str:
    """DISTILLER.TEACHER_CKPT, or the registry's default teacher file ('' for ImageNet's torchvision weights); a
    timm:/torchvision: or registered teacher has no default."""
    if cfg.DISTILLER.TEACHER_CKPT:
        return cfg.DISTILLER.TEACHER_CKPT
    if not is_zoo_name(cfg.DISTILLER.TEACHER):
        raise ConfigError(f"DISTILLER.TEACHER = {cfg.DISTILLER.TEACHER!r} has no default checkpoint; set "
                          f"DISTILLER.TEACHER_CKPT to its weights file (train it first with DISTILLER.TYPE NONE), or "
                          f"to {HUB!r} for the hub's pretrained weights (docs/models.md)")
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
    size = input_size(cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE)
    _check_hub(name, path, "DISTILLER.TEACHER", "DISTILLER.TEACHER_CKPT")
    if path == HUB or (cfg.DATASET.TYPE == "imagenet" and not path):
        return build_model(name, num_classes, size, cfg.DATASET.TYPE, pretrained=True, key="DISTILLER.TEACHER")
    model = build_model(name, num_classes, size, cfg.DATASET.TYPE, key="DISTILLER.TEACHER")
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
    """A ConfigError naming the key and value for a zero or negative count, size or learning rate, or a recipe
    setting out of its range."""
    for key in POSITIVE_KEYS + NON_NEGATIVE_KEYS:
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value < 0 or (value == 0 and key in POSITIVE_KEYS):
            expected = "a positive number" if key in POSITIVE_KEYS else "0 or more"
            raise ConfigError(f"{key} = {value!r}; expected {expected}")
    check_recipe_values(cfg.SOLVER)


def check_recipe_values(solver) -> None:
    """The SOLVER keys of docs/recipes.md (comparisons written so that NaN fails them too)."""
    checks = (
        ("TYPE", solver.TYPE in OPTIMIZERS, f"one of {', '.join(map(repr, OPTIMIZERS))}"),
        ("SCHEDULER", solver.SCHEDULER in SCHEDULERS, f"one of {', '.join(map(repr, SCHEDULERS))}"),
        ("WARMUP_EPOCHS", 0 <= solver.WARMUP_EPOCHS < solver.EPOCHS,
         f"0 (off) or more epochs, fewer than SOLVER.EPOCHS = {solver.EPOCHS}"),
        ("MIN_LR", 0 <= solver.MIN_LR <= solver.LR, f"0 to SOLVER.LR = {solver.LR}"),
        ("LABEL_SMOOTHING", 0 <= solver.LABEL_SMOOTHING < 1, "0 (off) or more and below 1"),
        ("CLIP_GRAD", solver.CLIP_GRAD >= 0, "0 (off) or a positive maximum gradient norm"),
        ("EMA_DECAY", 0 <= solver.EMA_DECAY < 1, "0 (off) or more and below 1"),
    )
    for key, valid, expected in checks:
        if not valid:
            raise ConfigError(f"SOLVER.{key} = {solver[key]!r}; expected {expected}")


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
    check_model_name(cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE, "DISTILLER.STUDENT")
    if method.needs_teacher:
        check_model_name(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE, "DISTILLER.TEACHER")
    trainer_class(cfg)


def unread_overrides(cfg, opts: Sequence[str]) -> List[str]:
    """The override keys that belong to another distiller's config node than DISTILLER.TYPE's (`DKD.BETA` on a KD
    run): accepted, but the run never reads them."""
    nodes = {getattr(cls, "config_node", None) for cls in distiller_dict.values()} - {None}
    own = getattr(distiller_class(cfg.DISTILLER.TYPE), "config_node", None)
    return [key for key in opts[0::2] if str(key).split(".")[0] in nodes - {own}]


def _pair(cls: Type[StudentTraining], student: nn.Module, teacher: nn.Module, cfg, num_data: int) -> nn.Module:
    """`cls(student, teacher, cfg)`; a pair whose features the method cannot connect (the shapes of an open model
    and a zoo model, say) is one line naming the method, both models and the method's reason (with the shapes)."""
    try:
        if "num_data" in inspect.signature(cls).parameters:
            return cls(student, teacher, cfg, num_data=num_data)
        return cls(student, teacher, cfg)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"DISTILLER.TYPE = {cfg.DISTILLER.TYPE!r} cannot pair DISTILLER.TEACHER = "
                          f"{cfg.DISTILLER.TEACHER!r} with DISTILLER.STUDENT = {cfg.DISTILLER.STUDENT!r}: {error}") \
            from error


def build_distiller(cfg, num_data: int, num_classes: int) -> nn.Module:
    """Student (+ teacher) wrapped in the DISTILLER.TYPE class, on CPU, with SOLVER.LABEL_SMOOTHING. Distillers whose
    constructor takes `num_data` (CRD's memory bank) receive the training-set size."""
    check_names(cfg)
    cls: Type[StudentTraining] = distiller_class(cfg.DISTILLER.TYPE)
    student = build_model(cfg.DISTILLER.STUDENT, num_classes, input_size(cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE),
                          cfg.DATASET.TYPE, key="DISTILLER.STUDENT")
    if not cls.needs_teacher:
        distiller = cls(student)
    else:
        distiller = _pair(cls, student, load_teacher(cfg, num_classes), cfg, num_data)
    distiller.label_smoothing = cfg.SOLVER.LABEL_SMOOTHING  # of `ce_loss`: distillers do not read SOLVER
    return distiller
