"""One training step (forward_train, backward, SGD step) of every family distiller on every CIFAR teacher/student
pair of the seed benchmark, on CPU with batch 2 and random teachers."""
import os

import pytest
import torch

from mdistiller.distillers import distiller_dict
from mdistiller.engine.cfg import CFG
from mdistiller.models import cifar_model_dict

PAIRS = {
    "res56_res20": ("resnet56", "resnet20"),
    "res110_res32": ("resnet110", "resnet32"),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "res32x4_shuv1": ("resnet32x4", "ShuffleV1"),
    "wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1"),
    "vgg13_mv2": ("vgg13", "MobileNetV2"),
    "res50_mv2": ("ResNet50", "MobileNetV2"),
    "res32x4_shuv2": ("resnet32x4", "ShuffleV2"),
}
METHODS = ["AT", "FITNET", "RKD", "PKT", "SP", "NST", "KDSVD", "VID", "OFD", "REVIEWKD", "CRD"]
REVIEWKD_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar100", "reviewkd")
NUM_DATA = 8


def _build(method, pair):
    teacher_name, student_name = PAIRS[pair]
    torch.manual_seed(0)
    student = cifar_model_dict[student_name][0](num_classes=100)
    teacher = cifar_model_dict[teacher_name][0](num_classes=100)
    cfg = CFG.clone()
    if method == "REVIEWKD":
        cfg.merge_from_file(os.path.join(REVIEWKD_CONFIGS, f"{pair}.yaml"))
    if method == "CRD":
        cfg.CRD.FEAT.STUDENT_DIM = student.get_classifier().in_features
        cfg.CRD.FEAT.TEACHER_DIM = teacher.get_classifier().in_features
        cfg.CRD.NCE.K = 4
        return distiller_dict[method](student, teacher, cfg, num_data=NUM_DATA)
    return distiller_dict[method](student, teacher, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_one_training_step_of_every_method(pair):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    target = torch.tensor([3, 7])
    index = torch.tensor([1, 5])
    contrastive_index = torch.randint(0, NUM_DATA, (2, 5), generator=generator)
    contrastive_index[:, 0] = index
    for method in METHODS:
        distiller = _build(method, pair).train()
        params = distiller.get_learnable_parameters()
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        _, losses = distiller(image=image, target=target, epoch=1, index=index, contrastive_index=contrastive_index)
        assert set(losses) == {"loss_ce", "loss_kd"}, method
        assert all(torch.isfinite(v).all() for v in losses.values()), (method, losses)
        student_params = [p for p in distiller.student.parameters() if p.requires_grad]
        kd_grads = torch.autograd.grad(losses["loss_kd"], student_params, retain_graph=True, allow_unused=True)
        if method != "RKD":  # with two samples RKD's normalised distances and angles are constants
            assert any(g is not None and g.abs().sum() > 0 for g in kd_grads), (method, pair)
        before = [p.detach().clone() for p in params]
        sum(losses.values()).backward()
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, params)), method
        assert all(p.grad is None for p in distiller.teacher.parameters()), method
