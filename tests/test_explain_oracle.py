"""mdistiller.explain against zennit (LRP composites) and captum (Grad-CAM) on torchvision ResNet18, ResNet50 and
VGG11, the models zennit's canonizers apply to (docs/explain.md, 'What the tests check'), in float64 and eval mode with
random BatchNorm statistics; the models are traced like any other.

zennit's ResNetCanonizer merges each BN into its conv and then leaves the BN computing x/√(1+eps) instead of x, so
the canonized model differs from the original by a factor 1/√(1+eps) per BN (about 4e-5 relative on ResNet18). The
models here use eps=0, where both compute the original function and must agree to rounding.
"""
import pytest
import torch
import torch.nn as nn
import torchvision
from test_explain_zoo import randomize_

from mdistiller.explain import explain, get_composite

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402

LOW = torch.tensor([-2.0, -2.1, -1.9], dtype=torch.float64)
HIGH = torch.tensor([2.2, 2.4, 2.0], dtype=torch.float64)
COMPOSITES = {
    "epsilon_plus_flat": lambda canonizers, kw: EpsilonPlusFlat(canonizers=canonizers, **kw),
    "epsilon_gamma_box": lambda canonizers, kw: EpsilonGammaBox(
        low=LOW.view(1, 3, 1, 1), high=HIGH.view(1, 3, 1, 1), canonizers=canonizers, **kw),
    "epsilon_alpha2_beta1_flat": lambda canonizers, kw: EpsilonAlpha2Beta1Flat(canonizers=canonizers, **kw),
}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    if arch == "vgg11":  # the 25088x4096 MLP is irrelevant to the check and slow; keep its structure, shrink widths
        model.classifier = nn.Sequential(nn.Linear(512 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                                         nn.ReLU(True), nn.Dropout(), nn.Linear(32, 10))
    randomize_(model, seed=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model.double().eval()


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "vgg11"])
def model_and_input(request):
    model = _model(request.param)
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64).clamp(LOW.view(1, 3, 1, 1), HIGH.view(1, 3, 1, 1))
    canonizers = [ResNetCanonizer()] if request.param.startswith("resnet") else [VGGCanonizer()]
    return model, image, canonizers


@pytest.mark.parametrize("zero_bias", [False, True])
@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_lrp_matches_zennit(model_and_input, composite, zero_bias):
    model, image, canonizers = model_and_input
    with torch.no_grad():
        classes = model(image).topk(2, 1).indices
    reference = []
    for k in range(classes.shape[1]):
        zennit_composite = COMPOSITES[composite](canonizers, {"zero_params": "bias"} if zero_bias else {})
        one_hot = nn.functional.one_hot(classes[:, k], 10)
        with Gradient(model, zennit_composite) as attributor:
            _, relevance = attributor(image, lambda out, one_hot=one_hot: one_hot.to(out) * out)
        reference.append(relevance.sum(1))
    reference = torch.stack(reference, 1)
    ours = explain(model, image, classes, "lrp", layer="input",
                   rule=get_composite(composite, low=LOW, high=HIGH), zero_bias=zero_bias)
    assert reference.abs().max() > 0
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10 * reference.abs().max().item())


def test_gradcam_matches_captum_layer_gradcam():
    captum_attr = pytest.importorskip("captum.attr")
    model = _model("resnet18")
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        classes = model(image).topk(2, 1).indices
    ours = explain(model, image, classes, "gradcam", layer="layer3.1")
    gradcam = captum_attr.LayerGradCam(model, model.layer3)
    for k in range(classes.shape[1]):
        reference = gradcam.attribute(image, target=classes[:, k], relu_attributions=True)[:, 0]
        torch.testing.assert_close(ours[:, k], reference, rtol=1e-9, atol=1e-12)
