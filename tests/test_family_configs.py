"""The shipped family configs: ReviewKD per-pair layouts match the models, DOT configs select the DOT trainer."""
import glob
import os

import pytest
import torch

from mdistiller.distillers.ReviewKD import reviewkd_layout
from mdistiller.engine.cfg import CFG
from mdistiller.models import cifar_model_dict

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar100")


def _load(path):
    cfg = CFG.clone()
    cfg.merge_from_file(path)
    return cfg


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "reviewkd", "*.yaml"))), ids=os.path.basename)
def test_reviewkd_pair_config_describes_its_pair(path):
    cfg = _load(path)
    names = (cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER)
    models = [cifar_model_dict[name][0](num_classes=100).eval() for name in names]
    with torch.no_grad():
        image = torch.randn(1, 3, 32, 32)
        layout = reviewkd_layout(models[0](image)[1], models[1](image)[1], cfg.REVIEWKD.STU_PREACT)
    assert {key: list(cfg.REVIEWKD[key]) for key in layout} == layout


def test_reviewkd_configs_cover_the_seed_pairs():
    names = {os.path.basename(p)[: -len(".yaml")] for p in glob.glob(os.path.join(ROOT, "reviewkd", "*.yaml"))}
    assert names == {
        "res56_res20", "res110_res32", "res32x4_res8x4", "wrn40_2_wrn_16_2", "wrn40_2_wrn_40_1", "vgg13_vgg8",
        "res32x4_shuv1", "wrn40_2_shuv1", "vgg13_mv2", "res50_mv2", "res32x4_shuv2",
    }


@pytest.mark.parametrize("name", ["res32x4_res8x4", "res32x4_shuv2", "vgg13_vgg8"])
def test_dot_configs(name):
    cfg = _load(os.path.join(ROOT, "dot", f"{name}.yaml"))
    assert (cfg.DISTILLER.TYPE, cfg.SOLVER.TRAINER, cfg.SOLVER.DOT.DELTA) == ("KD", "dot", 0.075)
    assert cfg.SOLVER.LR == (0.01 if "shuv2" in name else 0.05)


BASELINES = ["at", "fitnet", "rkd", "pkt", "sp", "nst", "kdsvd", "vid", "ofd", "reviewkd", "crd"]


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_configs(method):
    cfg = _load(os.path.join(ROOT, f"{method}.yaml"))
    pair = (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
    assert (cfg.DISTILLER.TYPE, pair) == (method.upper(), ("resnet32x4", "resnet8x4"))
    assert cfg.SOLVER.TRAINER == ("crd" if method == "crd" else "base")
    assert (cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.EPOCHS, cfg.SOLVER.LR) == (0.0005, 240, 0.05)
