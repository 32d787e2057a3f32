"""Public entry points: explanation maps [B, K, H, W] for K classes per sample.

- `explain(model, image, classes, ...)`: runs the model's relevance graph itself (pure: no module state changes).
- `record(model)` + `explain_recorded(tape, classes, ...)`: maps from a forward the caller runs anyway (a training
  step), so the student is not run twice.
- `explain_from_features(model, feats, classes, ...)`: CAM / Grad-CAM at the GAP input from the `feats` dict of a
  normal forward (no recording needed).
"""
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .batchnorm import BATCHNORMS, is_batchnorm, uses_batch_stats
from .engine import Activations, Spec, bind, forward, propagate, tape_needs
from .graph import Graph
from .ops import op_of
from .rules import RuleLike, get_composite
from .trace import GraphError, build_graph, cached_graph

METHODS = ("cam", "gradcam", "lrp", "gradient_input")
Tensor = torch.Tensor


def _check_classes(classes: Tensor, batch: int, num_classes: int) -> Tensor:
    if classes.dtype != torch.long or classes.dim() != 2 or classes.shape[0] != batch:
        raise ValueError(f"explain classes: expected a LongTensor of shape ({batch}, K), got {classes.dtype} "
                         f"{tuple(classes.shape)}")
    # The range check reads values back to the host: done on CPU only, so a training step on an accelerator keeps no
    # host synchronisation (there an out-of-range index fails in the weight gather instead).
    if classes.device.type == "cpu" and classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"explain classes: values must lie in [0, {num_classes}), got [{int(classes.min())}, "
                         f"{int(classes.max())}]")
    return classes


def class_activation_map(gap_feat: Tensor, weight: Tensor, classes: Tensor) -> Tensor:
    """Raw CAM Σ_c W[classes[b,k], c]·A[b,c,h,w] (no ReLU, bias or scaling): mean_hw(CAM) + bias = logit."""
    return _cam(gap_feat, weight.flatten(1)[classes])


def _cam(gap_feat: Tensor, weights: Tensor) -> Tensor:
    """Σ_c weights[b,k,c]·A[b,c,h,w] for the per-sample class weights [B, K, C]."""
    return torch.einsum("bkc,bchw->bkhw", weights, gap_feat)


def _gap_maps(acts: Activations, classes: Tensor, method: str) -> Tensor:
    """CAM, or Grad-CAM at gap where the classifier reads the pooled tensor directly (ReLU(CAM)/(H·W)). The class
    weights are the classifier's rows, or through a normaliser after the pooling, the gradient of the logits with
    respect to the pooled tensor with the normaliser's statistics held fixed (docs/explain.md, "CAM")."""
    graph = acts.graph
    gap_feat = acts.values[graph.gap]
    if graph.plain_head:
        weights = acts.params(graph.head)[0][classes]
    else:
        weights = propagate(acts, classes, graph.pooled, Spec("linear")).flatten(2)
    cam = _cam(gap_feat, weights)
    return cam if method == "cam" else cam.clamp(min=0) / (gap_feat.shape[2] * gap_feat.shape[3])


def _maps(acts: Activations, classes: Tensor, method: str, layer: Union[str, int], rule: RuleLike,
          zero_bias: bool, recompute: bool, detach_normalizers: bool) -> Tensor:
    graph = acts.graph
    if method not in METHODS:
        raise ValueError(f"explain method={method!r}: expected one of {METHODS}")
    if detach_normalizers and method != "lrp":
        raise ValueError(f"explain detach_normalizers=True: only LRP has normalisers, got method={method!r}")
    logits = acts.values[graph.head.output]
    classes = _check_classes(classes.to(logits.device), logits.shape[0], logits.shape[1])
    target = graph.resolve(layer)
    if method == "cam":
        _check_cam(graph, target, layer)
    if method == "cam" or (method == "gradcam" and target == graph.gap and graph.plain_head):
        return _gap_maps(acts, classes, method)
    spec = Spec("lrp", get_composite(rule), zero_bias, detach_normalizers) if method == "lrp" else Spec("grad")
    r = propagate(acts, classes, target, spec, recompute=recompute)
    if r.dim() != 5:
        raise ValueError(f"explain layer={layer!r}: tensor {target!r} has shape {tuple(r.shape[2:])}, expected a "
                         f"spatial (C, H, W) map")
    if method == "lrp":
        return r.sum(2)
    activation = acts.values[target]
    if method == "gradient_input":
        return (r * activation.unsqueeze(1)).sum(2)
    return torch.einsum("bkc,bchw->bkhw", r.mean((3, 4)), activation).clamp(min=0)


