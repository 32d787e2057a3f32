"""mdistiller.explain API contract: input validation, the reuse entry points, recording safety, differentiability
of the student path (docs/explain.md) and the conservation check's negative control."""
import pytest
import torch
import torch.nn as nn
import torchvision

from mdistiller.explain import (
    build_graph,
    engine,
    explain,
    explain_from_features,
    explain_recorded,
    get_composite,
    get_rule,
    record,
)
from mdistiller.explain.engine import Spec, forward, propagate
from mdistiller.explain.graph import INPUT
from mdistiller.models import cifar_model_dict


def _resnet8(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return cifar_model_dict["resnet8"][0](num_classes=5, **kwargs).double()


def _image(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


CLASSES = torch.tensor([[0, 3], [4, 1]])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"classes": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)}, "LongTensor of shape"),
        ({"classes": torch.tensor([0, 1])}, "LongTensor of shape"),
        ({"classes": torch.tensor([[0], [5]])}, r"values must lie in \[0, 5\)"),
        ({"method": "saliency"}, "method='saliency'"),
        ({"method": "cam", "layer": 1}, "defined at layer='gap' only"),
        ({"method": "lrp", "layer": "layer9"}, "'layer9': not a tensor"),
        ({"method": "lrp", "layer": 7}, "has 4 stages"),
        ({"method": "lrp", "rule": "zminus"}, "LRP rule 'zminus'"),
        ({"method": "lrp", "layer": "pooled_feat"}, "expected a spatial"),
        ({"method": "gradcam", "layer": 1, "detach_normalizers": True}, "only LRP has normalisers"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs, message):
    args = {"classes": CLASSES, **kwargs}
    with pytest.raises(ValueError, match=message):
        explain(_resnet8().eval(), _image(), **args)


def test_unsupported_model_and_missing_gap_head():
    with pytest.raises(ValueError, match="Sequential: the logits must come from a Linear"):
        explain(nn.Sequential(nn.Conv2d(3, 4, 3)).double(), _image(), CLASSES)
    vgg = torchvision.models.vgg11(num_classes=5).eval()
    with pytest.raises(ValueError, match="no global-average-pooling head"):
        explain(vgg, _image(size=32).float(), CLASSES, "gradcam", layer="gap")
    with pytest.raises(ValueError, match="Dropout in training mode"):
        explain(vgg.train(), _image(size=32).float(), CLASSES, "lrp", layer="input")


def test_explain_from_features_equals_explain():
    model = _resnet8().eval()
    image = _image()
    logits, feats = model(image)
    for method in ("cam", "gradcam"):
        torch.testing.assert_close(explain_from_features(model, feats, CLASSES, method),
                                   explain(model, image, CLASSES, method), rtol=1e-12, atol=1e-12)
    assert not explain_from_features(model, feats, CLASSES, "cam").requires_grad
    assert explain_from_features(model, feats, CLASSES, "cam", create_graph=True).requires_grad
    with pytest.raises(ValueError, match="explain_from_features method='lrp'"):
        explain_from_features(model, feats, CLASSES, "lrp")


def test_teacher_path_keeps_no_graph_even_under_enable_grad():
    model = _resnet8().eval()
    with torch.enable_grad():
        for method, layer in (("cam", "gap"), ("gradcam", 1), ("lrp", "input"), ("gradient_input", 2)):
            maps = explain(model, _image().requires_grad_(), CLASSES, method, layer)
            assert maps.grad_fn is None and not maps.requires_grad, method
            with record(model) as tape:
                model(_image())
            assert not explain_recorded(tape, CLASSES, method, layer).requires_grad


@pytest.mark.parametrize("train", [False, True])
def test_record_works_when_only_bn_outputs_are_changed_in_place(train):
    """torchvision's ResNet adds the shortcut into bn2's output and applies ReLU(inplace=True) to BN outputs: the tape
    keeps no BN output (they are recomputed from the conv outputs), so its maps equal those of explain()."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=5).double().train(train)
    image = _image(size=32)
    with record(resnet) as tape:
        resnet(image)
    for layer in ("input", "layer2.0", "gap"):
        recorded = explain_recorded(tape, CLASSES, "lrp", layer)
        torch.testing.assert_close(recorded, explain(resnet, image, CLASSES, "lrp", layer), rtol=1e-9, atol=1e-12)


class InPlaceSum(nn.Module):
    """`out += x` on a conv output: eager mutates the recorded output, which torch.fx shows as an ordinary sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        out = self.conv(x)
        out += x
        return self.fc(out.mean((2, 3)))


