"""mdistiller.explain on the model zoo (the checks listed in docs/explain.md, 'What the tests check').

Each model gets random BatchNorm statistics and affine parameters and random biases, so BN folding and bias handling
are exercised. Every model of every registry gets the checks that depend on its wiring (float32); one model per
architecture and block type gets the float64 identities; the finite-difference checks use small models that together
contain every layer type.
"""
import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

from mdistiller.explain import build_graph, explain, explain_recorded, get_composite, get_rule, record
from mdistiller.explain.engine import Spec, forward, propagate
from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict

ZOO = (
    [(f"cifar/{n}", ctor, 32, 10) for n, (ctor, _) in cifar_model_dict.items()]
    + [("cifar/vgg8@64", cifar_model_dict["vgg8"][0], 64, 10)]
    + [(f"tiny/{n}", ctor, 64, 20) for n, (ctor, _) in tiny_imagenet_model_dict.items()]
    + [(f"imagenet/{n}", ctor, 64, 20) for n, ctor in imagenet_model_dict.items()]
)
STRUCTURAL_OPS = ("act", "add", "mul", "scale", "cat", "index", "reshape", "permute", "avgpool", "maxpool", "gap")
TINY = 1e-12  # stabiliser for identities that hold for epsilon -> 0
LRP0 = get_composite("epsilon", epsilon=1e-100, stabilizer=1e-100)
ZPLUS_FLAT = get_composite("epsilon_plus_flat", epsilon=TINY, stabilizer=TINY)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running statistics, BN and LayerNorm affine parameters and random biases, so no fold or bias is
    trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _build(ctor, num_classes: int) -> nn.Module:
    try:
        return ctor(num_classes=num_classes)
    except TypeError:
        return ctor(num_classes)


def _autograd_maps(model: nn.Module, image: torch.Tensor, classes: torch.Tensor, pick):
    """Reference Grad-CAM / gradient x input from autograd on the model's own forward; `pick(image, feats)` chooses
    the tensor A; returns the stacked (gradient, A) per class."""
    image = image.clone().requires_grad_()
    logits, feats = model(image)
    a = pick(image, feats)
    grads = [torch.autograd.grad(logits.gather(1, classes[:, k:k + 1]).sum(), a, retain_graph=True)[0]
             for k in range(classes.shape[1])]
    return torch.stack(grads, 1), a.detach()


def _totals(log: list):
    """Observer recording, per node, the total relevance per (sample, class) leaving and entering it, and the total
    of its absolute values (the scale of rounding in the sums)."""
    return lambda node, r, ins: log.append(
        (node, r.flatten(2).sum(-1), sum(i.flatten(2).sum(-1) for i in ins if i is not None),
         r.flatten(2).abs().sum(-1)))


def _conserved(log: list, ops, rtol: float, what: str) -> None:
    assert log, f"{what}: no op visited"
    for node, out_total, in_total, scale in log:
        if ops is None or node.op in ops:
            assert torch.isfinite(in_total).all(), f"{what}: non-finite relevance at {node.output}"
            error = ((in_total - out_total).abs() / scale.clamp(min=1e-30)).max().item()
            assert error <= rtol, f"{what} at {node.op} {node.output}: relative error {error:.2e}"