def _check_cam(graph: Graph, target: str, layer: Union[str, int]) -> None:
    if target != graph.gap:
        raise ValueError(f"explain method='cam' is defined at layer='gap' only, got layer={layer!r}")
    if graph.cam_error is not None:
        raise ValueError(graph.cam_error)


def supports(model: nn.Module, method: str = "cam", layer: Union[str, int] = "gap",
             image_shape: Optional[Sequence[int]] = None) -> Optional[str]:
    """None if `explain(model, image, classes, method, layer)` can explain `model`, else the one-line reason (the
    model does not trace, an op has no rule, the layer does not exist, CAM on a head that is not linear after the
    pooling). Cheap: one cached trace. Without `image_shape` (B, C, H, W) the model is traced at a probe size with
    the channels of its first convolution (the structure of the head does not depend on it)."""
    if method not in METHODS:
        return f"explain method={method!r}: expected one of {METHODS}"
    try:
        graph = build_graph(model, image_shape) if image_shape is not None else _probe_graph(model)
        target = graph.resolve(layer)
        if method == "cam":
            _check_cam(graph, target, layer)
    except ValueError as e:
        return str(e)
    return None


PROBE_SIZES = (64, 32, 224)  # input sides tried, when no input shape is known, until one has a pooling head


def _probe_graph(model: nn.Module, gap_shape: Optional[Sequence[int]] = None) -> Graph:
    """A graph of `model` to read its head from, when the input shape is unknown: a cached one (any input size)
    whose pooled tensor has the per-sample `gap_shape`, else one traced at a probe size (rescaled so that its
    pooled tensor has `gap_shape` where the first probe's does not)."""
    def fits(graph: Graph) -> bool:
        return graph.gap is not None and (gap_shape is None or graph.shapes[graph.gap] == tuple(gap_shape))

    graph = cached_graph(model, fits)
    if graph is not None:
        return graph
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise GraphError(f"explain: {type(model).__name__} has no Conv2d to take the input's channels from; pass "
                         f"the input shape")
    graphs, error = [], None
    sizes = list(PROBE_SIZES)
    while sizes:
        size = sizes.pop(0)
        try:
            graph = build_graph(model, (1, conv.in_channels, *_pair(size)))
        except ValueError as e:
            error = error or e
            continue
        if fits(graph):
            return graph
        graphs.append(graph)
        if graph.gap is not None and gap_shape is not None and len(graphs) == 1:
            # the same network at the input size whose pooled map has gap_shape's (constant total stride)
            h, w = graph.shapes[graph.gap][1:]
            sizes.insert(0, (gap_shape[-2] * _pair(size)[0] // h, gap_shape[-1] * _pair(size)[1] // w))
    if not graphs:
        raise error
    return next((g for g in graphs if g.gap is not None), graphs[0])


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return size if isinstance(size, tuple) else (size, size)


def explain(model: nn.Module, image: Tensor, classes: Tensor, method: str = "cam", layer: Union[str, int] = "gap",
            rule: RuleLike = "epsilon_plus_flat", zero_bias: bool = False, create_graph: bool = False,
            recompute: bool = True, detach_normalizers: bool = False) -> Tensor:
    """Explanation maps [B, K, H, W] of `classes` (LongTensor [B, K]) for `image`.

    method: "cam" (raw CAM on gap_feat), "gradcam", "lrp" (relevance seeded with the logit, summed over channels),
    "gradient_input". layer: "gap", "input", a stage index of feats["feats"], or a tensor key of the model's
    relevance graph (a module name). rule: a composite or rule name, a `Rule` or a `Composite`. zero_bias: biases get
    no relevance, so it is conserved. create_graph: the maps are differentiable with respect to the parameters (and
    the image); otherwise no graph is kept. The model is run through its relevance graph, which never changes
    parameters, buffers or gradients (in train mode BatchNorm uses batch statistics without updating running ones).
    recompute: with create_graph, keep only each layer's relevance for the backward and recompute the rules'
    intermediates there (activation checkpointing: less memory, about one more relevance pass of time).
    detach_normalizers: with create_graph and LRP, the rules' normalisers are constants for autograd (same maps,
    a cheaper and approximate derivative).
    """
    graph = build_graph(model, image.shape)
    dtype = _parameter_dtype(model)
    with torch.set_grad_enabled(create_graph), _full_precision(image):
        acts = forward(graph, (image if create_graph else image.detach()).to(dtype))
        return _maps(acts, classes, method, layer, rule, zero_bias, recompute, detach_normalizers)


def _parameter_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _full_precision(like: Tensor):
    """Autocast off: under AMP the relevance is computed in the parameters' precision (float32), so rule
    normalisers near zero neither overflow nor lose the small contributions."""
    return torch.autocast(like.device.type, enabled=False)


class Tape:
    """The inputs and outputs of every Conv2d / Linear of one forward, and whether each BatchNorm used batch
    statistics: the model's own activations, which the relevance graph then reuses instead of recomputing them (a
    training step keeps them for its backward anyway). BatchNorm outputs are not kept (they are recomputed from the
    conv outputs); with `layer`, neither is anything that maps down to that layer do not read. The relevance graph is
    built (or found in the cache) when the forward starts; a layer output that the forward then overwrites in place
    (a ReLU(inplace=True) right after a conv) is kept as a copy."""

    def __init__(self, model: nn.Module, layer: Union[str, int, None] = None):
        self.model = model
        self.layer = layer
        self.image: Optional[Tensor] = None
        self.graph: Optional[Graph] = None
        self.keep: Optional[Tuple[Set[str], Set[str]]] = None  # (outputs, inputs) kept when `layer` is given
        self.captured: Dict[str, Tuple[Optional[Tensor], bool]] = {}
        self.inputs: Dict[str, Tensor] = {}
        self._versions: Dict[Tuple[str, str], int] = {}
        self._calls: Dict[str, int] = {}

    def start(self, image: Tensor) -> None:
        if self.image is not None:
            raise ValueError(f"record: {type(self.model).__name__} ran more than once inside one record()")
        self.image = image
        self.graph = build_graph(self.model, image.shape)
        if self.layer is not None:
            self.keep = tape_needs(self.graph, self.graph.resolve(self.layer))

    def _store(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor):  # a module traced through while the graph is built: not a forward
            return
        self._calls[name] = self._calls.get(name, 0) + 1
        if is_batchnorm(module):
            # A BN output is recomputed from its input when needed: keeping it would hold one more activation per
            # layer than the model's backward does. Only an identity BN (a folded teacher's) hands its input on.
            uses_batch = uses_batch_stats(module)
            identity = args and output is args[0] and (self.keep is None or name in self.keep[0])
            self.captured[name] = (output if identity else None, uses_batch)
            return
        keep_output = self.keep is None or name in self.keep[0]
        if keep_output and name in self.graph.overwritten:
            output = output.clone()  # the model overwrites it in place next (a ReLU(inplace=True) on a conv output)
        self.captured[name] = (output if keep_output else None, False)
        if keep_output:
            self._versions[(name, "output")] = output._version
        if args and isinstance(args[0], Tensor) and (self.keep is None or name in self.keep[1]):
            self.inputs[name] = args[0]
            self._versions[(name, "input")] = args[0]._version

    def check(self) -> None:
        if self.image is None:
            raise ValueError(f"explain_recorded: no forward of {type(self.model).__name__} ran inside record()")
        for name, calls in self._calls.items():
            if calls > 1:
                raise ValueError(f"explain_recorded: module {name} ran {calls} times in the recorded forward; "
                                 f"record exactly one forward")
        for (name, kind), version in self._versions.items():
            tensor = self.captured[name][0] if kind == "output" else self.inputs[name]
            if tensor._version != version:
                raise ValueError(f"explain_recorded: the {kind} of {name} was modified in place after it was "
                                 f"recorded (by an op the trace shows as out of place, such as `out += x`); use "
                                 f"explain() for this model")


@contextmanager
def record(model: nn.Module, layer: Union[str, int, None] = None) -> Iterator[Tape]:
    """`with record(model) as tape: logits, feats = model(x)` keeps the layer outputs that `explain_recorded` needs
    (references, except copies of outputs the forward overwrites in place; nothing is changed).

    `layer`: keep only what maps down to that layer read (`explain_recorded` then refuses a deeper layer). For a
    teacher run under no_grad, whose activations would otherwise be freed as the forward goes, this is the
    difference between holding a few tensors and holding all of them (explaining at "gap": the last block's)."""
    tape = Tape(model, layer)
    handles: List = [model.register_forward_pre_hook(lambda module, args: tape.start(args[0]))]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear) + BATCHNORMS):
            handles.append(module.register_forward_hook(
                lambda m, args, output, name=name: tape._store(name, m, args, output)))
    try:
        yield tape
    finally:
        for handle in handles:
            handle.remove()