def test_record_handles_in_place_relu_and_refuses_unseen_in_place_repeated_and_missing_forwards():
    """torchvision's VGG applies ReLU(inplace=True) to conv outputs: the trace shows it, so the tape keeps a copy of
    those outputs and recorded maps equal explain(); an in-place update the trace cannot see is refused."""
    torch.manual_seed(0)
    vgg = torchvision.models.vgg11(num_classes=5)
    vgg.classifier = nn.Sequential(nn.Linear(512 * 49, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 5))
    vgg = vgg.double().eval()
    image = _image(size=32)
    with record(vgg) as tape:
        vgg(image)
    torch.testing.assert_close(explain_recorded(tape, CLASSES, "lrp", "input"),
                               explain(vgg, image, CLASSES, "lrp", "input"), rtol=1e-9, atol=1e-12)
    model = InPlaceSum().double()
    with record(model) as tape:
        model(_image())
    with pytest.raises(ValueError, match="output of conv was modified in place after it was recorded"):
        explain_recorded(tape, CLASSES, "lrp", "input")
    model = _resnet8().eval()
    with pytest.raises(ValueError, match="ran more than once"):
        with record(model):
            model(_image())
            model(_image())
    with record(model) as tape:
        pass
    with pytest.raises(ValueError, match="no forward of ResNet ran inside record"):
        explain_recorded(tape, CLASSES)


@pytest.mark.parametrize("method,layer", [("cam", "gap"), ("gradcam", "gap"), ("gradcam", 1), ("lrp", "gap"),
                                          ("lrp", 2), ("lrp", "input"), ("gradient_input", 1)])
def test_student_maps_reach_the_parameters(method, layer):
    """Item 11: a loss on the student's maps has a non-zero gradient for every parameter the map depends on (here
    all layers from `layer` up to the head), and the loss of identical maps is 0."""
    student = _resnet8().train()
    teacher = _resnet8().eval()
    image = _image()
    with record(student) as tape:
        student(image)
    maps = explain_recorded(tape, CLASSES, method, layer, create_graph=True)
    target = explain(teacher, image, CLASSES, method, layer)
    loss = (maps - target).pow(2).mean() + (1 - nn.functional.cosine_similarity(maps.flatten(2), target.flatten(2),
                                                                                 dim=-1)).mean()
    feeding = {"gap": ["layer3.0.conv2.weight", "fc.weight"], 1: ["layer2.0.conv1.weight", "layer3.0.bn2.weight"],
               2: ["layer3.0.conv1.weight", "fc.weight"], "input": ["conv1.weight", "layer1.0.bn1.bias", "fc.weight"]}
    params = dict(student.named_parameters())
    grads = torch.autograd.grad(loss, [params[name] for name in feeding[layer]], allow_unused=True)
    for name, grad in zip(feeding[layer], grads):
        assert grad is not None and grad.abs().sum() > 0, f"{method} at {layer}: no gradient for {name}"
    same = explain_recorded(tape, CLASSES, method, layer, create_graph=True)
    assert (same - maps).pow(2).mean().item() == 0.0


def _positive_bias_free(model: nn.Module) -> nn.Module:
    """Non-negative, normalised weights and no biases or BN shifts: every z+ normaliser is positive where
    relevance arrives, so z+ conserves exactly (see test_explain_zoo)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(m.weight.abs() / m.weight.abs().flatten(1).sum(1).view(-1, *[1] * (m.weight.dim() - 1)))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
    return model.eval()


def test_conservation_check_detects_a_doubled_residual_add(monkeypatch):
    """Negative control: an add that hands its whole relevance to both inputs (what hook-based LRP does at an
    unhandled `out += residual`) doubles relevance per block, and the per-node check sees the 2.0."""
    model = _positive_bias_free(_resnet8())
    image = _image()
    composite = get_composite("epsilon_plus_flat", epsilon=1e-12, stabilizer=1e-12)
    acts = forward(build_graph(model, image.shape), image)
    logit = acts.values["fc"].gather(1, CLASSES)

    def totals(log):
        return lambda node, r, ins: log.append(
            (node.op, sum(i.flatten(2).sum(-1) for i in ins) / r.flatten(2).sum(-1)))

    honest, doubled = [], []
    with torch.no_grad():
        ratio = propagate(acts, CLASSES, INPUT, Spec("lrp", composite, True), totals(honest)).sum((2, 3, 4)) / logit
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-9, atol=0)

    backward = engine._backward
    monkeypatch.setattr(engine, "_backward", lambda acts, node, r, spec: [r, r] if node.op == "add"
                        else backward(acts, node, r, spec))
    with torch.no_grad():
        ratio = propagate(acts, CLASSES, INPUT, Spec("lrp", composite, True), totals(doubled)).sum((2, 3, 4)) / logit
    assert ratio.min() > 1.5
    add_ratios = torch.stack([r for op, r in doubled if op == "add"])
    torch.testing.assert_close(add_ratios, torch.full_like(add_ratios, 2.0), rtol=1e-9, atol=0)


class SignedNet(nn.Module):
    """A conv whose output is not rectified feeds a 1x1 conv, so that layer sees signed inputs (like MobileNetV2's
    linear bottleneck)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        gap = torch.relu(self.conv2(self.bn1(self.conv1(x))))
        return self.fc(gap.mean((2, 3))), {"gap_feat": gap}


