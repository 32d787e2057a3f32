"""Every shipped config loads through the loader tools/train.py uses, names registered models, and the CIFAR-100 /
ImageNet recipes match upstream mdistiller (docs/expkd.md, 'Schedule')."""
import glob
import os

import pytest

from mdistiller.engine.config import load_cfg
from mdistiller.launch.build import check_names

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
ALL = sorted(glob.glob(os.path.join(ROOT, "**", "*.yaml"), recursive=True))

DKD_PAIRS = {  # name: (teacher, student, beta, lr)
    "res56_res20": ("resnet56", "resnet20", 2.0, 0.05),
    "res110_res32": ("resnet110", "resnet32", 2.0, 0.05),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4", 8.0, 0.05),
    "wrn40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2", 6.0, 0.05),
    "wrn40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1", 6.0, 0.05),
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0, 0.05),
    "res32x4_shuv1": ("resnet32x4", "ShuffleV1", 8.0, 0.01),
    "wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1", 8.0, 0.01),
    "vgg13_mv2": ("vgg13", "MobileNetV2", 6.0, 0.01),
    "res50_mv2": ("ResNet50", "MobileNetV2", 8.0, 0.01),
    "res32x4_shuv2": ("resnet32x4", "ShuffleV2", 8.0, 0.01),
}
TEACHERS = ["resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13"]
STUDENTS = [
    "resnet20", "resnet32", "resnet8x4", "wrn_16_2", "wrn_40_1", "vgg8", "ShuffleV1", "ShuffleV2", "MobileNetV2"
]


def _load(*parts):
    return load_cfg(os.path.join(ROOT, *parts))


def _cifar_recipe(cfg, lr):
    assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.EPOCHS, cfg.SOLVER.LR) == (64, 240, lr)
    assert (list(cfg.SOLVER.LR_DECAY_STAGES), cfg.SOLVER.LR_DECAY_RATE) == ([150, 180, 210], 0.1)
    assert (cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MOMENTUM, cfg.SOLVER.TYPE) == (0.0005, 0.9, "SGD")
    assert cfg.DATASET.TYPE == "cifar100"


def test_configs_are_found():
    assert len(ALL) >= 11 + 15 + 1 + 4 + 4


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_loads_and_names_registered_models(path):
    cfg = load_cfg(path)
    check_names(cfg)


@pytest.mark.parametrize("name", sorted(DKD_PAIRS))
def test_dkd_pairs(name):
    teacher, student, beta, lr = DKD_PAIRS[name]
    cfg = _load("cifar100", "dkd", f"{name}.yaml")
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("DKD", teacher, student)
    assert (cfg.DKD.CE_WEIGHT, cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T, cfg.DKD.WARMUP) == (1.0, 1.0, beta, 4.0, 20)
    _cifar_recipe(cfg, lr)


def test_dkd_pair_set_is_the_seed_benchmark():
    names = {os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(ROOT, "cifar100", "dkd", "*.yaml"))}
    assert names == set(DKD_PAIRS)


@pytest.mark.parametrize("model", TEACHERS + STUDENTS)
def test_vanilla_configs(model):
    cfg = _load("cifar100", "vanilla", f"{model}.yaml")
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT) == ("NONE", model)
    _cifar_recipe(cfg, 0.01 if model in ("ShuffleV1", "ShuffleV2", "MobileNetV2") else 0.05)


def test_kd_config():
    cfg = _load("cifar100", "kd.yaml")
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("KD", "resnet32x4", "resnet8x4")
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT) == (4, 0.1, 0.9)
    _cifar_recipe(cfg, 0.05)


@pytest.mark.parametrize(
    "pair,teacher,student,beta",
    [("r34_r18", "ResNet34", "ResNet18", 0.5), ("r50_mv1", "ResNet50", "MobileNetV1", 2.0)],
)
def test_imagenet_configs(pair, teacher, student, beta):
    for method in ("kd", "dkd"):
        cfg = _load("imagenet", pair, f"{method}.yaml")
        assert (cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == ("imagenet", teacher, student)
        solver = cfg.SOLVER
        assert (solver.BATCH_SIZE, solver.EPOCHS, solver.LR) == (512, 100, 0.2)
        assert list(solver.LR_DECAY_STAGES) == [30, 60, 90]
        assert (cfg.SOLVER.WEIGHT_DECAY, cfg.DATASET.TEST.BATCH_SIZE, cfg.LOG.SAVE_CHECKPOINT_FREQ) == (0.0001, 128, 10)
    kd = _load("imagenet", pair, "kd.yaml")
    assert (kd.KD.TEMPERATURE, kd.KD.LOSS.CE_WEIGHT, kd.KD.LOSS.KD_WEIGHT) == (1, 0.5, 0.5)
    dkd = _load("imagenet", pair, "dkd.yaml")
    assert (dkd.DKD.CE_WEIGHT, dkd.DKD.ALPHA, dkd.DKD.BETA, dkd.DKD.T, dkd.DKD.WARMUP) == (1.0, 1.0, beta, 1.0, 1)


def test_digits_configs_chain_teacher_to_students():
    teacher = _load("digits", "vanilla_teacher.yaml")
    run_dir = os.path.join(teacher.LOG.PREFIX, teacher.EXPERIMENT.PROJECT, teacher.EXPERIMENT.NAME)
    for method in ("kd", "dkd"):
        cfg = _load("digits", f"{method}.yaml")
        assert cfg.DATASET.TYPE == "digits" and cfg.DISTILLER.TEACHER == teacher.DISTILLER.STUDENT
        assert os.path.normpath(cfg.DISTILLER.TEACHER_CKPT) == os.path.normpath(os.path.join(run_dir, "student_best"))
