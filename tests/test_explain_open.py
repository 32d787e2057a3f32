"""mdistiller.explain on open models (timm, torchvision; random weights, float64, 64x64): the traced graph recomputes
each model, CAM is complete (or refused where the head is not linear after the pooling), Grad-CAM equals autograd's
and captum's LayerGradCam, gradient x input equals autograd's, the fixed rules conserve, and recorded maps equal
explain's (docs/explain.md, "What the tests check")."""
import pytest
import torch
import torch.nn as nn
from test_explain_trace import CONSERVING
from test_explain_zoo import randomize_

import mdistiller.models as models
from mdistiller.explain import (
    build_graph,
    explain,
    explain_from_features,
    explain_recorded,
    get_composite,
    record,
    supports,
)
from mdistiller.explain.engine import Spec, forward, propagate

timm = pytest.importorskip("timm")
captum_attr = pytest.importorskip("captum.attr")

MODELS = ["timm:resnet18", "timm:efficientnet_b0", "timm:mobilenetv3_small_100", "timm:regnetx_002",
          "timm:convnext_atto", "torchvision:resnet18", "torchvision:mobilenet_v3_small"]
NO_CAM = ("timm:mobilenetv3_small_100", "torchvision:mobilenet_v3_small")  # Hardswish after the pooling
CLASSES = torch.tensor([[0, 3], [4, 1]])