def explain_recorded(tape: Tape, classes: Tensor, method: str = "cam", layer: Union[str, int] = "gap",
                     rule: RuleLike = "epsilon_plus_flat", zero_bias: bool = False,
                     create_graph: bool = False, recompute: bool = True, detach_normalizers: bool = False) -> Tensor:
    """`explain` from the forward recorded in `tape`: no layer is run again. With create_graph the maps are
    differentiable through the recorded activations (the student path of a training step). Activations recorded
    under autocast are promoted to the parameters' precision."""
    tape.check()
    graph = tape.graph
    if tape.keep is not None and graph.resolve(layer) != graph.resolve(tape.layer):
        outputs, inputs = tape_needs(graph, graph.resolve(layer))
        if not (outputs <= tape.keep[0] and inputs <= tape.keep[1]):
            raise ValueError(f"explain_recorded: layer={layer!r} reads tensors that a tape recorded with "
                             f"layer={tape.layer!r} did not keep; record with that layer or a deeper one")
    dtype = _parameter_dtype(tape.model)

    def prepare(t: Tensor) -> Tensor:
        return (t if create_graph else t.detach()).to(dtype)

    with torch.set_grad_enabled(create_graph), _full_precision(tape.image):
        captured = {name: (None if t is None else prepare(t), stats) for name, (t, stats) in tape.captured.items()}
        inputs = {name: prepare(t) for name, t in tape.inputs.items()}
        acts = bind(graph, prepare(tape.image), captured, inputs)
        return _maps(acts, classes, method, layer, rule, zero_bias, recompute, detach_normalizers)