def _close(actual, expected, what, rtol=1e-7, atol_scale=1e-9):
    atol = atol_scale * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _model(ctor, num_classes: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(_build(ctor, num_classes)).to(dtype).eval()


@pytest.mark.parametrize("name,ctor,size,num_classes", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_wiring(name, ctor, size, num_classes):
    """Every model, float32: the graph recomputes the model (eval and train mode), CAM completeness, every
    residual add / concatenation / shuffle / split / pooling conserves relevance, a recorded forward gives
    the same maps, and explaining changes nothing."""
    model = _model(ctor, num_classes, torch.float32)
    image = torch.randn(2, 3, size, size)
    graph = build_graph(model, image.shape)
    state = copy.deepcopy(model.state_dict())
    for train in (False, True):
        model.train(train)
        with torch.no_grad():
            logits, feats = model(image)
            acts = forward(graph, image)
        model.load_state_dict(state)
        _close(acts.values[graph.head.output], logits, f"graph logits (train={train})", rtol=1e-5, atol_scale=1e-6)
        _close(acts.values[graph.gap], feats["gap_feat"], "graph gap_feat", rtol=1e-5, atol_scale=1e-6)
        assert len(graph.stages) == len(feats["feats"])
        for i, (key, feat) in enumerate(zip(graph.stages, feats["feats"])):
            _close(acts.values[key], feat, f"graph stage {i} ({key})", rtol=1e-5, atol_scale=1e-6)
    model.eval()
    with torch.no_grad():
        logits = model(image)[0]
    classes = logits.topk(2, 1).indices

    cam = explain(model, image, classes, "cam")
    bias = model.get_classifier().bias
    _close(cam.mean((2, 3)) + bias[classes], logits.gather(1, classes), "CAM completeness", rtol=1e-5,
           atol_scale=1e-6)

    per_node = []
    with torch.no_grad():
        propagate(forward(graph, image), classes, "input", Spec("lrp", ZPLUS_FLAT, True), _totals(per_node))
    _conserved(per_node, STRUCTURAL_OPS, 1e-5, "conservation")

    maps = explain(model, image, classes, "lrp", layer="input")
    with record(model) as tape:
        model(image)
    _close(explain_recorded(tape, classes, "lrp", layer="input"), maps, "recorded LRP", rtol=1e-5, atol_scale=1e-6)

    model.train()
    for p in model.parameters():
        p.grad = None
    marker = next(model.parameters())
    marker.grad = torch.full_like(marker, 0.5)
    assert explain(model, image, classes, "lrp", layer="input", create_graph=True).requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"explain changed {key}"
    assert torch.equal(marker.grad, torch.full_like(marker, 0.5))
    assert all(p.grad is None for p in model.parameters() if p is not marker)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image)[0], logits, rtol=0, atol=0)


# one model per architecture and block type (BasicBlock/downsample, width, WRN with and without a shortcut conv, VGG,
# inverted residuals, ShuffleNet units, ReLU6 and a conv head, max-pool stem, depthwise stacks), at small inputs
FULL = [
    ("cifar/resnet8", cifar_model_dict["resnet8"][0], 16, 10),
    ("cifar/resnet8x4", cifar_model_dict["resnet8x4"][0], 16, 10),
    ("cifar/ResNet18", cifar_model_dict["ResNet18"][0], 16, 10),
    ("cifar/wrn_16_1", cifar_model_dict["wrn_16_1"][0], 16, 10),
    ("cifar/wrn_16_2", cifar_model_dict["wrn_16_2"][0], 16, 10),
    ("cifar/vgg8", cifar_model_dict["vgg8"][0], 16, 10),
    ("cifar/MobileNetV2", cifar_model_dict["MobileNetV2"][0], 16, 10),
    ("cifar/ShuffleV1", cifar_model_dict["ShuffleV1"][0], 16, 10),
    ("cifar/ShuffleV2", cifar_model_dict["ShuffleV2"][0], 16, 10),
    ("tiny/MobileNetV2", tiny_imagenet_model_dict["MobileNetV2"][0], 16, 20),
    ("imagenet/ResNet18", imagenet_model_dict["ResNet18"], 64, 20),
    ("imagenet/MobileNetV1", imagenet_model_dict["MobileNetV1"], 64, 20),
]


