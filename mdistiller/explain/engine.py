"""One engine for every model and method: obtain the activations of a relevance graph, then send relevance (LRP)
or gradients back from the classifier to one tensor, for K classes per sample at once.

Activations come from re-running the graph functionally (`forward`, never touching module state) or from a forward
the model already ran (`bind`, from `record`). Relevance for K classes is one [B, K, ...] batch against the [B, ...]
activations (broadcast, not copied); rule normalisers depend only on the forward and are computed once per sample.
Everything is plain differentiable tensor algebra, so with grad enabled the result is differentiable with respect to
the parameters, normalisers included, and without it nothing is kept.

BatchNorm: a BN right after a conv/linear layer is folded into it from the live parameters, W' = W·γ/√(σ²+ε),
b' = (b−μ)·γ/√(σ²+ε) + β. In eval mode (μ, σ²) are the running statistics; in train mode (the student) they are the
current batch's statistics of the BN input, exactly what the forward normalised with, so z = W'x + b' is the BN
output; the statistics stay part of the graph (a student's map is differentiated through them), and no running
statistic is read or written. A BN with no layer right before it (WRN's pre-activation) is the per-channel affine map
with the same (μ, σ²) and gets the composite's "bn" rule (Pass by default, as zennit).
"""
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .graph import BATCHNORMS, INPUT, Graph, Node
from .rules import Composite, Rule, Term, stabilize

Tensor = torch.Tensor
ONES = "ones"
Observer = Callable[[Node, Tensor, Sequence[Optional[Tensor]]], None]


@dataclass
class Activations:
    """The tensors of one forward of `graph` by key; `pre_bn` and `batch_stats` describe each folded BatchNorm."""

    graph: Graph
    values: Dict[str, Tensor]
    pre_bn: Dict[str, Tensor] = field(default_factory=dict)
    batch_stats: Dict[str, bool] = field(default_factory=dict)
    _params: Dict[str, Tuple[Tensor, Optional[Tensor]]] = field(default_factory=dict)
    _bn: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict)

    def params(self, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        """(W', b') of a conv/linear node with its BatchNorm folded in, from the live parameters."""
        if node.output not in self._params:
            self._params[node.output] = _fold(self, node)
        return self._params[node.output]

    def bn_affine(self, node: Node) -> Tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) of the BatchNorm of a node, as it normalised the node's BN input."""
        if node.output not in self._bn:
            bn, batch_stats = self.graph.module(node.modules[-1]), self.batch_stats[node.output]
            if node.output in self.pre_bn:
                pre = self.pre_bn[node.output]
            elif len(node.modules) == 1:
                pre = self.values[node.inputs[0]]  # a BatchNorm alone normalises its input
            elif batch_stats:
                raise _not_kept(node)
            else:
                pre = None  # running statistics: the input is not needed
            self._bn[node.output] = _bn_affine(bn, pre, batch_stats)
        return self._bn[node.output]


def _not_kept(node: Node) -> ValueError:
    return ValueError(f"explain_recorded: the output of {node.modules[0]} was not kept by the tape; record the forward "
                      f"with a layer at or below the one explained (record(model, layer=...))")


class RecordedValues(dict):
    """The tensors of a recorded forward: those the model kept (conv / linear inputs and outputs), and every other
    one recomputed from them whenever it is read, and not kept (a BN output is its input normalised again, a sum is
    added again), so explaining a training step holds no activation beyond what the step's own backward keeps."""

    def __init__(self, acts: "Activations", recorded: Dict[str, Tensor]):
        super().__init__(recorded)
        self.acts = acts
        self.producers = {node.output: node for node in acts.graph.nodes}

    def __missing__(self, key: str) -> Tensor:
        node = self.producers[key]
        if node.op not in ("conv", "linear"):
            return _forward_functional(node, [self[x] for x in node.inputs])
        if len(node.modules) == 1 and isinstance(self.acts.graph.module(node.modules[0]), BATCHNORMS):
            pre = self[node.inputs[0]]
        elif key in self.acts.pre_bn:
            pre = self.acts.pre_bn[key]
        else:
            raise _not_kept(node)
        return _batch_norm(self.acts.graph.module(node.modules[-1]), pre, self.acts.batch_stats[key])