@pytest.mark.parametrize("rule", ["zplus", "alpha2beta1", "gamma"])
def test_sign_aware_rules_conserve_on_signed_inputs(rule):
    """z+, αβ and γ keep both signs' contributions (x⁺W⁺ + x⁻W⁻), so a layer with signed inputs passes on exactly
    the relevance it received (TE's Conv2d returns 2x here); a user's own class is traced like the zoo."""
    torch.manual_seed(0)
    model = SignedNet().double().eval()
    image = _image()
    composite = get_composite(get_rule(rule), epsilon=1e-12, stabilizer=1e-12)
    acts = forward(build_graph(model, image.shape), image)
    assert acts.values["bn1"].min() < 0 < acts.values["bn1"].max()
    seen = {}
    with torch.no_grad():
        propagate(acts, CLASSES, INPUT, Spec("lrp", composite, True),
                  lambda node, r, ins: seen.setdefault(node.output, (r.flatten(2).sum(-1),
                                                                     ins[0].flatten(2).sum(-1))))
    out_total, in_total = seen["conv2"]
    torch.testing.assert_close(in_total, out_total, rtol=1e-9, atol=0)
    gap_feat = model(image)[1]["gap_feat"]
    cam = torch.einsum("bkc,bchw->bkhw", model.fc.weight[CLASSES], gap_feat)
    torch.testing.assert_close(explain(model, image, CLASSES, "cam"), cam, rtol=1e-12, atol=1e-12)


def test_a_teacher_with_folded_batchnorm_gives_the_same_maps():
    """Distillers fold a frozen teacher's BatchNorm into its convs (mdistiller.models.fold); the graph still reads
    the original parameters and statistics, and a recorded forward of the folded teacher binds as well."""
    from mdistiller.models.fold import fold_batchnorm

    for name in ("resnet8", "ShuffleV1"):
        torch.manual_seed(0)
        teacher = cifar_model_dict[name][0](num_classes=5).double().eval()
        with torch.no_grad():
            for m in teacher.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
        image = _image()
        expected = {method: explain(teacher, image, CLASSES, method, layer)
                    for method, layer in (("lrp", "input"), ("gradcam", 1))}
        assert fold_batchnorm(teacher, image) > 0
        for (method, layer), maps in zip((("lrp", "input"), ("gradcam", 1)), expected.values()):
            torch.testing.assert_close(explain(teacher, image, CLASSES, method, layer), maps)
            with torch.no_grad(), record(teacher) as tape:
                teacher(image)
            torch.testing.assert_close(explain_recorded(tape, CLASSES, method, layer), maps)


