"""The op table: one object per kind of relevance-graph node, holding all the engine does with that kind of op.

Each op computes its output from its inputs (`forward`), says which tensors that output is recomputed from on a
recorded forward and recomputes it there (`reads`, `recompute`), and sends relevance or gradients back to its inputs
(`backward`). The conv / linear layers (`Affine`) are the ops a BatchNorm folds into, whose inputs and outputs the
tape records and to which the composite's rules apply; every other op is parameter-free with a fixed relevance rule.
The engine looks ops up by `node.op` (`op_of`), so adding an op is one registered subclass (plus the
`GraphBuilder` method that emits it); see docs/explain.md.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Type, TypeVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import batch_norm, is_batchnorm, uses_batch_stats
from .graph import INPUT, Graph, Node
from .rules import Composite, Rule, Term, stabilize

Tensor = torch.Tensor
ONES = "ones"
TermValues = Tuple[float, Union[Tensor, str], Tensor, Tensor]


class ActivationsLike(Protocol):
    """What an op reads (and a layer's forward notes) of one forward: `tape.Activations`."""

    graph: Graph
    values: Dict[str, Tensor]
    pre_bn: Dict[str, Tensor]
    batch_stats: Dict[str, bool]

    def params(self, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        ...


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


def not_kept(node: Node) -> ValueError:
    """The error for a tensor that a tape recorded for a higher layer did not keep."""
    return ValueError(f"explain_recorded: the output of {node.modules[0]} was not kept by the tape; record the forward "
                      f"with a layer at or below the one explained (record(model, layer=...))")


# ---------------------------------------------------------------------------------------------- the table


class Op:
    """A kind of node. The defaults are those of a parameter-free op, whose output a recorded forward recomputes
    from its inputs whenever it is read (so the tape holds no more than the model's own backward does)."""

    name = ""
    affine = False  # a conv / linear layer: BatchNorm folds into it, the tape records it, the rules apply to it

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        """The output of `node` from its inputs `xs`."""
        raise NotImplementedError

    def reads(self, graph: Graph, node: Node) -> Tuple[str, ...]:
        """The tensors that `recompute` reads: the op's inputs."""
        return node.inputs

    def recompute(self, acts: ActivationsLike, node: Node) -> Tensor:
        """The output of `node` on a recorded forward that did not keep it."""
        return self.forward(acts, node, [acts.values[key] for key in node.inputs])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        """Relevance (spec.mode "lrp") or gradient ("grad") [B, K, ...] of each input from that of the output."""
        raise NotImplementedError


OPS: Dict[str, Op] = {}
OpType = TypeVar("OpType", bound=Type[Op])


def register(cls: OpType) -> OpType:
    """Add an op kind to the table under its `name`."""
    OPS[cls.name] = cls()
    return cls


def op_of(node: Node) -> Op:
    """The op object of a node."""
    op = OPS.get(node.op)
    if op is None:
        raise ValueError(f"relevance graph: unknown op {node.op!r} at {node.output}")
    return op


def records_input(graph: Graph, node: Node) -> bool:
    """Whether `node` is a Conv2d / Linear layer, whose input and output the tape keeps (a standalone BatchNorm is
    an affine op too, but its input is some other op's output)."""
    return op_of(node).affine and not is_batchnorm(graph.module(node.modules[0]))


# ---------------------------------------------------------------------------------------------- conv / linear


class Affine(Op):
    """A Conv2d / Linear with the BatchNorm right after it folded in, or a BatchNorm alone (a depthwise 1x1 conv)."""

    affine = True

    def weight(self, module: nn.Module) -> Tensor:
        """The layer's weight in the shape `apply` takes."""
        return module.weight

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        """The layer's map with weight `w` and bias `b` (the modified parameters of a rule's term)."""
        raise NotImplementedError

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        """Transpose of the layer's linear map applied to s [B, K, *out] -> [B, K, *in_shape]."""
        raise NotImplementedError

    def recorded(self, t: Tensor) -> Tensor:
        """A tensor the layer's module read or wrote, as the graph holds it."""
        return t

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        """The layer and its BatchNorm, noting in `acts` what the BatchNorm normalised (it is folded from that)."""
        modules = [acts.graph.module(name) for name in node.modules]
        if is_batchnorm(modules[0]):
            pre, bn = xs[0], modules[0]
        else:
            pre = self.apply(node, xs[0], self.weight(modules[0]), modules[0].bias)
            if len(modules) == 1:
                return pre
            bn = modules[1]
        stats = uses_batch_stats(bn)
        acts.pre_bn[node.output], acts.batch_stats[node.output] = pre, stats
        return batch_norm(bn, pre, stats)

    def reads(self, graph: Graph, node: Node) -> Tuple[str, ...]:
        """A layer's output is its module's recorded output (normalised again by its BatchNorm); a BatchNorm alone
        normalises its input."""
        return () if records_input(graph, node) else node.inputs

    def recompute(self, acts: ActivationsLike, node: Node) -> Tensor:
        """The BatchNorm output, normalised again from what the tape kept (no layer is run again)."""
        key = node.output
        if len(node.modules) == 1 and is_batchnorm(acts.graph.module(node.modules[0])):
            pre = acts.values[node.inputs[0]]
        elif key in acts.pre_bn:
            pre = acts.pre_bn[key]
        else:
            raise not_kept(node)
        return batch_norm(acts.graph.module(node.modules[-1]), pre, acts.batch_stats[key])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        if spec.mode == "lrp":
            return [self.relevance(acts, node, r, spec)]
        return [self.transpose(node, r, acts.params(node)[0], xs[0].shape[1:])]

    def terms(self, acts: ActivationsLike, node: Node, rule: Rule, terms: Sequence[Term],
              spec: Spec) -> List[TermValues]:
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
                    zt = self.apply(node, x_fwd, wt, _param_mod(term.params, b, rule.gamma) if use_bias else None)
            out.append((term.sign, xt, wt, zt))
        return out

    def relevance(self, acts: ActivationsLike, node: Node, r: Tensor, spec: Spec) -> Tensor:
        """The composite's rule for the node's role (docs/explain.md, "Rules"); Pass hands `r` on unchanged."""
        rule = spec.rule(node)
        if not rule.groups:
            return r
        x = acts.values[node.inputs[0]]
        out = None
        for group in rule.groups:
            terms = self.terms(acts, node, rule, group.terms, spec)
            inverse = 1 / spec.stable(sum(sign * zt for sign, _, _, zt in terms), rule.epsilon)
            mask = None if group.where is None else output_mask(group.where, acts.values[node.output])
            s = r * (inverse if mask is None else inverse * mask).unsqueeze(1)
            for sign, xt, wt, _ in terms:
                c = self.transpose(node, s, wt, x.shape[1:])
                out = accumulate(out, c if xt is ONES else xt.unsqueeze(1) * c, group.coef * sign)
        return out


@register
class Conv(Affine):
    name = "conv"

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        a = node.attrs
        return F.conv2d(x, w, b, a["stride"], a["padding"], a["dilation"], a["groups"])

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        a = node.attrs
        flat = s.flatten(0, 1)
        extra = [
            size - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
            for size, o, st, p, d, k in zip(in_shape[-2:], flat.shape[-2:], a["stride"], a["padding"],
                                            a["dilation"], w.shape[-2:])
        ]
        out = F.conv_transpose2d(flat, w, None, a["stride"], a["padding"], extra, a["groups"], a["dilation"])
        return out.view(*s.shape[:2], *out.shape[1:])


@register
class Linear(Affine):
    """A Linear, or a 1x1 Conv2d classifier used as one (its weight and recorded tensors are flattened)."""

    name = "linear"

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.flatten(1)

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.linear(x, w, b)

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        return s @ w

    def recorded(self, t: Tensor) -> Tensor:
        return t.flatten(1)


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


def _bounds(acts: ActivationsLike, composite: Composite) -> Tuple[Tensor, Tensor]:
    """z-box bounds: the composite's (per channel), else each sample's per-channel min and max of the input."""
    x = acts.values[INPUT].detach()
    if composite.low is None or composite.high is None:
        return x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return tuple(t.to(x).reshape(1, -1, 1, 1) if t.dim() <= 1 else t.to(x) for t in (composite.low, composite.high))


def output_mask(where: str, z: Tensor) -> Tensor:
    """A rule group's restriction to the outputs whose unmodified z is positive ("pos") or negative."""
    return (z > 0 if where == "pos" else z < 0).to(z)


def accumulate(total: Optional[Tensor], term: Tensor, factor: float) -> Tensor:
    """total + factor·term without the passes for factor 1 or an empty total (these tensors are [B, K, ...])."""
    if factor != 1:
        term = term * factor
    return term if total is None else total + term


# ---------------------------------------------------------------------------------------------- parameter-free ops


@register
class Activation(Op):
    """ReLU / ReLU6: relevance passes through; the gradient is masked where the input is off."""

    name = "act"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return F.relu(xs[0]) if node.attrs["kind"] == "relu" else F.relu6(xs[0])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        if spec.mode == "lrp":
            return [r]
        x = xs[0]
        mask = x > 0 if node.attrs["kind"] == "relu" else (x > 0) & (x < 6)
        return [r * mask.unsqueeze(1).to(r)]


@register
class Add(Op):
    """A residual sum: relevance is split in proportion to each summand (z-rule), the gradient is copied."""

    name = "add"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0] + xs[1]

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        if spec.mode != "lrp":
            return [r, r]
        s = r * (1 / spec.stable(xs[0] + xs[1], spec.composite.stabilizer)).unsqueeze(1)
        return [x.unsqueeze(1) * s for x in xs]


@register
class Cat(Op):
    """Channel concatenation: each input gets its slice."""

    name = "cat"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return torch.cat(xs, 1)

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        return list(torch.split(r, [x.shape[1] for x in xs], dim=2))


def _split_sizes(node: Node, channels: int) -> Tuple[int, int]:
    cut = int(channels * node.attrs["ratio"])
    return (0, cut) if node.attrs["part"] == 0 else (cut, channels)


@register
class Slice(Op):
    """One side of a channel split (ShuffleNetV2): zero-padded back to all channels."""

    name = "slice"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        start, end = _split_sizes(node, xs[0].shape[1])
        return xs[0][:, start:end]

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        channels = xs[0].shape[1]
        start, end = _split_sizes(node, channels)
        return [F.pad(r, [0, 0] * (r.dim() - 3) + [start, channels - end])]


def _shuffle(x: Tensor, groups: int) -> Tensor:
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


@register
class Shuffle(Op):
    """A channel shuffle: relevance goes back through the inverse permutation."""

    name = "shuffle"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return _shuffle(xs[0], node.attrs["groups"])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        channels = xs[0].shape[1]
        return [_shuffle(r.flatten(0, 1), channels // node.attrs["groups"]).view(r.shape)]


class Pool(Op):
    """A pooling module (its hyper-parameters only; it has no state), run as it is."""

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return node.attrs["pool"](xs[0])


def _vjp(fn: Callable[[Tensor], Tensor], in_shape: Sequence[int], s: Tensor) -> Tensor:
    """Transpose of a parameter-free linear op (average pooling) applied to s [B, K, *out]."""
    flat = s.flatten(0, 1)
    with torch.enable_grad():
        probe = torch.zeros((flat.shape[0], *in_shape), dtype=s.dtype, device=s.device, requires_grad=True)
        (grad,) = torch.autograd.grad(fn(probe), probe, flat, create_graph=s.requires_grad)
    return grad.view(*s.shape[:2], *in_shape)


@register
class AvgPool(Pool):
    """Average pooling (fixed or adaptive): z-rule through the pooling's transpose; the gradient is that transpose."""

    name = "avgpool"

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        if spec.mode != "lrp":
            return [_vjp(node.attrs["pool"], xs[0].shape[1:], r)]
        s = r / spec.stable(acts.values[node.output], spec.composite.stabilizer).unsqueeze(1)
        return [xs[0].unsqueeze(1) * _vjp(node.attrs["pool"], xs[0].shape[1:], s)]


@register
class MaxPool(Pool):
    """Max pooling: each output's relevance (or gradient) goes to the input it took (the same input as autograd)."""

    name = "maxpool"

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        x, pool = xs[0], node.attrs["pool"]
        _, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True)
        b, k, c = r.shape[:3]
        index = idx.flatten(2).unsqueeze(1).expand(b, k, c, -1)
        out = r.new_zeros(b, k, c, x.shape[2] * x.shape[3]).scatter_add(3, index, r.flatten(3))
        return [out.view(b, k, *x.shape[1:])]


@register
class GlobalAvgPool(Op):
    """The spatial mean to [B, C] before the classifier: z-rule, the gradient spread evenly."""

    name = "gap"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0].mean((2, 3))

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        x = xs[0]
        area = x.shape[2] * x.shape[3]
        if spec.mode == "lrp":
            r = r / spec.stable(acts.values[node.output], spec.composite.stabilizer).unsqueeze(1)
            return [x.unsqueeze(1) * (r / area)[..., None, None]]
        return [(r / area)[..., None, None].expand(*r.shape, *x.shape[2:])]


@register
class Flatten(Op):
    name = "flatten"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0].flatten(1)

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> List[Tensor]:
        return [r.reshape(*r.shape[:2], *xs[0].shape[1:])]