@dataclass(frozen=True)
class Spec:
    """What to propagate: "lrp" with `composite` (and `zero_bias`), or "grad" (plain gradients).

    `detach_normalizers`: every LRP normaliser (the stabilised denominators of the rules, sums and pooling) is a
    constant for autograd, which gives a cheaper, approximate derivative of the maps (the values are unchanged)."""

    mode: str
    composite: Optional[Composite] = None
    zero_bias: bool = False
    detach_normalizers: bool = False

    def rule(self, node: Node) -> Rule:
        return getattr(self.composite, node.role)

    def stable(self, z: Tensor, epsilon: float) -> Tensor:
        """The stabilised normaliser stab(z), a constant for autograd with `detach_normalizers`."""
        return stabilize(z.detach() if self.detach_normalizers else z, epsilon)


# ---------------------------------------------------------------------------------------------- forward and binding


def _weight(module: nn.Module, node: Node) -> Tensor:
    return module.weight.flatten(1) if node.op == "linear" else module.weight


def _affine(node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    if node.op == "linear":
        return F.linear(x, w, b)
    a = node.attrs
    return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])


def _affine_t(node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
    """Transpose of the layer's linear map applied to s [B, K, *out] -> [B, K, *in_shape]."""
    if node.op == "linear":
        return s @ w
    a = node.attrs
    flat = s.flatten(0, 1)
    extra = [
        size - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
        for size, o, st, p, d, k in zip(in_shape[-2:], flat.shape[-2:], a["stride"], a["padding"], a["dilation"],
                                        w.shape[-2:])
    ]
    out = F.conv_transpose2d(flat, w, None, a["stride"], a["padding"], extra, a["groups"], a["dilation"])
    return out.view(*s.shape[:2], *out.shape[1:])


def _bn_uses_batch_stats(bn: nn.Module) -> bool:
    return bn.training or bn.running_mean is None


class _BatchMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of a [N, C, ...] tensor, as BatchNorm computes them in train mode.

    Two passes (the mean, then the mean squared deviation: as exact as `var_mean`, several times faster on CPU),
    and only the input is kept for the backward, which the model's own BatchNorm keeps anyway."""

    @staticmethod
    def forward(ctx, pre: Tensor) -> Tuple[Tensor, Tensor]:
        dims = [0] + list(range(2, pre.dim()))
        mean = pre.mean(dims)
        deviation = pre - _channel_view(mean, pre)
        ctx.save_for_backward(pre, mean)
        return mean, (deviation * deviation).mean(dims)

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
        pre, mean = ctx.saved_tensors
        count = pre.numel() // pre.shape[1]
        deviation = pre - _channel_view(mean, pre)
        return _channel_view(grad_mean / count, pre) + deviation * _channel_view(grad_var * (2 / count), pre)


def _channel_view(per_channel: Tensor, like: Tensor) -> Tensor:
    return per_channel.view(1, -1, *[1] * (like.dim() - 2))


def _bn_affine(bn: nn.Module, pre: Optional[Tensor], batch_stats: bool) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of a BatchNorm as it normalised `pre`."""
    if batch_stats:
        mean, var = _BatchMoments.apply(pre)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    return scale, shift if bn.bias is None else shift + bn.bias


def _fold(acts: Activations, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
    modules = [acts.graph.module(name) for name in node.modules]
    if isinstance(modules[0], nn.BatchNorm2d):
        scale, shift = acts.bn_affine(node)
        return scale.view(-1, 1, 1, 1), shift
    w, b = _weight(modules[0], node), modules[0].bias
    if len(modules) == 1:
        return w, b
    scale, shift = acts.bn_affine(node)
    w = w * scale.view(-1, *[1] * (w.dim() - 1))
    return w, shift if b is None else shift + b * scale


def _forward_affine(acts: Activations, node: Node, x: Tensor) -> Tensor:
    modules = [acts.graph.module(name) for name in node.modules]
    if isinstance(modules[0], nn.BatchNorm2d):
        pre, bn = x, modules[0]
    else:
        pre = _affine(node, x, _weight(modules[0], node), modules[0].bias)
        if len(modules) == 1:
            return pre
        bn = modules[1]
    stats = _bn_uses_batch_stats(bn)
    acts.pre_bn[node.output], acts.batch_stats[node.output] = pre, stats
    return _batch_norm(bn, pre, stats)


def _batch_norm(bn: nn.Module, pre: Tensor, batch_stats: bool) -> Tensor:
    """The BN's output for input `pre`, as the model computed it; running statistics are never updated."""
    mean, var = (None, None) if batch_stats else (bn.running_mean, bn.running_var)
    return F.batch_norm(pre, mean, var, bn.weight, bn.bias, batch_stats, 0.0, bn.eps)


def _shuffle(x: Tensor, groups: int) -> Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _split_sizes(node: Node, channels: int) -> Tuple[int, int]:
    cut = int(channels * node.attrs["ratio"])
    return (0, cut) if node.attrs["part"] == 0 else (cut, channels)


def _forward_functional(node: Node, xs: List[Tensor]) -> Tensor:
    op, a = node.op, node.attrs
    if op == "act":
        return F.relu(xs[0]) if a["kind"] == "relu" else F.relu6(xs[0])
    if op == "add":
        return xs[0] + xs[1]
    if op == "cat":
        return torch.cat(xs, 1)
    if op == "slice":
        start, end = _split_sizes(node, xs[0].shape[1])
        return xs[0][:, start:end]
    if op == "shuffle":
        return _shuffle(xs[0], a["groups"])
    if op in ("avgpool", "maxpool"):
        return a["pool"](xs[0])
    if op == "gap":
        return xs[0].mean((2, 3))
    if op == "flatten":
        return xs[0].flatten(1)
    raise ValueError(f"relevance graph: unknown op {op!r} at {node.output}")


def forward(graph: Graph, image: Tensor) -> Activations:
    """Re-run the graph's forward from `image` with the live parameters; no module state is read-modified."""
    acts = Activations(graph, {INPUT: image})
    for node in graph.nodes:
        xs = [acts.values[key] for key in node.inputs]
        if node.op in ("conv", "linear"):
            acts.values[node.output] = _forward_affine(acts, node, xs[0])
        else:
            acts.values[node.output] = _forward_functional(node, xs)
    return acts


def bind(graph: Graph, image: Tensor, captured: Dict[str, Tuple[Optional[Tensor], bool]],
         inputs: Optional[Dict[str, Tensor]] = None) -> Activations:
    """Activations of a forward the model ran itself (`record`): no layer is run again. Conv / linear outputs and
    inputs are the recorded tensors, which the model's backward keeps anyway; BatchNorm outputs, sums and other
    elementwise results are recomputed from them when the walk reads them (`RecordedValues`). `captured` maps module
    names to (output, uses batch statistics); an output is None where the tape did not keep it (`record(layer=...)`,
    and every BatchNorm's unless it is its input: a folded teacher's identity BN)."""
    inputs = inputs or {}
    for node in graph.nodes:
        for name in node.modules:
            if name not in captured:
                raise ValueError(f"explain_recorded: module {name} of {type(graph.model).__name__} did not run in the "
                                 f"recorded forward")
    acts = Activations(graph, {})
    recorded = {INPUT: image}
    for node in graph.nodes:
        if node.op not in ("conv", "linear"):
            continue
        if node.modules[0] in inputs:
            x = inputs[node.modules[0]]
            recorded.setdefault(node.inputs[0], x.flatten(1) if node.op == "linear" else x)
        out = captured[node.modules[-1]][0]
        if not isinstance(graph.module(node.modules[-1]), BATCHNORMS):
            if out is not None:
                recorded[node.output] = out.flatten(1) if node.op == "linear" else out
            continue
        acts.batch_stats[node.output] = captured[node.modules[-1]][1]
        if out is not None:
            recorded[node.output] = out
        if len(node.modules) == 2 and captured[node.modules[0]][0] is not None:
            acts.pre_bn[node.output] = captured[node.modules[0]][0]
    acts.values = RecordedValues(acts, recorded)
    return acts


# ---------------------------------------------------------------------------------------------- relevance rules


def _input_mod(kind: str, x: Tensor, nonneg: bool, bounds: Optional[Tuple[Tensor, Tensor]]):
    """The modified input of a term: a tensor, ONES, or None when the term is identically zero."""
    if kind == "x":
        return x
    if kind == "pos":
        return x if nonneg else x.clamp(min=0)
    if kind == "neg":
        return None if nonneg else x.clamp(max=0)
    if kind == "ones":
        return ONES
    if bounds is None:
        raise ValueError("LRP z-box rule: input bounds are only defined for the layer that reads the input")
    return (bounds[0] if kind == "low" else bounds[1]).expand(x.shape)


def _param_mod(kind: str, p: Tensor, gamma: float) -> Tensor:
    if kind == "w":
        return p
    if kind == "pos":
        return p.clamp(min=0)
    if kind == "neg":
        return p.clamp(max=0)
    if kind == "ones":
        return torch.ones_like(p)
    if kind == "square":
        return p * p
    if kind == "gamma_pos":
        return p + gamma * p.clamp(min=0)
    return p + gamma * p.clamp(max=0)


def _bias_view(b: Tensor, like: Tensor) -> Tensor:
    return b.view(1, -1, *[1] * (like.dim() - 2))


def _terms(acts: Activations, node: Node, rule: Rule, terms: Sequence[Term], spec: Spec):
    """(sign, modified input, modified weight, modified output) of each non-zero term of a group."""
    x = acts.values[node.inputs[0]]
    w, b = acts.params(node)
    nonneg = node.inputs[0] in acts.graph.nonneg
    bounds = _bounds(acts, spec.composite) if node.inputs[0] == INPUT else None
    out = []
    for term in terms:
        xt = _input_mod(term.inputs, x, nonneg, bounds)
        if xt is None:
            continue
        wt = _param_mod(term.params, w, rule.gamma)
        use_bias = term.bias and b is not None and not spec.zero_bias
        if term.inputs == "x" and term.params == "w":
            z = acts.values[node.output]
            zt = z if use_bias or b is None else z - _bias_view(b, z)
        else:
            x_fwd = torch.ones((1, *x.shape[1:]), dtype=x.dtype, device=x.device) if xt is ONES else xt
            with torch.no_grad() if spec.detach_normalizers else nullcontext():
                zt = _affine(node, x_fwd, wt, _param_mod(term.params, b, rule.gamma) if use_bias else None)
        out.append((term.sign, xt, wt, zt))
    return out


def _bounds(acts: Activations, composite: Composite) -> Tuple[Tensor, Tensor]:
    """z-box bounds: the composite's (per channel), else each sample's per-channel min and max of the input."""
    x = acts.values[INPUT].detach()
    if composite.low is None or composite.high is None:
        return x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return tuple(t.to(x).reshape(1, -1, 1, 1) if t.dim() <= 1 else t.to(x) for t in (composite.low, composite.high))


def _mask(where: str, z: Tensor) -> Tensor:
    return (z > 0 if where == "pos" else z < 0).to(z)


def _lrp_affine(acts: Activations, node: Node, r: Tensor, spec: Spec) -> Tensor:
    rule = spec.rule(node)
    if not rule.groups:
        return r
    x = acts.values[node.inputs[0]]
    out = None
    for group in rule.groups:
        terms = _terms(acts, node, rule, group.terms, spec)
        inverse = 1 / spec.stable(sum(sign * zt for sign, _, _, zt in terms), rule.epsilon)
        mask = None if group.where is None else _mask(group.where, acts.values[node.output])
        s = r * (inverse if mask is None else inverse * mask).unsqueeze(1)
        for sign, xt, wt, _ in terms:
            c = _affine_t(node, s, wt, x.shape[1:])
            out = _accumulate(out, c if xt is ONES else xt.unsqueeze(1) * c, group.coef * sign)
    return out


def _accumulate(total: Optional[Tensor], term: Tensor, factor: float) -> Tensor:
    """total + factor·term without the passes for factor 1 or an empty total (these tensors are [B, K, ...])."""
    if factor != 1:
        term = term * factor
    return term if total is None else total + term


def _head(acts: Activations, classes: Tensor, spec: Spec) -> Tensor:
    """Relevance (or gradient) at the classifier's input for the classes [B, K], seeded with R = logit (or 1),
    gathering the K weight rows instead of forming [B, K, num_classes]."""
    node = acts.graph.head
    w, _ = acts.params(node)
    if spec.mode == "grad":
        return w[classes]
    rule = spec.rule(node)
    if not rule.groups:
        raise ValueError("LRP: the classifier needs a rule, not Pass")
    x, z = acts.values[node.inputs[0]], acts.values[node.output]
    seed = z.gather(1, classes)
    out = None
    for group in rule.groups:
        terms = _terms(acts, node, rule, group.terms, spec)
        den = sum(sign * zt.expand(z.shape).gather(1, classes) for sign, _, _, zt in terms)
        s = seed / spec.stable(den, rule.epsilon)
        if group.where is not None:
            s = s * _mask(group.where, seed)
        for sign, xt, wt, _ in terms:
            c = wt[classes] * s.unsqueeze(-1)
            out = _accumulate(out, c if xt is ONES else xt.unsqueeze(1) * c, group.coef * sign)
    return out


def _vjp(fn: Callable[[Tensor], Tensor], in_shape: Sequence[int], s: Tensor) -> Tensor:
    """Transpose of a parameter-free linear op (average pooling) applied to s [B, K, *out]."""
    flat = s.flatten(0, 1)
    with torch.enable_grad():
        probe = torch.zeros((flat.shape[0], *in_shape), dtype=s.dtype, device=s.device, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(probe), probe, flat, create_graph=s.requires_grad)
    return grad.view(*s.shape[:2], *in_shape)


def _winner(node: Node, x: Tensor, r: Tensor) -> Tensor:
    """Max pooling: each output's relevance (or gradient) goes to the input it took (the same input as autograd)."""
    pool = node.attrs["pool"]
    _, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True)
    b, k, c = r.shape[:3]
    index = idx.flatten(2).unsqueeze(1).expand(b, k, c, -1)
    out = r.new_zeros(b, k, c, x.shape[2] * x.shape[3]).scatter_add(3, index, r.flatten(3))
    return out.view(b, k, *x.shape[1:])


