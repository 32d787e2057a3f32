"""`get_extra_parameters` against the figures upstream's train.py prints (docs/upstream_fixes.md)."""
import pytest
import torch

from mdistiller.distillers import distiller_dict
from mdistiller.engine.cfg import CFG
from mdistiller.models import cifar_model_dict

# (teacher, student): FITNET, VID (upstream: regressors only), OFD, CRD with num_data 50000
EXPECTED = {
    ("resnet32x4", "resnet8x4"): (16_768, 258_048, 86_912, 12_865_797),
    ("vgg13", "vgg8"): (66_304, 1_818_624, 609_024, 12_931_333),
    ("wrn_40_2", "wrn_16_2"): (4_288, 64_512, 21_952, 12_833_029),
    ("resnet56", "resnet20"): (1_120, 16_128, 5_600, 12_816_645),
}
# VID's log-scales are registered here (docs/upstream_fixes.md): one per teacher channel of feats[1:]
VID_SCALES = {
    "resnet32x4": 64 + 128 + 256,
    "vgg13": 128 + 256 + 512 + 512,
    "wrn_40_2": 32 + 64 + 128,
    "resnet56": 16 + 32 + 64,
}


def _models(teacher, student):
    torch.manual_seed(0)
    return cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100)


@pytest.mark.parametrize("pair", sorted(EXPECTED), ids="-".join)
def test_extra_parameters_match_upstream(pair):
    fitnet, vid, ofd, crd = EXPECTED[pair]
    cfg = CFG.clone()
    assert distiller_dict["FITNET"](*_models(*pair), cfg).get_extra_parameters() == fitnet
    assert distiller_dict["OFD"](*_models(*pair), cfg).get_extra_parameters() == ofd
    distiller = distiller_dict["VID"](*_models(*pair), cfg)
    assert sum(p.numel() for p in distiller.regressors.parameters()) == vid
    assert distiller.get_extra_parameters() == vid + VID_SCALES[pair[0]]
    student, teacher = _models(*pair)
    cfg.CRD.FEAT.STUDENT_DIM = student.get_classifier().in_features
    cfg.CRD.FEAT.TEACHER_DIM = teacher.get_classifier().in_features
    assert distiller_dict["CRD"](student, teacher, cfg, num_data=50_000).get_extra_parameters() == crd


def test_reviewkd_default_config_size():
    distiller = distiller_dict["REVIEWKD"](*_models("resnet32x4", "resnet8x4"), CFG.clone())
    assert distiller.get_extra_parameters() == 1_808_774


def test_parameter_free_methods_add_nothing():
    for name in ("AT", "RKD", "PKT", "SP", "NST", "KDSVD"):
        assert distiller_dict[name](*_models("resnet32x4", "resnet8x4"), CFG.clone()).get_extra_parameters() == 0
