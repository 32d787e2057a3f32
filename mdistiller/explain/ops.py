"""The op table: one object per kind of relevance-graph node, holding all the engine does with that kind of op.

Each op computes its output from its inputs (`forward`), says which tensors that output is recomputed from on a
recorded forward and recomputes it there (`reads`, `recompute`), and sends relevance, gradients or the head's
linearisation back to its inputs (`backward`). The conv / linear layers (`Layer`) are the ops a BatchNorm folds into
and whose inputs and outputs the tape records; they and the LayerNorm (`Norm`) are the `Ruled` ops, to which the
composite's rules apply; every other op is parameter-free with a fixed relevance rule. The engine looks ops up by
`node.op` (`op_of`), so adding an op is one registered subclass (plus the lowering in `trace.py` that emits it); see
docs/explain.md.
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
MODES = ("lrp", "grad", "linear")


class ActivationsLike(Protocol):
    """What an op reads (and a layer's forward notes) of one forward: `tape.Activations`."""

    graph: Graph
    values: Dict[str, Tensor]
    pre_bn: Dict[str, Tensor]
    batch_stats: Dict[str, bool]

    def params(self, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        ...

    def bn_affine(self, node: Node) -> Tuple[Tensor, Tensor]:
        ...


@dataclass(frozen=True)
class Spec:
    """What to propagate: "lrp" with `composite` (and `zero_bias`), "grad" (plain gradients), or "linear" (the
    gradient with every normaliser's statistics held fixed: the linear map CAM reads the classifier as).

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


Contributions = List[Optional[Tensor]]  # per input; None: nothing reaches that input (a gate's relevance)


# ---------------------------------------------------------------------------------------------- the table


class Op:
    """A kind of node. The defaults are those of a parameter-free op, whose output a recorded forward recomputes
    from its inputs whenever it is read (so the tape holds no more than the model's own backward does)."""

    name = ""
    ruled = False  # the composite's rules apply (`parameters` gives its affine map)
    records = False  # a conv / linear layer: BatchNorm folds into it, the tape records its input and output

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        """The output of `node` from its inputs `xs`."""
        raise NotImplementedError

    def reads(self, graph: Graph, node: Node) -> Tuple[str, ...]:
        """The tensors that `recompute` reads: the op's inputs."""
        return node.inputs

    def recompute(self, acts: ActivationsLike, node: Node) -> Tensor:
        """The output of `node` on a recorded forward that did not keep it."""
        return self.forward(acts, node, [acts.values[key] for key in node.inputs])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        """Relevance (spec.mode "lrp"), gradient ("grad") or the linearised gradient ("linear") [B, K, ...] of each
        input from that of the output."""
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
    a layer op too, but its input is some other op's output)."""
    return op_of(node).records and not is_batchnorm(graph.module(node.modules[0]))


# ---------------------------------------------------------------------------------------------- ruled ops


class Ruled(Op):
    """An affine map z = W·x + b to which the composite's rule for the node's role applies (docs/explain.md,
    "Rules"): subclasses give the map with modified parameters (`apply`), its transpose and its parameters."""

    ruled = True

    def parameters(self, acts: ActivationsLike, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        """(W, b) of the node's affine map in this forward (cached by `acts.params`)."""
        raise NotImplementedError

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        """The map with weight `w` and bias `b` (the modified parameters of a rule's term)."""
        raise NotImplementedError

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        """Transpose of the map's linear part applied to s [B, K, *out] -> [B, K, *in_shape]."""
        raise NotImplementedError

    def bias_view(self, b: Tensor, z: Tensor) -> Tensor:
        """The bias shaped to broadcast against the output z."""
        return b

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
                zt = z if use_bias or b is None else z - self.bias_view(b, z)
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


class Layer(Ruled):
    """A Conv2d / Linear with the BatchNorm right after it folded in, or a BatchNorm alone (a depthwise 1x1 conv)."""

    records = True

    def weight(self, module: nn.Module) -> Tensor:
        """The layer's weight in the shape `apply` takes."""
        return module.weight

    def recorded(self, node: Node, t: Tensor, which: str) -> Tensor:
        """A tensor the layer's module read ("in") or wrote ("out"), as the graph holds it."""
        return t

    def parameters(self, acts: ActivationsLike, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        """W' = W·γ/√(σ²+ε), b' = (b−μ)·γ/√(σ²+ε) + β; a BatchNorm alone is the depthwise 1x1 conv (scale, shift)."""
        modules = [acts.graph.module(name) for name in node.modules]
        if is_batchnorm(modules[0]):
            scale, shift = acts.bn_affine(node)
            return scale.view(-1, 1, 1, 1), shift
        w, b = self.weight(modules[0]), modules[0].bias
        if len(modules) == 1:
            return w, b
        scale, shift = acts.bn_affine(node)
        w = w * scale.view(-1, *[1] * (w.dim() - 1))
        return w, shift if b is None else shift + b * scale

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

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        if spec.mode == "lrp":
            return [self.relevance(acts, node, r, spec)]
        return [self.transpose(node, r, acts.params(node)[0], xs[0].shape[1:])]


@register
class Conv(Layer):
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

    def bias_view(self, b: Tensor, z: Tensor) -> Tensor:
        return b.view(1, -1, 1, 1)


@register
class Linear(Layer):
    """A Linear over the last dimension (of [B, C] or, channels-last, of [B, H, W, C]), or a 1x1 Conv2d classifier
    used as one (its weight and recorded tensors are flattened)."""

    name = "linear"

    def weight(self, module: nn.Module) -> Tensor:
        return module.weight.flatten(1)

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return F.linear(x, w, b)

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        return s @ w

    def recorded(self, node: Node, t: Tensor, which: str) -> Tensor:
        return t.reshape(t.shape[0], *node.attrs[f"{which}_shape"])


@register
class Norm(Ruled):
    """LayerNorm over the last dimension: y = γ·(x − μ)/σ + β with the sample's μ, σ, an affine map W = γ/σ,
    b = β − μ·γ/σ for the rules (role "bn": statistics held fixed, as a folded BatchNorm's). Its gradient is the
    true one; the linearised gradient holds σ fixed (μ is linear in x)."""

    name = "norm"

    def _stats(self, x: Tensor, node: Node) -> Tuple[Tensor, Tensor]:
        var, mean = torch.var_mean(x, -1, unbiased=False, keepdim=True)
        return mean, torch.rsqrt(var + node.attrs["eps"])

    def _affine(self, acts: ActivationsLike, node: Node) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        model = acts.graph.model
        return tuple(None if c is None else c(model) for c in (node.attrs["weight"], node.attrs["bias"]))

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        weight, bias = self._affine(acts, node)
        return F.layer_norm(xs[0], xs[0].shape[-1:], weight, bias, node.attrs["eps"])

    def parameters(self, acts: ActivationsLike, node: Node) -> Tuple[Tensor, Optional[Tensor]]:
        mean, rstd = self._stats(acts.values[node.inputs[0]], node)
        weight, bias = self._affine(acts, node)
        scale = rstd if weight is None else rstd * weight
        shift = -mean * scale
        return scale.expand(acts.values[node.inputs[0]].shape), shift if bias is None else shift + bias

    def apply(self, node: Node, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return x * w if b is None else x * w + b

    def transpose(self, node: Node, s: Tensor, w: Tensor, in_shape: Sequence[int]) -> Tensor:
        return s * w.unsqueeze(1)

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        if spec.mode == "lrp":
            return [self.relevance(acts, node, r, spec)]
        x = xs[0].unsqueeze(1)
        mean, rstd = self._stats(x, node)
        weight, _ = self._affine(acts, node)
        g = r if weight is None else r * weight
        g = g - g.mean(-1, keepdim=True)
        if spec.mode == "grad":  # the derivative through σ as well
            normalized = (x - mean) * rstd
            g = g - normalized * (g * normalized).mean(-1, keepdim=True)
        return [g * rstd]


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

ACTIVATIONS: Dict[str, Callable[..., Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


# torch's hardsigmoid backward multiplies by the float32 constant 1/6 in every precision; so does the walk, so that
# its gradients are autograd's
HARDSIGMOID_SLOPE = float(torch.tensor(1 / 6, dtype=torch.float32))


def _derivative(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """f'(x) of an elementwise f by autograd (exactly the model's derivative), differentiable where x is."""
    create_graph = torch.is_grad_enabled() and x.requires_grad
    with torch.enable_grad():
        probe = x if create_graph else x.detach().requires_grad_()
        (slope,) = torch.autograd.grad(fn(probe).sum(), probe, create_graph=create_graph)
    return slope


@register
class Activation(Op):
    """An elementwise activation (`ACTIVATIONS`): relevance passes through (zennit's Pass); the gradient is the
    activation's derivative (for ReLU / ReLU6 a mask)."""

    name = "act"

    def _fn(self, node: Node) -> Callable[[Tensor], Tensor]:
        fn, kind = ACTIVATIONS[node.attrs["kind"]], node.attrs["kind"]
        return (lambda x: fn(x, approximate=node.attrs["approximate"])) if kind == "gelu" else fn

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return self._fn(node)(xs[0])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        kind = node.attrs["kind"]
        if spec.mode == "lrp":
            return [r]
        if spec.mode == "linear":
            raise ValueError(f"explain: {kind} at {node.output} is not linear")
        x = xs[0]
        if kind in ("relu", "relu6"):
            slope = (x > 0 if kind == "relu" else (x > 0) & (x < 6)).to(r)
        elif kind == "hardswish":  # torch's own backward formulas (which have no double backward)
            slope = torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0))
        elif kind == "hardsigmoid":
            slope = ((x > -3) & (x < 3)).to(r) * HARDSIGMOID_SLOPE
        else:
            slope = _derivative(self._fn(node), x)
        return [r * slope.unsqueeze(1)]


@register
class Add(Op):
    """A residual sum: relevance is split in proportion to each summand (z-rule), the gradient is copied."""

    name = "add"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0] + xs[1]

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        if spec.mode != "lrp":
            return [r, r]
        s = r * (1 / spec.stable(xs[0] + xs[1], spec.composite.stabilizer)).unsqueeze(1)
        return [x.unsqueeze(1) * s for x in xs]


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """t [B, K, ...] summed over the dimensions that a [B, *shape[1:]] operand was broadcast along."""
    dims = [i + 1 for i, size in enumerate(shape) if i > 0 and size == 1 and t.shape[i + 1] != 1]
    return t.sum(dims, keepdim=True) if dims else t


@register
class Mul(Op):
    """A gated product signal ⊙ gate (squeeze-excitation): the relevance goes to the signal, none to the gate (a
    constant for relevance); the gradient is the true one."""

    name = "mul"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0] * xs[1]

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        signal, gate = xs
        if spec.mode == "lrp":
            return [r, None]
        return [r * gate.unsqueeze(1), _sum_to(r * signal.unsqueeze(1), gate.shape)]


@register
class Scale(Op):
    """x times (or divided by) a constant or a parameter (layer scale): relevance passes through, the gradient is
    scaled likewise."""

    name = "scale"

    def _factor(self, acts: ActivationsLike, node: Node):
        factor = node.attrs["factor"]
        return factor(acts.graph.model) if callable(factor) else factor

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        factor = self._factor(acts, node)
        return xs[0] / factor if node.attrs["divide"] else xs[0] * factor

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        if spec.mode == "lrp":
            return [r]
        factor = self._factor(acts, node)
        return [r / factor if node.attrs["divide"] else r * factor]


@register
class Cat(Op):
    """Concatenation (not along the batch): each input gets its slice."""

    name = "cat"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return torch.cat(xs, node.attrs["dim"])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        dim = node.attrs["dim"]
        return list(torch.split(r, [x.shape[dim] for x in xs], dim=dim + 1))


@register
class Index(Op):
    """A basic slice `x[index]` that keeps the batch (a channel split): relevance goes back to the elements it
    took, zero elsewhere."""

    name = "index"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0][node.attrs["index"]]

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        index = node.attrs["index"]
        out = r.new_zeros(*r.shape[:2], *xs[0].shape[1:])
        out[(slice(None),) + (index if index[0] is Ellipsis else (slice(None),) + index[1:])] = r
        return [out]


@register
class Reshape(Op):
    """view / reshape / flatten / squeeze / unsqueeze keeping the batch: relevance moves back with the elements."""

    name = "reshape"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0].reshape(xs[0].shape[0], *node.attrs["size"])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        return [r.reshape(*r.shape[:2], *xs[0].shape[1:])]


@register
class Permute(Op):
    """permute / transpose keeping the batch first (channel shuffles, channels-last blocks): relevance goes back
    through the inverse permutation."""

    name = "permute"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0].permute(node.attrs["dims"])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        dims = node.attrs["dims"]
        inverse = sorted(range(len(dims)), key=dims.__getitem__)
        return [r.permute(0, 1, *[d + 1 for d in inverse[1:]])]


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

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        if spec.mode != "lrp":
            return [_vjp(node.attrs["pool"], xs[0].shape[1:], r)]
        s = r / spec.stable(acts.values[node.output], spec.composite.stabilizer).unsqueeze(1)
        return [xs[0].unsqueeze(1) * _vjp(node.attrs["pool"], xs[0].shape[1:], s)]


@register
class MaxPool(Pool):
    """Max pooling: each output's relevance (or gradient) goes to the input it took (the same input as autograd)."""

    name = "maxpool"

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        x, pool = xs[0], node.attrs["pool"]
        _, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, True)
        b, k, c = r.shape[:3]
        index = idx.flatten(2).unsqueeze(1).expand(b, k, c, -1)
        out = r.new_zeros(b, k, c, x.shape[2] * x.shape[3]).scatter_add(3, index, r.flatten(3))
        return [out.view(b, k, *x.shape[1:])]


@register
class GlobalAvgPool(Op):
    """The spatial mean of [B, C, H, W] (to [B, C], or [B, C, 1, 1] with `keepdim`): z-rule, the gradient spread
    evenly."""

    name = "gap"

    def forward(self, acts: ActivationsLike, node: Node, xs: List[Tensor]) -> Tensor:
        return xs[0].mean((2, 3), keepdim=node.attrs["keepdim"])

    def backward(self, acts: ActivationsLike, node: Node, xs: List[Tensor], r: Tensor, spec: Spec) -> Contributions:
        x = xs[0]
        area = x.shape[2] * x.shape[3]
        r = r.flatten(2)
        if spec.mode == "lrp":
            r = r / spec.stable(acts.values[node.output].flatten(1), spec.composite.stabilizer).unsqueeze(1)
            return [x.unsqueeze(1) * (r / area)[..., None, None]]
        return [(r / area)[..., None, None].expand(*r.shape, *x.shape[2:])]