class Contract(nn.Module):
    """A timm / torchvision classifier under the zoo's contract, where `build_model` has no open models."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if hasattr(self.net, "forward_features"):
            gap = self.net.forward_features(x)
            return self.net.forward_head(gap), {"gap_feat": gap, "feats": [gap]}
        features = nn.Sequential(*list(self.net.children())[:-2])
        gap = features(x)
        return self.net(x), {"gap_feat": gap, "feats": [gap]}

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier() if hasattr(self.net, "get_classifier") else self.net.fc


def open_model(name: str) -> nn.Module:
    """`build_model(name)` (the zoo's timm: / torchvision: wrappers), or a local contract wrapper without them."""
    if hasattr(models, "timm_zoo"):
        return models.build_model(name, 10, dataset="cifar100")
    family, arch = name.split(":")
    net = timm.create_model(arch, num_classes=10) if family == "timm" else \
        __import__("torchvision").models.get_model(arch, weights=None, num_classes=10)
    return Contract(net)


def _randomize(model: nn.Module) -> nn.Module:
    """`randomize_`, and random layer scales (timm initialises the last BN of each block and ConvNeXt's layer scale
    near zero, which would hide whole blocks)."""
    randomize_(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", params=MODELS)
def open_case(request):
    torch.manual_seed(0)
    model = _randomize(open_model(request.param)).double().eval()
    torch.manual_seed(1)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    return request.param, model, image


def _close(actual, expected, rtol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _gradcam_reference(model, image, pick):
    """Grad-CAM of the classes at the tensor pick(feats), by autograd."""
    logits, feats = model(image)
    a = pick(feats)
    grads = torch.stack([torch.autograd.grad(logits.gather(1, CLASSES[:, k:k + 1]).sum(), a, retain_graph=True)[0]
                         for k in range(CLASSES.shape[1])], 1)
    return torch.einsum("bkc,bchw->bkhw", grads.mean((3, 4)), a.detach()).clamp(min=0)


def test_graph_recomputes_the_model(open_case):
    name, model, image = open_case
    graph = build_graph(model, image.shape)
    with torch.no_grad():
        logits, feats = model(image)
        acts = forward(graph, image)
    _close(acts.values[graph.head.output], logits)
    _close(acts.values[graph.gap], feats["gap_feat"])
    for key, feat in zip(graph.stages, feats["feats"]):
        _close(acts.values[key], feat)


def test_cam_is_complete_or_refused(open_case):
    name, model, image = open_case
    graph = build_graph(model, image.shape)
    if name in NO_CAM:
        assert "the logits are not linear in the pooled tensor; use method='gradcam'" in supports(model, "cam")
        with pytest.raises(ValueError, match="use method='gradcam'"):
            explain(model, image, CLASSES, "cam")
        return
    assert supports(model, "cam") is None
    with torch.no_grad():
        logits, feats = model(image)
    cam = explain(model, image, CLASSES, "cam")
    fc = model.get_classifier()
    bias = fc.bias
    if not graph.plain_head:  # ConvNeXt: the head LayerNorm's shift passes through the classifier
        norm = next(m for n, m in model.named_modules() if n.endswith("head.norm"))
        bias = fc.weight @ norm.bias + fc.bias
    _close(cam.mean((2, 3)) + bias[CLASSES], logits.gather(1, CLASSES))
    _close(explain_from_features(model, feats, CLASSES, "cam"), cam)


def test_gradcam_equals_autograd_and_captum(open_case):
    name, model, image = open_case
    graph = build_graph(model, image.shape)
    for layer, pick in (("gap", lambda f: f["gap_feat"]), (-2, lambda f: f["feats"][-2])):
        expected = _gradcam_reference(model, image, pick)
        _close(explain(model, image, CLASSES, "gradcam", layer), expected)
    logits, feats = model(image)
    _close(explain_from_features(model, feats, CLASSES, "gradcam"), _gradcam_reference(model, image,
                                                                                          lambda f: f["gap_feat"]))
    modules = dict(model.named_modules())
    if graph.gap in modules:  # the pooled map is a module's output: captum hooks it

        def logits_of(x):
            return model(x)[0]

        gradcam = captum_attr.LayerGradCam(logits_of, modules[graph.gap])
        reference = torch.stack([gradcam.attribute(image, target=CLASSES[:, k], relu_attributions=True)[:, 0]
                                 for k in range(CLASSES.shape[1])], 1)
        _close(explain(model, image, CLASSES, "gradcam", "gap"), reference)


def test_gradient_times_input_equals_autograd(open_case):
    name, model, image = open_case
    x = image.clone().requires_grad_()
    logits = model(x)[0]
    grads = torch.stack([torch.autograd.grad(logits.gather(1, CLASSES[:, k:k + 1]).sum(), x, retain_graph=True)[0]
                         for k in range(CLASSES.shape[1])], 1)
    _close(explain(model, image, CLASSES, "gradient_input", "input"), (grads * image.unsqueeze(1)).sum(2))


def test_fixed_rules_conserve_and_recorded_maps_equal_explain(open_case):
    name, model, image = open_case
    graph = build_graph(model, image.shape)
    log = []
    composite = get_composite("epsilon_plus_flat", epsilon=1e-12, stabilizer=1e-12)
    with torch.no_grad():
        propagate(forward(graph, image), CLASSES, "input", Spec("lrp", composite, True),
                  lambda node, r, ins: log.append((node, r, ins)))
    for node, r, ins in log:
        if node.op in CONSERVING:
            _close(sum(i.flatten(2).sum(-1) for i in ins if i is not None), r.flatten(2).sum(-1), rtol=1e-8)
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    for train in (False, True):
        model.train(train)
        if train and dropouts:  # torchvision's MobileNetV3 classifier: random in training mode, refused
            with pytest.raises(ValueError, match="is a Dropout in training mode"):
                explain(model, image, CLASSES, "lrp", "input")
            for m, _ in dropouts:
                m.p = 0.0
        with record(model) as tape:
            model(image)
        for layer in ("input", -2):
            _close(explain_recorded(tape, CLASSES, "lrp", layer), explain(model, image, CLASSES, "lrp", layer))
    model.eval()
    for m, p in dropouts:
        m.p = p


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_expkd_refuses_at_start_a_model_it_cannot_explain(role):
    """Exp-KD checks its explainer against both models when it is built, not at the first batch."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    zoo, unexplainable = models.build_model("resnet8", 10), open_model("timm:mobilenetv3_small_100")
    student, teacher = (unexplainable, zoo) if role == "student" else (zoo, unexplainable.eval())
    cfg = CFG.clone()
    cfg.EXPKD.TOPK = 2
    with pytest.raises(ValueError, match=rf"EXPKD\.EXPLAINER 'cam' at EXPKD\.LAYER 'gap': the {role} cannot be "
                                         r"explained: .*hardswish.*use method='gradcam'"):
        distiller_dict["EXPKD"](student, teacher, cfg)
    cfg.EXPKD.EXPLAINER = "gradcam"
    distiller_dict["EXPKD"](student, teacher, cfg)  # Grad-CAM at the pooled tensor needs no linear head


def test_expkd_refuses_a_student_with_active_dropout():
    """Dropout in training mode is random, so the student's maps could not be recomputed (docs/models.md)."""
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG

    cfg = CFG.clone()
    cfg.EXPKD.TOPK, cfg.EXPKD.EXPLAINER = 2, "gradcam"
    student = open_model("torchvision:mobilenet_v3_small")
    with pytest.raises(ValueError, match=r"the student cannot be explained: .*Dropout in training mode"):
        distiller_dict["EXPKD"](student, models.build_model("resnet8", 10), cfg)