@pytest.mark.parametrize("name,ctor,size,num_classes", FULL, ids=[z[0] for z in FULL])
def test_zoo_identities(name, ctor, size, num_classes):
    """float64 identities (items 1-5, 8, 9) on one model per architecture and block type."""
    model = _model(ctor, num_classes, torch.float64)
    image = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        logits, feats = model(image)
    classes = logits.topk(2, 1).indices
    graph = build_graph(model, image.shape)
    bias = model.get_classifier().bias

    # 1: Grad-CAM at gap = ReLU(CAM)/(HW) = autograd Grad-CAM; the engine's own gradient there gives CAM/(HW)
    cam = explain(model, image, classes, "cam")
    area = cam.shape[2] * cam.shape[3]
    gradcam = explain(model, image, classes, "gradcam")
    _close(gradcam, cam.clamp(min=0) / area, "Grad-CAM = ReLU(CAM)/HW")
    grads, gap_feat = _autograd_maps(model, image, classes, lambda x, f: f["gap_feat"])
    _close(gradcam, torch.einsum("bkc,bchw->bkhw", grads.mean((3, 4)), gap_feat).clamp(min=0), "Grad-CAM, autograd")
    _close(explain(model, image, classes, "gradient_input", layer=graph.gap), cam / area, "engine gradient at gap")
    # the engine's gradient through the whole graph: gradient x input at the image = autograd
    grads, x = _autograd_maps(model, image, classes, lambda x, f: x)
    _close(explain(model, image, classes, "gradient_input", layer="input"), (grads * x.unsqueeze(1)).sum(2),
           "gradient x input vs autograd")

    # 4: epsilon on the head and the z-rule on GAP give CAM/(HW) at gap_feat, total logit - bias
    link = get_composite("epsilon", epsilon=TINY, stabilizer=TINY)
    lrp_gap = explain(model, image, classes, "lrp", layer="gap", rule=link)
    _close(lrp_gap, cam / area, "LRP at gap = CAM/HW", atol_scale=1e-8)
    _close(lrp_gap.sum((2, 3)), logits.gather(1, classes) - bias[classes], "LRP total at gap")

    # 8: batch invariance (the batch reversed, a sample alone) and 9: one class = its row of a K-class call
    for method, layer in (("lrp", "input"), ("gradcam", 1)):
        maps = explain(model, image, classes, method, layer)
        _close(explain(model, image.flip(0), classes.flip(0), method, layer), maps.flip(0), f"{method} reversed batch")
        _close(explain(model, image[1:], classes[1:, 1:], method, layer), maps[1:, 1:], f"{method} alone, one class")

    # reuse of a training-mode forward: batch statistics, recorded = recomputed
    model.train()
    expected = explain(model, image, classes, "lrp", layer=1)
    with record(model) as tape:
        model(image)
    _close(explain_recorded(tape, classes, "lrp", layer=1), expected, "recorded LRP in train mode")
    model.eval()

    # 3: LRP-0 (epsilon -> 0) = gradient x input on the bias-free network (all biases and BN shifts zero); inputs
    # scaled down so ReLU6 stays in its linear range
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.zero_()
    small = image * 0.1
    grads, x = _autograd_maps(model, small, classes, lambda x, f: x)
    _close(explain(model, small, classes, "lrp", layer="input", rule=LRP0), (grads * x.unsqueeze(1)).sum(2),
           "LRP-0 = gradient x input", atol_scale=1e-7)

    # 5: end-to-end conservation with z+/flat and zero_bias: on the bias-free model with non-negative, normalised
    # weights every z+ normaliser is positive wherever relevance arrives, so the input map sums to the logit and
    # every op conserves (a random model loses the relevance of units with no positive contribution, e.g. in
    # depthwise convs: see docs/explain.md)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(m.weight.abs() / m.weight.abs().flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1)))
        logits = model(image)[0]
        per_node = []
        relevance = propagate(forward(graph, image), classes, "input", Spec("lrp", ZPLUS_FLAT, True),
                              _totals(per_node))
    _close(relevance.flatten(2).sum(-1), logits.gather(1, classes), "z+/flat zero_bias: input total = logit",
           rtol=1e-6)
    _conserved(per_node, None, 1e-9, "z+/flat conservation")


# ---------------------------------------------------------------------------------------------- 7: finite differences

RULES = ("epsilon", "zplus", "alpha2beta1", "gamma", "flat", "wsquare", get_composite("zplus", first=get_rule("zbox")))
# model, input size, method, layer, rule, train mode: every layer type (conv, grouped/depthwise conv, folded BN in
# eval and train mode, standalone BN, add, cat, slice, shuffle, max/avg pooling, ReLU6, 1x1-conv head)
FD_CASES = (
    [("resnet8", 8, "lrp", "input", rule, False) for rule in RULES]
    + [
        ("resnet8", 8, "lrp", "input", "epsilon_plus_flat", True),
        ("resnet8", 8, "gradcam", 2, None, True),
        ("ShuffleV1", 8, "lrp", "input", "epsilon_gamma_box", False),
        ("ShuffleV2", 8, "lrp", "input", "epsilon_alpha2_beta1_flat", False),
        ("MobileNetV2", 16, "lrp", "input", "epsilon_plus_flat", False),
        ("wrn_16_1", 8, "lrp", "input", get_composite("epsilon_plus_flat", bn=get_rule("epsilon")), False),
        ("vgg8", 16, "lrp", "input", "epsilon_plus_flat", False),
        ("tiny:MobileNetV2", 8, "lrp", 1, "epsilon_gamma_box", False),
    ]
)


def _fd_model(name: str) -> nn.Module:
    if name.startswith("tiny:"):
        return tiny_imagenet_model_dict[name[5:]][0](num_classes=5)
    return _build(cifar_model_dict[name][0], 5)


def _fd_id(case) -> str:
    name, _, method, layer, rule, train = case
    rule = rule if rule is None or isinstance(rule, str) else f"{rule.first.name}-{rule.conv.name}-bn_{rule.bn.name}"
    return f"{name}-{method}@{layer}-{rule}-{'train' if train else 'eval'}"