def explain_from_features(model: nn.Module, feats: Dict[str, object], classes: Tensor, method: str = "cam",
                          create_graph: bool = False) -> Tensor:
    """CAM ("cam") or Grad-CAM at the GAP input ("gradcam" = ReLU(CAM)/(H·W)) from a forward's `feats`, using
    feats["gap_feat"] and model.get_classifier()."""
    if method not in ("cam", "gradcam"):
        raise ValueError(f"explain_from_features method={method!r}: expected 'cam' or 'gradcam' (use record() and "
                         f"explain_recorded for other methods)")
    gap_feat = feats["gap_feat"]
    graph = _probe_graph(model, gap_feat.shape[1:])
    graph.resolve("gap")  # refuses a model without a global-average-pooling head
    if method == "cam":
        _check_cam(graph, graph.gap, "gap")
    classes = _check_classes(classes.to(gap_feat.device), gap_feat.shape[0], graph.shapes[graph.head.output][0])
    with torch.set_grad_enabled(create_graph):
        if graph.plain_head:
            return _gap_maps(Activations(graph, {graph.gap: gap_feat}), classes, method)
        with _full_precision(gap_feat):
            acts = _head_forward(graph, gap_feat.to(_parameter_dtype(model)))
            return _maps(acts, classes, method, "gap", "epsilon_plus_flat", False, False, False)


def _head_forward(graph: Graph, gap_feat: Tensor) -> Activations:
    """The activations from `gap_feat` to the logits: the ops of the head alone."""
    acts = Activations(graph, {graph.gap: gap_feat})
    start = next(i for i, node in enumerate(graph.nodes) if node.output == graph.pooled)
    for node in graph.nodes[start:]:
        acts.values[node.output] = op_of(node).forward(acts, node, [acts.values[key] for key in node.inputs])
    return acts