def _backward(acts: Activations, node: Node, r: Tensor, spec: Spec) -> List[Tensor]:
    """Relevance (spec.mode "lrp") or gradient ("grad") of each input of `node` from that of its output."""
    op, lrp = node.op, spec.mode == "lrp"
    xs = [acts.values[key] for key in node.inputs]
    if op in ("conv", "linear"):
        if lrp:
            return [_lrp_affine(acts, node, r, spec)]
        return [_affine_t(node, r, acts.params(node)[0], xs[0].shape[1:])]
    if op == "act":
        if lrp:
            return [r]
        x = xs[0]
        mask = x > 0 if node.attrs["kind"] == "relu" else (x > 0) & (x < 6)
        return [r * mask.unsqueeze(1).to(r)]
    if op == "add":
        if not lrp:
            return [r, r]
        s = r * (1 / spec.stable(xs[0] + xs[1], spec.composite.stabilizer)).unsqueeze(1)
        return [x.unsqueeze(1) * s for x in xs]
    if op == "cat":
        return list(torch.split(r, [x.shape[1] for x in xs], dim=2))
    if op == "slice":
        channels = xs[0].shape[1]
        start, end = _split_sizes(node, channels)
        return [F.pad(r, [0, 0] * (r.dim() - 3) + [start, channels - end])]
    if op == "shuffle":
        channels = xs[0].shape[1]
        return [_shuffle(r.flatten(0, 1), channels // node.attrs["groups"]).view(r.shape)]
    if op == "maxpool":
        return [_winner(node, xs[0], r)]
    if op == "avgpool":
        if not lrp:
            return [_vjp(node.attrs["pool"], xs[0].shape[1:], r)]
        s = r / spec.stable(acts.values[node.output], spec.composite.stabilizer).unsqueeze(1)
        return [xs[0].unsqueeze(1) * _vjp(node.attrs["pool"], xs[0].shape[1:], s)]
    if op == "gap":
        x = xs[0]
        area = x.shape[2] * x.shape[3]
        if lrp:
            r = r / spec.stable(acts.values[node.output], spec.composite.stabilizer).unsqueeze(1)
            return [x.unsqueeze(1) * (r / area)[..., None, None]]
        return [(r / area)[..., None, None].expand(*r.shape, *x.shape[2:])]
    if op == "flatten":
        return [r.reshape(*r.shape[:2], *xs[0].shape[1:])]
    raise ValueError(f"relevance graph: unknown op {op!r} at {node.output}")


def _recomputed(acts: Activations, node: Node, r: Tensor, spec: Spec) -> List[Tensor]:
    """`_backward` under activation checkpointing: a differentiable walk keeps only each layer's relevance for the
    double backward and recomputes the rule's intermediates (normalisers, modified weights and inputs) there, so the
    student path's memory stays near that of the relevance tensors themselves. The folded parameters it reads must
    already be cached (`_fold_ahead`), so that the recomputation reads the same tensors."""
    return checkpoint(lambda relevance: _backward(acts, node, relevance, spec), r, use_reentrant=False)


def _fold_ahead(acts: Activations, nodes: Sequence[Node]) -> None:
    """Fold the BatchNorms and layers that a walk over `nodes` reads, including through recomputed values."""
    keys = [key for node in nodes for key in (*node.inputs, node.output)]
    for _, node in _reads(acts.graph, keys, lambda key: key in acts.values):
        if node.modules and isinstance(acts.graph.module(node.modules[-1]), BATCHNORMS):
            acts.bn_affine(node)
    for node in nodes:
        if node.op in ("conv", "linear"):
            acts.params(node)


def _reads(graph: Graph, keys: List[str], recorded: Callable[[str], bool]) -> Iterator[Tuple[str, Node]]:
    """(key, producing node) of `keys` and of every tensor that a key which is not `recorded` is recomputed from: an
    elementwise or pooling op's inputs; a conv / linear output comes from its recorded output (BN input) instead."""
    producers = {node.output: node for node in graph.nodes}
    seen = set()
    while keys:
        key = keys.pop()
        if key in seen or key == INPUT:
            continue
        seen.add(key)
        node = producers[key]
        yield key, node
        if recorded(key) or (node.op in ("conv", "linear") and not isinstance(graph.module(node.modules[0]),
                                                                               BATCHNORMS)):
            continue
        keys.extend(node.inputs)


def _walk(graph: Graph, target: str) -> List[Node]:
    """The nodes below the classifier that a walk down to tensor `target` visits, in the order it visits them."""
    walk = []
    for node in reversed(graph.nodes[:-1]):
        if node.output == target:
            break
        walk.append(node)
    return walk


def tape_needs(graph: Graph, target: str) -> Tuple[Set[str], Set[str]]:
    """(modules whose output, modules whose input) a recorded walk from the classifier down to `target` reads: the
    conv / linear layers it visits (their outputs carry the BatchNorm statistics), and for every other tensor it
    reads, the recorded tensors that tensor is recomputed from."""
    readers = {}  # tensor -> a Conv2d / Linear module that reads it (the tape keeps those inputs, not a BN's)
    for node in graph.nodes:
        if node.op in ("conv", "linear") and not isinstance(graph.module(node.modules[0]), BATCHNORMS):
            readers.setdefault(node.inputs[0], node.modules[0])
    walk = _walk(graph, target) + [graph.head]
    layers = [node for node in walk if node.op in ("conv", "linear")]
    outputs = {node.modules[0] for node in layers} | {node.modules[-1] for node in layers}
    inputs: Set[str] = set()
    keys = [target] + [key for node in walk for key in (*node.inputs, node.output)]
    for key, node in _reads(graph, keys, lambda key: key in readers):
        if key in readers:
            inputs.add(readers[key])
        elif node.op in ("conv", "linear"):
            outputs.update((node.modules[0], node.modules[-1]))
    return outputs, inputs


def propagate(acts: Activations, classes: Tensor, target: str, spec: Spec,
              observer: Optional[Observer] = None, recompute: bool = False) -> Tensor:
    """Relevance or gradient [B, K, *shape of target] of the classes at tensor `target`.

    Nodes are visited in reverse down to the op that made `target` (its consumers all come later, so its relevance
    is complete there); relevance reaching a tensor read by several ops (a residual fork) is summed.
    `observer(node, out_relevance, in_relevances)` sees every step (tests use it to check conservation).
    `recompute`: checkpoint each step of a differentiable walk (see `_recomputed`).
    """
    graph = acts.graph
    walk = _walk(graph, target)
    if recompute and torch.is_grad_enabled():  # only a differentiable walk is checkpointed
        _fold_ahead(acts, walk)
    pending = {graph.head.inputs[0]: _head(acts, classes, spec)}
    for node in walk:
        r = pending.pop(node.output, None)
        if r is None:
            continue
        ins = _recomputed(acts, node, r, spec) if recompute and r.requires_grad else _backward(acts, node, r, spec)
        if observer is not None:
            observer(node, r, ins)
        for key, contribution in zip(node.inputs, ins):
            pending[key] = contribution if key not in pending else pending[key] + contribution
    if target not in pending:
        value = acts.values[target]
        return value.new_zeros(value.shape[0], classes.shape[1], *value.shape[1:])
    return pending[target]