@pytest.mark.parametrize("name,size,method,layer,rule,train", FD_CASES, ids=[_fd_id(c) for c in FD_CASES])
def test_map_gradients_match_finite_differences(name, size, method, layer, rule, train):
    """d/dθ Σ maps·T by autograd through the maps (create_graph) = central differences, for sampled weights of
    every parameterised layer kind the model has (first, middle and last conv, a BN scale and shift, the head)."""
    torch.manual_seed(0)
    model = randomize_(_fd_model(name)).double().train(train)
    image = torch.randn(2, 3, size, size, dtype=torch.float64)
    classes = torch.tensor([[0, 3], [4, 1]])
    kwargs = dict(method=method, layer=layer, **({} if rule is None else {"rule": rule}))
    target = torch.randn_like(explain(model, image, classes, **kwargs))

    def loss() -> torch.Tensor:
        return (explain(model, image, classes, create_graph=True, **kwargs) * target).sum()

    named = dict(model.named_parameters())
    convs = [n for n in named if n.endswith("weight") and named[n].dim() == 4]
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    picks = [convs[0], convs[len(convs) // 2], convs[-1], f"{bns[len(bns) // 2]}.weight",
             f"{bns[len(bns) // 2]}.bias", [n for n in named if n.endswith("weight")][-1]]
    grads = torch.autograd.grad(loss(), [named[n] for n in picks])
    # the epsilon rule near small denominators is curved enough that h = 1e-6 shows truncation error
    _check_central_differences(named, picks, grads, lambda: loss().item(), h=1e-7, rtol=1e-4, floor=1e-6)


def _check_central_differences(named, picks, grads, loss, h: float, rtol: float, floor: float) -> None:
    """Autograd's gradient = central differences of `loss` at one random entry of each picked parameter."""
    g = torch.Generator().manual_seed(1)
    for pname, grad in zip(picks, grads):
        param = named[pname]
        idx = tuple(int(torch.randint(size, (1,), generator=g)) for size in param.shape)
        with torch.no_grad():
            original = param[idx].item()
            param[idx] = original + h
            up = loss()
            param[idx] = original - h
            down = loss()
            param[idx] = original
        numeric = (up - down) / (2 * h)
        scale = max(abs(numeric), abs(grad[idx].item()), floor)
        assert abs(grad[idx].item() - numeric) / scale < rtol, \
            f"{pname}{list(idx)}: autograd {grad[idx].item():.10g} vs finite difference {numeric:.10g}"


@dataclass(frozen=True)
class _FrozenNormalizers(Spec):
    """LRP whose normalisers are those recorded by an earlier walk (`recorded`, in call order) once `replay` is set."""

    recorded: list = field(default_factory=list)
    replay: list = field(default_factory=list)

    def stable(self, z: torch.Tensor, epsilon: float) -> torch.Tensor:
        if self.replay:
            return self.replay.pop(0)
        value = super().stable(z, epsilon).detach()
        self.recorded.append(value)
        return value


@pytest.mark.parametrize("rule,train", [("epsilon_plus_flat", True), ("epsilon_gamma_box", False)])
def test_detached_normalizers_give_the_derivative_with_the_normalizers_held_fixed(rule, train):
    """detach_normalizers: the same maps, and autograd gives exactly the derivative of the walk whose normalisers
    stay at their current values (central differences with the normalisers replayed), not the full derivative."""
    torch.manual_seed(0)
    model = randomize_(_fd_model("resnet8")).double().train(train)
    image = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    classes = torch.tensor([[0, 3], [4, 1]])
    graph = build_graph(model, image.shape)
    maps = explain(model, image, classes, "lrp", "input", rule, create_graph=True, detach_normalizers=True)
    assert torch.equal(maps.detach(), explain(model, image, classes, "lrp", "input", rule))
    target = torch.randn_like(maps)
    named = dict(model.named_parameters())
    picks = [n for n in named if n.endswith("weight")]
    picks = [picks[0], picks[len(picks) // 2], picks[-1]]
    detached = torch.autograd.grad((maps * target).sum(), [named[n] for n in picks])
    full = torch.autograd.grad((explain(model, image, classes, "lrp", "input", rule, create_graph=True) * target).sum(),
                               [named[n] for n in picks])
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(detached, full)), "no normaliser was detached"

    frozen = _FrozenNormalizers("lrp", get_composite(rule))
    with torch.no_grad():
        propagate(forward(graph, image), classes, "input", frozen)

    def loss() -> float:
        frozen.replay.extend(frozen.recorded)
        value = (propagate(forward(graph, image), classes, "input", frozen).sum(2) * target).sum().item()
        assert not frozen.replay, "the walk read a different number of normalisers"
        return value

    _check_central_differences(named, picks, detached, loss, h=1e-6, rtol=1e-6, floor=1e-8)
