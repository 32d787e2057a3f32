"""mdistiller.explain on a user's own classes, traced with torch.fx: every op of docs/explain.md ("Ops and their
rules") against its identity (the graph recomputes the model, gradients are autograd's, conservation, LRP-0 =
gradient x input on bias-free piecewise-linear nets, CAM completeness), the LayerNorm and gate rules, and the one-line
refusals (docs/explain.md, "Tracing")."""
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_explain_zoo import _check_central_differences, randomize_

from mdistiller.explain import (
    build_graph,
    explain,
    explain_from_features,
    explain_recorded,
    get_composite,
    get_rule,
    record,
    register_leaf,
    supports,
)
from mdistiller.explain.engine import Spec, forward, propagate
from mdistiller.explain.trace import MODULE_RULES

TINY = 1e-12
CLASSES = torch.tensor([[0, 3], [4, 1]])
# ops whose rule is fixed and conserves (act, the LayerNorm and a standalone BN with the default Pass included)
CONSERVING = ("act", "add", "mul", "scale", "cat", "index", "reshape", "permute", "avgpool", "maxpool", "gap", "norm")


class Gate(nn.Module):
    """Squeeze-excitation: the signal times a gate computed from its spatial mean."""

    def __init__(self, channels: int, hard: bool = False):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // 2, 1)
        self.expand = nn.Conv2d(channels // 2, channels, 1)
        self.gate = nn.Hardsigmoid() if hard else nn.Sigmoid()

    def forward(self, x):
        s = self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(s)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (ConvNeXt's), by permutes around F.layer_norm."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class OpsNet(nn.Module):
    """Every op kind of the relevance graph, in functional, method, module and in-place forms."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.se = Gate(8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.norm = LayerNorm2d(8)
        self.mlp1 = nn.Linear(8, 16)
        self.mlp2 = nn.Linear(16, 8)
        self.act = nn.Hardswish(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.head_conv = nn.Conv2d(16, 12, 1)
        self.relu = nn.ReLU(inplace=True)
        self.se2 = Gate(12, hard=True)
        self.pre_bn = nn.BatchNorm2d(12)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(x)))
        y = self.se(F.hardswish(self.bn_dw(self.dw(x))))
        x = x + y.mul(self.scale.view(1, -1, 1, 1))
        f1 = x
        z = self.grouped(x).relu_()
        n, c, h, w = z.shape
        z = z.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        a, b = z.chunk(2, dim=1)
        z = self.norm(torch.cat([b, F.gelu(a)], 1))
        t = self.mlp2(self.act(self.mlp1(z.permute(0, 2, 3, 1))))
        x = x + F.gelu(t, approximate="tanh").permute(0, 3, 1, 2) / 2
        x = torch.cat([self.pool(x), F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        x = self.se2(self.relu(self.head_conv(x)))
        gap = F.relu6(self.pre_bn(x)) + x[:, :, :, :] * 0.5
        pooled = F.adaptive_avg_pool2d(gap, 1).flatten(1)
        return self.fc(self.drop(pooled)), {"gap_feat": gap, "pooled_feat": pooled, "feats": [f1, gap]}


class ReluNet(nn.Module):
    """The piecewise-linear ops (conv variants, ReLU forms, pooling, sums, concatenation, slices, shuffles,
    channels-last linear layers, scales, a standalone BatchNorm): LRP-0 is gradient x input here."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.pre_bn = nn.BatchNorm2d(8)
        self.mlp = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 9, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        y = F.relu(self.dw(x), inplace=True)
        x = x + torch.relu(self.grouped(y)) * self.scale.view(1, -1, 1, 1)
        n, c, h, w = x.shape
        s = x.view(n, 4, c // 4, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        a, b = s[:, :3], s[:, 3:]
        s = torch.cat([b, a], 1)
        t = self.mlp(self.pre_bn(s).permute(0, 2, 3, 1)).relu().permute(0, 3, 1, 2) / 2
        x = torch.cat([F.max_pool2d(x + t, 2), F.avg_pool2d(s, 2)], 1)
        return self.fc(self.flatten(self.pool(x)))


class ConvNeXtHead(nn.Module):
    """A LayerNorm between the global pooling and the classifier (ConvNeXt's head)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 2, stride=2)
        self.block = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.norm = LayerNorm2d(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.stem(x)
        gap = x + F.gelu(self.block(x))
        pooled = self.norm(F.adaptive_avg_pool2d(gap, 1))
        return self.fc(pooled.flatten(1)), {"gap_feat": gap, "feats": [x, gap]}


class MobileNetV3Head(nn.Module):
    """A 1x1 conv and Hardswish after the global pooling (MobileNetV3's head): no CAM."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv_head = nn.Conv2d(8, 16, 1)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        gap = F.relu(self.stem(x))
        pooled = F.adaptive_avg_pool2d(gap, 1)
        return self.fc(self.act(self.conv_head(pooled)).flatten(1)), {"gap_feat": gap, "feats": [gap]}


def _model(cls, train: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(cls()).double().train(train)


def _image(size: int = 16) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, size, size, dtype=torch.float64)


def _logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    out = model(image)
    return out[0] if isinstance(out, tuple) else out


def _gradient_maps(model: nn.Module, image: torch.Tensor, pick) -> torch.Tensor:
    """Autograd's d logit_k / dA for the classes, A = pick(image, feats), stacked [B, K, ...], and A."""
    image = image.clone().requires_grad_()
    logits, feats = model(image) if pick is not None else (_logits(model, image), None)
    a = image if pick is None else pick(feats)
    grads = [torch.autograd.grad(logits.gather(1, CLASSES[:, k:k + 1]).sum(), a, retain_graph=True)[0]
             for k in range(CLASSES.shape[1])]
    return torch.stack(grads, 1), a.detach()


def _close(actual, expected, rtol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("train", [False, True])
def test_graph_recomputes_a_user_class_with_every_op(train):
    model = _model(OpsNet, train)
    model.drop.p = 0.0 if train else 0.3
    image = _image()
    graph = build_graph(model, image.shape)
    assert {node.op for node in graph.nodes} >= {"conv", "linear", "norm", "act", "add", "mul", "scale", "cat",
                                                 "index", "reshape", "permute", "avgpool", "maxpool", "gap"}
    with torch.no_grad():
        logits, feats = model(image)
        acts = forward(graph, image)
    _close(acts.values[graph.head.output], logits)
    _close(acts.values[graph.gap], feats["gap_feat"])
    for key, feat in zip(graph.stages, feats["feats"]):
        _close(acts.values[key], feat)


def test_gradients_are_autograds_and_cam_is_complete():
    """The walk's gradient is the model's true derivative through every op (SiLU, GELU, Hardswish, the gates, the
    LayerNorm, in-place ops): gradient x input and Grad-CAM at a stage equal autograd's (eval mode: in train mode
    BatchNorm's batch statistics are constants for gradients, docs/explain.md); CAM is complete."""
    model = _model(OpsNet)
    image = _image()
    grads, x = _gradient_maps(model, image, None)
    _close(explain(model, image, CLASSES, "gradient_input", "input"), (grads * x.unsqueeze(1)).sum(2))
    grads, a = _gradient_maps(model, image, lambda feats: feats["feats"][0])
    expected = torch.einsum("bkc,bchw->bkhw", grads.mean((3, 4)), a).clamp(min=0)
    _close(explain(model, image, CLASSES, "gradcam", 0), expected)
    with torch.no_grad():
        logits = model(image)[0]
    cam = explain(model, image, CLASSES, "cam")
    _close(cam.mean((2, 3)) + model.fc.bias[CLASSES], logits.gather(1, CLASSES))


def _per_op(log: list):
    return lambda node, r, ins: log.append((node, r, ins))


def test_every_fixed_rule_conserves_and_gates_get_no_relevance():
    model = _model(OpsNet)
    image = _image()
    graph = build_graph(model, image.shape)
    log = []
    with torch.no_grad():
        propagate(forward(graph, image), CLASSES, "input", Spec("lrp", get_composite("epsilon_plus_flat",
                  epsilon=TINY, stabilizer=TINY), True), _per_op(log))
    seen = set()
    for node, r, ins in log:
        if node.op in CONSERVING:
            seen.add(node.op)
            total = sum(i.flatten(2).sum(-1) for i in ins if i is not None)
            _close(total, r.flatten(2).sum(-1), rtol=1e-8)
        if node.op == "mul":
            assert ins[1] is None, f"the gate of {node.output} received relevance"
    assert seen == set(CONSERVING)


def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.zero_()
    return model


def test_lrp0_is_gradient_times_input_on_piecewise_linear_ops():
    model = _bias_free(_model(ReluNet)).eval()
    image = _image()
    grads, x = _gradient_maps(model, image, None)
    lrp0 = get_composite("epsilon", epsilon=1e-100, stabilizer=1e-100)
    _close(explain(model, image, CLASSES, "lrp", "input", rule=lrp0), (grads * x.unsqueeze(1)).sum(2), rtol=1e-8)


def test_layer_norm_rule_holds_its_statistics_fixed():
    """With the bn role's epsilon rule the LayerNorm is the affine map y = a·x + b of its sample's statistics
    (a = γ/σ, b = β − μ·γ/σ): R_in = R·(y − b)/y, computed here independently of the engine."""
    model = _model(ConvNeXtHead)
    image = _image()
    graph = build_graph(model, image.shape)
    log = []
    composite = get_composite("epsilon_plus_flat", epsilon=TINY, stabilizer=TINY, bn=get_rule("epsilon", epsilon=TINY))
    with torch.no_grad():
        acts = forward(graph, image)
        propagate(acts, CLASSES, "input", Spec("lrp", composite), _per_op(log))
    node, r, ins = next(entry for entry in log if entry[0].op == "norm")
    x, y = acts.values[node.inputs[0]], acts.values[node.output]
    var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
    shift = model.norm.bias - mean * model.norm.weight / torch.sqrt(var + model.norm.eps)
    _close(ins[0], r * ((y - shift) / y).unsqueeze(1))


def test_cam_through_a_normalised_head():
    """ConvNeXt's head (pooling, LayerNorm over channels, Linear): with σ of the pooled vector held fixed the logits
    are linear in the pooled map, CAM_k(h,w) = Σ_c W_kc·γ_c·(A_c(h,w) − mean_c A(h,w))/σ, and mean_hw CAM + Σ_c W_kc·β_c
    + b_k = logit_k. Grad-CAM at gap takes the true derivative (σ included), as autograd; explain_from_features
    gives the same maps."""
    model = _model(ConvNeXtHead)
    image = _image()
    with torch.no_grad():
        logits, feats = model(image)
    a = feats["gap_feat"]
    pooled = a.mean((2, 3))
    sigma = torch.sqrt(pooled.var(1, unbiased=False) + model.norm.eps)
    centred = (a - a.mean(1, keepdim=True)) * model.norm.weight.view(1, -1, 1, 1) / sigma.view(-1, 1, 1, 1)
    expected = torch.einsum("bkc,bchw->bkhw", model.fc.weight[CLASSES], centred)
    cam = explain(model, image, CLASSES, "cam")
    _close(cam, expected)
    bias = model.fc.weight @ model.norm.bias + model.fc.bias
    _close(cam.mean((2, 3)) + bias[CLASSES], logits.gather(1, CLASSES))
    grads, gap = _gradient_maps(model, image, lambda f: f["gap_feat"])
    gradcam = explain(model, image, CLASSES, "gradcam", "gap")
    _close(gradcam, torch.einsum("bkc,bchw->bkhw", grads.mean((3, 4)), gap).clamp(min=0))
    assert not torch.allclose(gradcam, cam.clamp(min=0) / 16)
    for method, maps in (("cam", cam), ("gradcam", gradcam)):
        _close(explain_from_features(model, feats, CLASSES, method), maps)


def test_a_head_that_is_not_linear_after_pooling_refuses_cam():
    model = _model(MobileNetV3Head)
    image = _image()
    reason = supports(model, "cam", "gap")
    assert reason == ("explain method='cam': MobileNetV3Head's head applies hardswish (act) after the global pooling, "
                      "so the logits are not linear in the pooled tensor; use method='gradcam'")
    with pytest.raises(ValueError, match="use method='gradcam'"):
        explain(model, image, CLASSES, "cam")
    logits, feats = model(image)
    with pytest.raises(ValueError, match="use method='gradcam'"):
        explain_from_features(model, feats, CLASSES, "cam")
    assert supports(model, "gradcam", "gap") is None and supports(model, "lrp", 0) is None
    grads, gap = _gradient_maps(model, image, lambda f: f["gap_feat"])
    expected = torch.einsum("bkc,bchw->bkhw", grads.mean((3, 4)), gap).clamp(min=0)
    _close(explain(model, image, CLASSES, "gradcam", "gap"), expected)
    _close(explain_from_features(model, feats, CLASSES, "gradcam"), expected)


@pytest.mark.parametrize("train", [False, True])
def test_recorded_forward_gives_the_same_maps(train):
    """In-place ReLU on a conv output (the tape keeps a copy), gates, norms: recorded maps = explain's."""
    model = _model(OpsNet, train)
    model.drop.p = 0.0
    image = _image()
    with record(model) as tape:
        model(image)
    assert "head_conv" in tape.graph.overwritten
    for method, layer in (("lrp", "input"), ("gradcam", 0), ("gradient_input", "input"), ("cam", "gap")):
        _close(explain_recorded(tape, CLASSES, method, layer, create_graph=train),
               explain(model, image, CLASSES, method, layer))


@pytest.mark.parametrize("method,layer,rule", [("lrp", "input", "epsilon_plus_flat"), ("gradcam", 0, None),
                                               ("cam", "gap", None)])
def test_map_gradients_through_new_ops_match_finite_differences(method, layer, rule):
    """d/dθ Σ maps·T through gates, layer scale, LayerNorm, smooth activations = central differences."""
    model = _model(ConvNeXtHead if method == "cam" else OpsNet, train=True)
    if method != "cam":
        model.drop.p = 0.0
    image = _image(8)
    kwargs = dict(method=method, layer=layer, **({} if rule is None else {"rule": rule}))
    target = torch.randn_like(explain(model, image, CLASSES, **kwargs))

    def loss() -> torch.Tensor:
        return (explain(model, image, CLASSES, create_graph=True, **kwargs) * target).sum()

    named = dict(model.named_parameters())
    picks = ["norm.weight", "fc.weight"] if method == "cam" else ["scale", "se.reduce.weight", "norm.weight",
                                                                   "mlp1.weight", "stem.weight", "bn.weight"]
    grads = torch.autograd.grad(loss(), [named[n] for n in picks])
    _check_central_differences(named, picks, grads, lambda: loss().item(), h=1e-7, rtol=1e-4, floor=1e-6)


def test_dropout_is_the_identity_unless_random():
    model = _model(OpsNet, train=True)
    with pytest.raises(ValueError, match="drop is a Dropout in training mode"):
        explain(model, _image(), CLASSES, "lrp", "input")
    model.drop.p = 0.0
    assert explain(model, _image(), CLASSES, "lrp", "input").shape == (2, 2, 16, 16)


class Swish(nn.Module):
    """x·sigmoid(x) written out: traced, a product of the signal and its own gate."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class SwishNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = Swish()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_register_leaf_declares_a_users_module_like_a_torch_one():
    image = _image()
    traced_model = _model(SwishNet)
    traced = explain(traced_model, image, CLASSES, "lrp", "input")
    assert [node.op for node in build_graph(traced_model, image.shape).nodes] == ["conv", "act", "mul", "gap",
                                                                                 "linear"]
    try:
        register_leaf(Swish, nn.SiLU)
        model = _model(SwishNet)
        assert [node.op for node in build_graph(model, image.shape).nodes] == ["conv", "act", "gap", "linear"]
        _close(explain(model, image, CLASSES, "lrp", "input"), traced)
        grads, x = _gradient_maps(model, image, None)
        _close(explain(model, image, CLASSES, "gradient_input", "input"), (grads * x.unsqueeze(1)).sum(2))
    finally:
        MODULE_RULES.pop(Swish)
    with pytest.raises(ValueError, match="register_leaf: Swish has no rule"):
        register_leaf(SwishNet, Swish)


class Sort(nn.Module):
    def forward(self, x):
        return torch.sort(x, 1).values


class SortNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), Sort())
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.blocks(x).mean((2, 3)))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(x.mean((2, 3)))


class PReLUNet(SwishNet):
    def __init__(self):
        super().__init__()
        self.act = nn.PReLU()


class BatchMixer(SwishNet):
    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)).reshape(1, -1))


@pytest.mark.parametrize("cls,message", [
    (SortNet, "explain: cannot build the relevance graph of SortNet: no rule for call_function torch.sort at node "
              "'sort' (module 'blocks.3')"),
    (Branching, "explain: cannot trace Branching with torch.fx (TraceError: symbolically traced variables cannot be "
                "used as inputs to control flow); see docs/explain.md, 'Tracing'"),
    (PReLUNet, "explain: cannot build the relevance graph of PReLUNet: no rule for call_module "
               "torch.nn.modules.activation.PReLU at node 'act' (module 'act')"),
    (BatchMixer, "explain: cannot build the relevance graph of BatchMixer: it mixes the samples of the batch at node "
                 "'reshape' (module '')"),
])
def test_an_op_without_a_rule_is_refused_in_one_line(cls, message):
    model = cls().double()
    with pytest.raises(ValueError) as error:
        explain(model, _image(), CLASSES, "lrp", "input")
    assert str(error.value) == message
    assert supports(model, "lrp", "input") == message


def test_graphs_are_cached_per_shape_and_mode_and_follow_module_changes():
    model = _model(SwishNet)
    graph = build_graph(model, (2, 3, 16, 16))
    assert build_graph(model, (5, 3, 16, 16)) is graph
    assert build_graph(model, (2, 3, 8, 8)) is not graph
    assert build_graph(model.train(), (2, 3, 16, 16)) is not graph
    assert build_graph(model.eval(), (2, 3, 16, 16)) is graph
    model.act = nn.ReLU()
    assert [node.op for node in build_graph(model, (2, 3, 16, 16)).nodes] == ["conv", "act", "gap", "linear"]
    model.conv = nn.Conv2d(3, 6, 1)
    assert build_graph(model, (2, 3, 16, 16)).nodes[0].attrs["padding"] == (0, 0)
    alive = weakref.ref(model)
    del model, graph
    gc.collect()
    assert alive() is None, "the graph cache keeps its model alive"