def test_maps_under_autocast_are_computed_in_full_precision():
    """Under autocast (AMP training) the relevance pass runs in the parameters' float32: `explain` gives the float32
    maps exactly, and a recorded bfloat16 forward is promoted and explained in float32."""
    model = _resnet8().float().train()
    image = _image().float()
    expected = explain(model, image, CLASSES, "lrp", layer="input")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with record(model) as tape:
            logits, _ = model(image)
        assert logits.dtype == torch.bfloat16
        maps = explain_recorded(tape, CLASSES, "lrp", layer="input", create_graph=True)
        direct = explain(model, image, CLASSES, "lrp", layer="input")
    assert maps.dtype == direct.dtype == torch.float32
    torch.testing.assert_close(direct, expected)
    # only the recorded activations are bfloat16 (about 3 significant digits)
    cosine = nn.functional.cosine_similarity(maps.detach().flatten(2), expected.flatten(2), dim=-1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize("name", ["resnet8", "ShuffleV2", "vgg8", "MobileNetV2", "wrn_16_1"])
def test_recomputed_walk_gives_the_same_maps_and_gradients(name):
    """`recompute` (activation checkpointing of the differentiable walk) changes memory and time, nothing else: the
    maps and the gradients of a loss on them match the walk that keeps every intermediate."""
    torch.manual_seed(0)
    model = cifar_model_dict[name][0](num_classes=5).double().train()
    image = _image(batch=3, size=32)
    classes = torch.tensor([[0, 3], [4, 1], [2, 2]])
    results = []
    for recompute in (True, False):
        with record(model) as tape:
            logits, _ = model(image)
        maps = explain_recorded(tape, classes, "lrp", "input", create_graph=True, recompute=recompute)
        loss = maps.pow(2).mean() + logits.sum()
        results.append((maps.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    (maps_a, grads_a), (maps_b, grads_b) = results
    torch.testing.assert_close(maps_a, maps_b, rtol=1e-10, atol=1e-12)
    for (param_name, _), grad_a, grad_b in zip(model.named_parameters(), grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-8, atol=1e-12, msg=param_name)


def test_recorded_maps_reuse_the_models_own_activations():
    """The recorded path keeps no second copy of an activation the model made: the tensor a conv read is the one the
    relevance graph uses (only sums and the like are recomputed)."""
    model = _resnet8().eval()
    with record(model) as tape:
        model(_image())
    graph = build_graph(model, _image().shape)
    acts = engine.bind(graph, tape.image, tape.captured, tape.inputs)
    conv_inputs = {id(t) for t in tape.inputs.values()}
    reused = [node.output for node in graph.nodes if node.op == "act" and id(acts.values[node.output]) in conv_inputs]
    relus_read_by_convs = [node.output for node in graph.nodes if node.op == "act" and any(
        other.op in ("conv", "linear") and other.inputs[0] == node.output for other in graph.nodes)]
    assert relus_read_by_convs and reused == relus_read_by_convs


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "MobileNetV2"])
@pytest.mark.parametrize("train", [False, True])
def test_a_tape_recorded_for_a_layer_keeps_less_and_gives_the_same_maps(name, train):
    """record(model, layer): bitwise the maps of a full tape at that layer and every layer above it, from fewer kept
    tensors; a deeper layer is refused with a one-line error naming both layers."""
    torch.manual_seed(0)
    model = cifar_model_dict[name][0](num_classes=5).double().train(train)
    image = _image(size=32)
    with record(model) as full:
        model(image)
    with record(model, 1) as tape:
        model(image)

    def kept(t):
        return sum(out is not None for out, _ in t.captured.values()) + len(t.inputs)

    assert kept(tape) < kept(full)
    for layer in (1, 2, "gap"):
        torch.testing.assert_close(explain_recorded(tape, CLASSES, "lrp", layer, create_graph=train),
                                   explain_recorded(full, CLASSES, "lrp", layer, create_graph=train), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer='input' reads tensors that a tape recorded with layer=1 did not keep"):
        explain_recorded(tape, CLASSES, "lrp", "input")
    acts = engine.bind(tape.graph, tape.image, tape.captured, tape.inputs)  # bound by hand: nothing checks the layer
    convs = [node for node in tape.graph.nodes
             if node.op == "conv" and isinstance(model.get_submodule(node.modules[0]), nn.Conv2d)]
    dropped = next(node for node in convs if tape.captured[node.modules[0]][0] is None)
    with pytest.raises(ValueError, match=f"the output of {dropped.modules[0]} was not kept by the tape"):
        acts.values[dropped.output]


@pytest.mark.parametrize("train", [False, True])
def test_the_tape_keeps_no_batchnorm_output(train):
    """A BN output is not what the model's backward keeps (ReLU keeps its output, BN its input), so the tape does not
    hold it either: the walk recomputes it from the conv output, equal to the model's own."""
    model = _resnet8().train(train)
    image = _image()
    bn_outputs = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: bn_outputs.__setitem__(name, out))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    with record(model) as tape:
        model(image)
    for hook in hooks:
        hook.remove()
    assert bn_outputs and all(tape.captured[name][0] is None for name in bn_outputs)
    graph = build_graph(model, image.shape)
    acts = engine.bind(graph, tape.image, tape.captured, tape.inputs)
    for node in graph.nodes:
        if node.modules and node.modules[-1] in bn_outputs:
            torch.testing.assert_close(acts.values[node.output], bn_outputs[node.modules[-1]], rtol=0, atol=0)
