"""The relevance graph of any model whose forward torch.fx can trace (docs/explain.md, "Tracing").

`build_graph` traces the model symbolically, with every traced tensor carrying a shape (a tensor on the meta device),
so a forward that branches on shapes (`if h == 64`, `int(x.size(1) * ratio)`) traces, for that input size. Modules
with a rule in `MODULE_RULES` (and torch.nn's and timm's own leaf modules) are kept whole; everything else is traced
through. Each fx node is then lowered to relevance-graph ops by looking its module type (`MODULE_RULES`), function or
method (`FUNCTION_RULES`) up; a node that no rule covers, or that a rule refuses, stops the build with a one-line error
naming it and its module, so an explanation is never computed on a graph that differs from the model. Graphs are
cached per model, input shape and train / eval mode.
"""
import operator
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ..models.fold import FoldedBatchNorm2d, FoldedConv2d
from .batchnorm import is_batchnorm
from .graph import INPUT, Graph, GraphBuilder, Node, nonneg_keys

Tensor = torch.Tensor
TRACE_BATCH = 2  # traced on the meta device with this batch, so an op that mixes samples shows in its shape
CACHE_SIZE = 8  # graphs kept per model (input shapes x train / eval)
LINEAR_HEAD_OPS = ("reshape", "permute", "norm", "scale", "conv", "linear")  # linear with statistics held fixed


class GraphError(ValueError):
    """A model whose forward cannot be lowered to the relevance graph (the message is the one-line reason)."""


@dataclass(frozen=True)
class Ref:
    """A traced tensor that depends on the input: the key of a relevance-graph tensor."""

    key: str


@dataclass(frozen=True, eq=False)
class Const:
    """A value made from parameters and buffers alone (a layer scale γ, a LayerNorm's weight), recomputed from the
    live model whenever an op reads it, so gradients reach the parameters."""

    node: fx.Node

    def __call__(self, model: nn.Module) -> Any:
        return _evaluate(self.node, model)


def _fetch(model: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _evaluate(node: Any, model: nn.Module) -> Any:
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return _fetch(model, node.target)
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: _evaluate(n, model))
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, Tensor) else value


# ---------------------------------------------------------------------------------------------- tracing


class ShapedProxy(fx.Proxy):
    """A traced value that knows its shape (node.meta["value"], a meta tensor), so Python code reading shapes
    runs as in a real forward."""

    def _tensor(self) -> Optional[Tensor]:
        value = self.node.meta.get("value")
        return value if isinstance(value, Tensor) else None

    @property
    def shape(self):
        t = self._tensor()
        return t.shape if t is not None else self.__getattr__("shape")

    @property
    def ndim(self):
        t = self._tensor()
        return t.dim() if t is not None else self.__getattr__("ndim")

    @property
    def dtype(self):
        t = self._tensor()
        return t.dtype if t is not None else self.__getattr__("dtype")

    def size(self, *dim: int):
        t = self._tensor()
        return t.size(*dim) if t is not None else self.tracer.create_proxy("call_method", "size", (self, *dim), {})

    def dim(self):
        t = self._tensor()
        return t.dim() if t is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def __len__(self) -> int:
        value = self.node.meta.get("value")
        return len(value) if value is not None else super().__len__()

    def __iter__(self):
        value = self.node.meta.get("value")
        if isinstance(value, (tuple, list)):
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()


class Tracer(fx.Tracer):
    """torch.fx tracing with shapes: every proxy carries its value on the meta device (parameters are replaced by
    meta tensors of the same shape, so nothing is computed and no module state is touched). Records, for every
    traced value, the modules whose output it is (innermost first): those names become its keys."""

    def __init__(self, model: nn.Module, image_shape: Sequence[int], dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.image = torch.empty((TRACE_BATCH, *image_shape[1:]), dtype=dtype, device="meta")
        self.outputs: Dict[fx.Node, List[str]] = {}
        self.leaves = _extra_leaves()
        self.placeholders = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in MODULE_RULES or isinstance(m, self.leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._computing = True  # module attributes read while computing the value are the real ones, not proxies
        try:
            proxy.node.meta["value"] = self._value(kind, target, args, kwargs)
        finally:
            self._computing = False
        return proxy

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        if getattr(self, "_computing", False):
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _value(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        """The node's value on the meta device; None where it cannot be computed (the lowering then refuses)."""
        if kind == "placeholder":
            self.placeholders += 1
            return self.image if self.placeholders == 1 else None
        if kind == "get_attr":
            return _meta(_fetch(self.model, target))
        unknown = []

        def value(a: Any) -> Any:
            if isinstance(a, fx.Proxy):
                v = a.node.meta.get("value")
                if v is None:
                    unknown.append(a)
                return v
            return _meta(a)

        args, kwargs = fx.node.map_aggregate((args, kwargs), value)
        if unknown:
            return None
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            module = self.model.get_submodule(target)
            rule = MODULE_RULES.get(type(module))
            return None if rule is None else rule.meta(module, *args, **kwargs)
        except Exception:  # noqa: BLE001 - an op the meta device cannot run: its node is refused when lowered
            return None

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:  # a module made in forward (a slice of a Sequential): its own children are traced
            if self.is_leaf_module(m, ""):
                raise GraphError(f"{type(m).__name__} is called in forward but is not a submodule") from None
            return forward(*args, **kwargs)
        out = super().call_module(m, forward, args, kwargs)
        calls = self.num_calls[name]
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, fx.Proxy):
            self.outputs.setdefault(first.node, []).append(name if calls == 1 else f"{name}_{calls - 1}")
        return out


def _extra_leaves() -> Tuple[type, ...]:
    """timm's own leaf modules (when timm is in use), so an unsupported one is refused by name."""
    fx_helpers = sys.modules.get("timm.layers._fx")
    return tuple(fx_helpers.get_notrace_modules()) if fx_helpers is not None else ()


# ---------------------------------------------------------------------------------------------- lowering


class Lowering:
    """Lowers the traced fx graph to relevance-graph ops, node by node (`run`)."""

    def __init__(self, model: nn.Module, tracer: Tracer, graph: fx.Graph):
        self.model = model
        self.tracer = tracer
        self.fx_graph = graph
        self.builder = GraphBuilder()
        self.env: Dict[fx.Node, Any] = {}
        self.aliases: Dict[str, str] = {}
        self.origin: Dict[str, fx.Node] = {}  # the fx node each relevance-graph node was lowered from
        self.overwritten: Set[str] = set()
        self._cse: Dict[Any, str] = {}
        self.node: Optional[fx.Node] = None

    # ---- the node being lowered

    @property
    def key(self) -> str:
        """The default key of the current node: the innermost module whose output it is, else its fx name."""
        names = self.tracer.outputs.get(self.node)
        return names[0] if names else self.node.name

    def shape(self, value: Any = None) -> Tuple[int, ...]:
        """The per-sample shape of the current node's value (or of a Ref)."""
        if isinstance(value, Ref):
            return self.builder.shapes[value.key] if value.key != INPUT else tuple(self.tracer.image.shape[1:])
        meta = self.node.meta.get("value")
        if not isinstance(meta, Tensor):
            raise self.error("its output is not a tensor")
        if meta.dim() == 0 or meta.shape[0] != TRACE_BATCH:
            raise self.error("it mixes the samples of the batch")
        return tuple(meta.shape[1:])

    def error(self, reason: str) -> GraphError:
        node = self.node
        stack = node.meta.get("nn_module_stack") or {}
        module = node.target if node.op == "call_module" else (list(stack.values())[-1][0] if stack else "")
        return GraphError(f"explain: cannot build the relevance graph of {type(self.model).__name__}: {reason} at "
                          f"node '{node.name}' (module '{module}')")

    def no_rule(self) -> GraphError:
        node = self.node
        if node.op == "call_module":
            cls = type(self.model.get_submodule(node.target))
            what = f"call_module {cls.__module__}.{cls.__name__}"
        elif node.op == "call_method":
            what = f"call_method {node.target}"
        else:
            what = f"call_function {_qualified(node.target)}"
        return self.error(f"no rule for {what}")

    # ---- emitting

    def emit(self, op: str, inputs: Sequence[Ref], key: Optional[str] = None, shape: Optional[Sequence[int]] = None,
             modules: Sequence[str] = (), role: str = "", cse: bool = True, **attrs: Any) -> Ref:
        """One relevance-graph node reading `inputs`; identical parameter-free nodes are made once."""
        keys = tuple(x.key for x in inputs)
        signature = None
        if cse:
            signature = (op, keys, _hashable(attrs))
            if signature in self._cse:
                return Ref(self._cse[signature])
        out = self.builder.add(op, keys, key or self.key, self.shape() if shape is None else shape, modules, role,
                               **attrs)
        self.origin[out] = self.node
        if signature is not None:
            self._cse[signature] = out
        return Ref(out)

    def producer(self, ref: Ref) -> Optional[Node]:
        for node in reversed(self.builder.nodes):
            if node.output == ref.key:
                return node
        return None

    def in_place(self, target: fx.Node, result: Any) -> None:
        """An in-place op: later readers of its operand read its result (and a layer's output it overwrites is
        noted, for the tape)."""
        operand = self.env.get(target)
        layer = self.producer(operand) if isinstance(operand, Ref) else None
        if layer is not None and layer.op in ("conv", "linear") and len(layer.modules) == 1:
            self.overwritten.add(layer.modules[0])
        self.env[target] = result

    # ---- the walk

    def run(self) -> Tuple[Ref, Any]:
        """Lower every node; returns (logits, the forward's feats dict or None)."""
        for node in self.fx_graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = Ref(INPUT) if node.meta.get("value") is not None else None
            elif node.op == "get_attr":
                self.env[node] = Const(node)
            elif node.op == "output":
                return self._outputs(node.args[0])
            else:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._value)
                if not _refs((args, kwargs)):
                    self.env[node] = Const(node)
                    continue
                self.env[node] = self._lower(node, args, kwargs)
                names = self.tracer.outputs.get(node, [])[1:] + ([node.name] if node.op != "call_module" else [])
                for name in names:
                    for ref in _refs(self.env[node])[:1]:
                        self.aliases.setdefault(name, ref.key)
        raise self.error("the forward returns nothing")

    def _value(self, node: fx.Node) -> Any:
        return self.env[node]

    def _lower(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_module":
            module = self.model.get_submodule(node.target)
            rule = MODULE_RULES.get(type(module))
            if rule is None:
                raise self.no_rule()
            if kwargs or len(args) != 1 or not isinstance(args[0], Ref):
                raise self.error(f"{type(module).__name__} takes one traced tensor")
            result = rule.lower(self, node.target, module, args[0])
            if getattr(module, "inplace", False) and isinstance(node.args[0], fx.Node):
                self.in_place(node.args[0], result)
            return result
        rule = FUNCTION_RULES.get(node.target)
        if rule is None:
            raise self.no_rule()
        result = rule(self, *args, **kwargs)
        name = getattr(node.target, "__name__", node.target)
        in_place = kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("__"))
        if in_place and node.args and isinstance(node.args[0], fx.Node):
            self.in_place(node.args[0], result)
        return result

    def _outputs(self, out: Any) -> Tuple[Ref, Any]:
        out = fx.node.map_arg(out, self._value)
        logits, feats = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, (tuple, list)) else (out, None)
        if not isinstance(logits, Ref):
            raise GraphError(f"explain: cannot build the relevance graph of {type(self.model).__name__}: its forward "
                             f"must return logits (or (logits, feats)) computed from the input")
        return logits, feats if isinstance(feats, dict) else None


def _refs(tree: Any) -> List[Ref]:
    found: List[Ref] = []
    fx.node.map_aggregate(tree, lambda a: found.append(a) if isinstance(a, Ref) else None)
    return found


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    if isinstance(value, (nn.Module, Const)) or callable(value):
        return ("object", id(value))
    return value


def _qualified(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    if module.startswith("torch._C"):
        module = "torch"
    return f"{module}.{getattr(fn, '__name__', fn)}"


# ---------------------------------------------------------------------------------------------- module rules


@dataclass(frozen=True)
class ModuleRule:
    """How a leaf module becomes ops (`lower(lowering, name, module, x) -> Ref`) and what shape it outputs
    (`meta(module, x)` on the meta device)."""

    lower: Callable[[Lowering, str, nn.Module, Ref], Ref]
    meta: Callable[..., Tensor] = lambda module, x: x  # noqa: E731 - shape-preserving


def _conv_meta(module: nn.Conv2d, x: Tensor) -> Tensor:
    return F.conv2d(x, _meta(module.weight), None, module.stride, module.padding, module.dilation, module.groups)


def _lower_conv(lowering: Lowering, name: str, module: nn.Conv2d, x: Ref) -> Ref:
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise lowering.error(f"{name} is {module!r}; expected zero padding given as numbers")
    return lowering.emit("conv", [x], modules=(name,), role="first" if x.key == INPUT else "conv", cse=False,
                         stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)


def _lower_linear(lowering: Lowering, name: str, module: nn.Module, x: Ref) -> Ref:
    return lowering.emit("linear", [x], modules=(name,), role="first" if x.key == INPUT else "linear", cse=False,
                         in_shape=lowering.shape(x), out_shape=lowering.shape())


def _lower_batchnorm(lowering: Lowering, name: str, module: nn.Module, x: Ref, key: Optional[str] = None) -> Ref:
    """Folded into the conv / linear layer right before it when that layer's output has no other reader (the
    forward's outputs count: a stage that is a conv output keeps its BatchNorm apart), else a per-channel affine map
    (a depthwise 1x1 conv) with the composite's "bn" rule."""
    key = key or lowering.key
    layer = lowering.producer(x)
    source = lowering.node.args[0]
    readers = list(source.users) if isinstance(source, fx.Node) else []
    if (layer is not None and layer.op in ("conv", "linear") and len(layer.modules) == 1 and readers == [lowering.node]
            and lowering.origin.get(layer.output) is source
            and not is_batchnorm(lowering.model.get_submodule(layer.modules[0]))):
        shapes = lowering.builder.shapes
        new = lowering.builder.fresh(key)
        shapes[new] = shapes.pop(layer.output)
        layer.output, layer.modules = new, (*layer.modules, name)
        return Ref(new)
    return lowering.emit("conv", [x], key=key, modules=(name,), role="bn", cse=False, stride=(1, 1), padding=(0, 0),
                         dilation=(1, 1), groups=module.num_features)


ACTIVATION_MODULES: Dict[Type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
}


def _act(lowering: Lowering, x: Ref, kind: str, approximate: str = "none", key: Optional[str] = None) -> Ref:
    attrs = {"approximate": approximate} if kind == "gelu" else {}
    return lowering.emit("act", [x], key=key, kind=kind, **attrs)


def _activation_module(kind: str) -> ModuleRule:
    return ModuleRule(lambda lowering, name, module, x: _act(lowering, x, kind, getattr(module, "approximate", "none")))


def _random(lowering: Lowering, name: str, active: bool, x: Ref) -> Ref:
    """Dropout-like ops: the identity unless they are random (training mode, p > 0), which is refused."""
    if active:
        raise lowering.error(f"{name} is a Dropout in training mode (random, not in the graph); call .eval() on the "
                             f"model or set p=0")
    return x


def _lower_dropout(lowering: Lowering, name: str, module: nn.Module, x: Ref) -> Ref:
    return _random(lowering, name, module.training and module.p > 0, x)


def _pool(lowering: Lowering, x: Ref, pool: nn.Module) -> Ref:
    """Average pooling; a pooling of the whole map to 1x1 is the global mean ("gap", keeping the 1x1 dims)."""
    in_shape, out_shape = lowering.shape(x), lowering.shape()
    whole = isinstance(pool, nn.AdaptiveAvgPool2d) or (
        _pair(pool.kernel_size) == tuple(in_shape[1:]) and _pair(pool.padding) == (0, 0))
    if len(in_shape) == 3 and out_shape[1:] == (1, 1) and whole:
        return lowering.emit("gap", [x], keepdim=True)
    return lowering.emit("avgpool", [x], pool=pool)


def _pair(value: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _lower_maxpool(lowering: Lowering, name: str, module: nn.MaxPool2d, x: Ref) -> Ref:
    if module.return_indices:
        raise lowering.error(f"{name} returns indices")
    return lowering.emit("maxpool", [x], pool=module)


def _reshape(lowering: Lowering, x: Ref) -> Ref:
    """A batch-keeping reshape; none at all where the shape does not change."""
    shape = lowering.shape()
    return x if shape == lowering.shape(x) else lowering.emit("reshape", [x], size=shape)


def _lower_layer_norm(lowering: Lowering, name: str, module: nn.LayerNorm, x: Ref) -> Ref:
    if len(module.normalized_shape) != 1:
        raise lowering.error(f"{name} normalises {module.normalized_shape}; only the last dimension is supported")
    affine = module.weight is not None
    return lowering.emit("norm", [x], modules=(name,), role="bn", cse=False, eps=module.eps,
                         weight=_Attribute(f"{name}.weight") if affine else None,
                         bias=_Attribute(f"{name}.bias") if module.bias is not None else None)


@dataclass(frozen=True)
class _Attribute:
    """A parameter read from the live model by its qualified name."""

    target: str

    def __call__(self, model: nn.Module) -> Tensor:
        return _fetch(model, self.target)


MODULE_RULES: Dict[type, ModuleRule] = {
    nn.Conv2d: ModuleRule(_lower_conv, _conv_meta),
    FoldedConv2d: ModuleRule(_lower_conv, _conv_meta),
    nn.Linear: ModuleRule(_lower_linear, lambda module, x: F.linear(x, _meta(module.weight))),
    nn.BatchNorm2d: ModuleRule(_lower_batchnorm),
    FoldedBatchNorm2d: ModuleRule(_lower_batchnorm),
    nn.LayerNorm: ModuleRule(_lower_layer_norm),
    nn.MaxPool2d: ModuleRule(_lower_maxpool, lambda module, x: module.forward(x)),
    nn.AvgPool2d: ModuleRule(lambda lowering, name, module, x: _pool(lowering, x, module),
                             lambda module, x: module.forward(x)),
    nn.AdaptiveAvgPool2d: ModuleRule(lambda lowering, name, module, x: _pool(lowering, x, module),
                                     lambda module, x: module.forward(x)),
    nn.Flatten: ModuleRule(lambda lowering, name, module, x: _reshape(lowering, x),
                           lambda module, x: module.forward(x)),
    nn.Identity: ModuleRule(lambda lowering, name, module, x: x),
    **{cls: ModuleRule(_lower_dropout) for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)},
    **{cls: _activation_module(kind) for cls, kind in ACTIVATION_MODULES.items()},
}


def register_leaf(cls: type, like: type) -> None:
    """Treat modules of `cls` as leaves computing what modules of the torch.nn class `like` compute (same
    attributes: a Conv2d-like class needs weight, bias, stride, ...), so their forward is not traced."""
    if like not in MODULE_RULES:
        raise ValueError(f"register_leaf: {like.__name__} has no rule; expected one of "
                         f"{sorted(c.__name__ for c in MODULE_RULES)}")
    MODULE_RULES[cls] = MODULE_RULES[like]


def _register_timm() -> None:
    """Rules for timm's leaf modules, added once timm is in use: BatchNormAct2d (BatchNorm, then its drop and act
    modules) and DropPath."""
    if "timm" not in sys.modules:
        return
    from timm.layers import DropPath
    from timm.layers.norm_act import BatchNormAct2d

    if BatchNormAct2d in MODULE_RULES:
        return

    def lower_bn_act(lowering: Lowering, name: str, module: nn.Module, x: Ref) -> Ref:
        y = _lower_batchnorm(lowering, name, module, x, key=f"{lowering.key}.bn")
        for part in ("drop", "act"):
            child = getattr(module, part)
            rule = MODULE_RULES.get(type(child))
            if rule is None:
                raise lowering.error(f"no rule for {name}.{part} ({type(child).__name__})")
            y = rule.lower(lowering, f"{name}.{part}", child, y)
        return y

    MODULE_RULES[BatchNormAct2d] = ModuleRule(lower_bn_act)
    MODULE_RULES[DropPath] = ModuleRule(
        lambda lowering, name, module, x: _random(lowering, name, module.training and module.drop_prob > 0, x))


# ---------------------------------------------------------------------------------------------- function rules


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Positional and keyword arguments of a call by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _activation(kind: str) -> Callable[..., Ref]:
    def lower(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
        approximate = _bind(args, kwargs, ("approximate",), {"approximate": "none"})["approximate"] \
            if kind == "gelu" else "none"
        return _act(lowering, x, kind, approximate)

    return lower


def _add(lowering: Lowering, a: Any, b: Any, alpha: Any = 1) -> Ref:
    if not (isinstance(a, Ref) and isinstance(b, Ref)) or alpha != 1:
        raise lowering.error("a sum must add two traced tensors (a constant would be a bias)")
    if lowering.shape(a) != lowering.shape(b):
        raise lowering.error("a sum must add tensors of the same shape")
    return lowering.emit("add", [a, b])


def _mul(lowering: Lowering, a: Any, b: Any) -> Ref:
    """A product with a constant is a scale; of two traced tensors, a signal times a gate: the gate is the operand
    broadcast over the other, or else the one made by a sigmoid-like gate activation."""
    if not (isinstance(a, Ref) and isinstance(b, Ref)):
        x, factor = (a, b) if isinstance(a, Ref) else (b, a)
        return _scale(lowering, x, factor, divide=False)
    out, shapes = lowering.shape(), (lowering.shape(a), lowering.shape(b))
    gates = [shape != out for shape in shapes]
    if all(gates) or len(shapes[0]) != len(shapes[1]):
        raise lowering.error("a product must keep one operand's shape")
    if not any(gates):
        kinds = [getattr(lowering.producer(x), "attrs", {}).get("kind") for x in (a, b)]
        gates = [kind in ("sigmoid", "hardsigmoid") for kind in kinds]
        if sum(gates) != 1:
            raise lowering.error("cannot tell the signal from the gate of a product of two same-shaped tensors")
    signal, gate = (b, a) if gates[0] else (a, b)
    return lowering.emit("mul", [signal, gate])


def _scale(lowering: Lowering, x: Ref, factor: Any, divide: bool) -> Ref:
    shape = lowering.shape()
    if shape != lowering.shape(x) or isinstance(factor, Ref):
        raise lowering.error("a scale factor must not change the shape")
    return lowering.emit("scale", [x], factor=factor, divide=divide)


def _div(lowering: Lowering, a: Any, b: Any, rounding_mode: Any = None) -> Ref:
    if not isinstance(a, Ref) or isinstance(b, Ref) or rounding_mode is not None:
        raise lowering.error("only a traced tensor divided by a constant is supported")
    return _scale(lowering, a, b, divide=True)


def _cat(lowering: Lowering, tensors: Sequence[Any], dim: int = 0) -> Ref:
    rank = len(lowering.shape()) + 1
    dim = dim % rank
    if dim == 0 or not all(isinstance(t, Ref) for t in tensors):
        raise lowering.error("concatenation must join traced tensors along a non-batch dimension")
    return lowering.emit("cat", list(tensors), dim=dim)


def _getitem(lowering: Lowering, value: Any, index: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return value[index]
    index = index if isinstance(index, tuple) else (index,)
    allowed = all(isinstance(i, (slice, int)) or i is Ellipsis for i in index)
    if not allowed or not index or not (index[0] == slice(None) or (index[0] is Ellipsis and len(index) > 1)):
        raise lowering.error(f"only a basic slice keeping the batch is supported, got {index!r}")
    return lowering.emit("index", [value], index=index)


def _split(lowering: Lowering, x: Ref, split: Any, dim: int = 0) -> Tuple[Ref, ...]:
    """split / chunk: one slice per part, sized as traced."""
    rank = len(lowering.shape(x)) + 1
    dim = dim % rank
    if dim == 0:
        raise lowering.error("splitting along the batch is not supported")
    parts, start, refs = lowering.node.meta["value"], 0, []
    for i, part in enumerate(parts):
        size = part.shape[dim]
        index = (slice(None),) * dim + (slice(start, start + size),)
        refs.append(lowering.emit("index", [x], key=f"{lowering.key}.{i}", shape=tuple(part.shape[1:]), index=index))
        start += size
    return tuple(refs)


def _permute(lowering: Lowering, x: Ref, *dims: Any) -> Ref:
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    rank = len(lowering.shape(x)) + 1
    dims = tuple(d % rank for d in dims)
    if dims[0] != 0:
        raise lowering.error("a permutation must keep the batch first")
    return lowering.emit("permute", [x], dims=dims)


def _transpose(lowering: Lowering, x: Ref, dim0: int, dim1: int) -> Ref:
    dims = list(range(len(lowering.shape(x)) + 1))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return _permute(lowering, x, dims)


def _mean(lowering: Lowering, x: Ref, dim: Any = None, keepdim: bool = False, **kwargs: Any) -> Ref:
    """The spatial mean of a [B, C, H, W] tensor is the global average pooling."""
    rank = len(lowering.shape(x)) + 1
    dims = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else [dim])} if dim is not None else None
    if rank != 4 or dims != {2, 3} or kwargs.get("dtype") is not None:
        raise lowering.error("only the spatial mean of a [B, C, H, W] tensor is supported")
    return lowering.emit("gap", [x], keepdim=keepdim)


def _max_pool(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
    a = _bind(args, kwargs, ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
              {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    if a["return_indices"]:
        raise lowering.error("max pooling returning indices is not supported")
    pool = nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])
    return lowering.emit("maxpool", [x], pool=pool)


def _avg_pool(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
    a = _bind(args, kwargs, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
              {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
    return _pool(lowering, x, nn.AvgPool2d(**a))


def _adaptive_avg_pool(lowering: Lowering, x: Ref, output_size: Any) -> Ref:
    return _pool(lowering, x, nn.AdaptiveAvgPool2d(output_size))


def _dropout(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
    a = _bind(args, kwargs, ("p", "training", "inplace"), {"p": 0.5, "training": True})
    return _random(lowering, "dropout", a["training"] and a["p"] > 0, x)


def _stochastic_depth(lowering: Lowering, x: Ref, p: float, mode: str, training: bool = True) -> Ref:
    return _random(lowering, "stochastic_depth", training and p > 0, x)


def _layer_norm(lowering: Lowering, x: Ref, normalized_shape: Any, weight: Any = None, bias: Any = None,
                eps: float = 1e-5) -> Ref:
    if len(tuple(normalized_shape)) != 1 or isinstance(weight, Ref) or isinstance(bias, Ref):
        raise lowering.error("only a LayerNorm over the last dimension with constant parameters is supported")
    return lowering.emit("norm", [x], role="bn", cse=False, eps=eps, weight=weight, bias=bias)


def _owner(lowering: Lowering, weight: Any, bias: Any, cls: type) -> str:
    """The module whose weight (and bias) a functional conv / linear reads."""
    if not isinstance(weight, Const) or weight.node.op != "get_attr" or not weight.node.target.endswith(".weight"):
        raise lowering.error("a functional layer must read a module's own weight")
    name = weight.node.target[: -len(".weight")]
    module = lowering.model.get_submodule(name)
    own_bias = bias is None if module.bias is None else (
        isinstance(bias, Const) and bias.node.op == "get_attr" and bias.node.target == f"{name}.bias")
    if not isinstance(module, cls) or not own_bias:
        raise lowering.error(f"a functional layer must read the weight and bias of one {cls.__name__}")
    return name


def _linear(lowering: Lowering, x: Ref, weight: Any, bias: Any = None) -> Ref:
    name = _owner(lowering, weight, bias, nn.Linear)
    return _lower_linear(lowering, name, lowering.model.get_submodule(name), x)


def _conv2d(lowering: Lowering, x: Ref, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
            dilation: Any = 1, groups: int = 1) -> Ref:
    name = _owner(lowering, weight, bias, nn.Conv2d)
    if isinstance(padding, str):
        raise lowering.error("padding given as a string is not supported")
    return lowering.emit("conv", [x], modules=(name,), role="first" if x.key == INPUT else "conv", cse=False,
                         stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=groups)


def _reshape_call(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
    return _reshape(lowering, x)


def _identity(lowering: Lowering, x: Ref, *args: Any, **kwargs: Any) -> Ref:
    return x


FunctionRule = Callable[..., Any]
FUNCTION_RULES: Dict[Any, FunctionRule] = {
    **{fn: _activation("relu") for fn in (F.relu, torch.relu, torch.relu_, "relu", "relu_")},
    **{fn: _activation("relu6") for fn in (F.relu6,)},
    **{fn: _activation("silu") for fn in (F.silu,)},
    **{fn: _activation("gelu") for fn in (F.gelu,)},
    **{fn: _activation("hardswish") for fn in (F.hardswish,)},
    **{fn: _activation("hardsigmoid") for fn in (F.hardsigmoid,)},
    **{fn: _activation("sigmoid") for fn in (torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_")},
    **{fn: _activation("tanh") for fn in (torch.tanh, F.tanh, "tanh", "tanh_")},
    **{fn: _add for fn in (operator.add, operator.iadd, torch.add, "add", "add_")},
    **{fn: _mul for fn in (operator.mul, operator.imul, torch.mul, "mul", "mul_")},
    **{fn: _div for fn in (operator.truediv, operator.itruediv, torch.div, "div", "div_")},
    **{fn: _cat for fn in (torch.cat, torch.concat, torch.concatenate)},
    operator.getitem: _getitem,
    **{fn: _split for fn in (torch.split, "split")},
    **{fn: (lambda lowering, x, chunks, dim=0: _split(lowering, x, chunks, dim)) for fn in (torch.chunk, "chunk")},
    **{fn: _reshape_call for fn in (torch.reshape, "reshape", "view", torch.flatten, "flatten", torch.squeeze,
                                    "squeeze", torch.unsqueeze, "unsqueeze", torch.unflatten, "unflatten")},
    **{fn: _permute for fn in (torch.permute, "permute")},
    **{fn: _transpose for fn in (torch.transpose, "transpose")},
    **{fn: _identity for fn in ("contiguous",)},
    **{fn: _mean for fn in (torch.mean, "mean")},
    F.max_pool2d: _max_pool,
    F.avg_pool2d: _avg_pool,
    F.adaptive_avg_pool2d: _adaptive_avg_pool,
    **{fn: _dropout for fn in (F.dropout, F.dropout1d, F.dropout2d)},
    torchvision.ops.stochastic_depth: _stochastic_depth,
    F.layer_norm: _layer_norm,
    F.linear: _linear,
    F.conv2d: _conv2d,
}


# ---------------------------------------------------------------------------------------------- the graph


def _finish(lowering: Lowering, logits: Ref, feats: Optional[Dict[str, Any]]) -> Graph:
    """Cut the graph at the classifier (dropping what does not lead to the logits), make a 1x1-conv classifier a
    linear one, and find the global average pooling in front of it."""
    builder, model = lowering.builder, lowering.model
    producers = {node.output: node for node in builder.nodes}
    classifier = producers.get(logits.key)
    while classifier is not None and classifier.op == "reshape":
        classifier = producers.get(classifier.inputs[0])
    name = type(model).__name__
    if classifier is None or classifier.op not in ("linear", "conv") or not classifier.modules \
            or is_batchnorm(model.get_submodule(classifier.modules[0])):
        raise GraphError(f"explain: cannot build the relevance graph of {name}: the logits must come from a Linear "
                         f"(or 1x1 Conv2d) classifier")
    nodes = _ancestors(builder.nodes, classifier)
    shapes = builder.shapes
    if classifier.op == "conv":
        _conv_classifier(nodes, classifier, shapes, name)
    _merge_flattened_pools(nodes, shapes)
    gap, pooled, cam_error = _head(nodes, name)
    keys = {node.output for node in nodes} | {INPUT}
    aliases = {alias: key for alias, key in lowering.aliases.items() if key in keys and alias not in keys}
    if pooled is not None:
        aliases.setdefault("pooled_feat", pooled)
    stages = [ref.key if isinstance(ref, Ref) and ref.key in keys else None
              for ref in (feats or {}).get("feats", [])]
    gap_feat = (feats or {}).get("gap_feat")
    if isinstance(gap_feat, Ref) and gap is not None and gap_feat.key != gap:
        raise GraphError(f"explain: cannot build the relevance graph of {name}: feats['gap_feat'] ({gap_feat.key}) "
                         f"is not the tensor pooled into the classifier ({gap})")
    return Graph(weakref.ref(model), nodes, stages, gap, pooled, cam_error, nonneg_keys(nodes), aliases,
                 {key: shapes[key] for key in keys - {INPUT}}, lowering.overwritten)


def _ancestors(nodes: List[Node], last: Node) -> List[Node]:
    needed, kept = {last.output}, []
    for node in reversed(nodes[: nodes.index(last) + 1]):
        if node.output in needed:
            kept.append(node)
            needed.update(node.inputs)
    return kept[::-1]


def _readers(nodes: List[Node]) -> Dict[str, int]:
    count: Dict[str, int] = {}
    for node in nodes:
        for key in node.inputs:
            count[key] = count.get(key, 0) + 1
    return count


def _conv_classifier(nodes: List[Node], classifier: Node, shapes: Dict[str, Tuple[int, ...]], name: str) -> None:
    """A 1x1 conv on a 1x1 map as the classifier is a Linear on the flattened map."""
    in_shape = shapes.get(classifier.inputs[0])
    if in_shape is None or in_shape[1:] != (1, 1) or shapes[classifier.output][1:] != (1, 1):
        raise GraphError(f"explain: cannot build the relevance graph of {name}: the logits must come from a Linear "
                         f"(or 1x1 Conv2d) classifier; {classifier.modules[0]} is a convolution over a map")
    source = next((node for node in nodes if node.output == classifier.inputs[0]), None)
    if source is not None and source.op == "gap" and _readers(nodes)[source.output] == 1:
        source.attrs["keepdim"] = False
        shapes[source.output] = in_shape[:1]
        flat = source.output
    else:
        flat = f"{classifier.inputs[0]}.flat"
        shapes[flat] = in_shape[:1]
        nodes.insert(nodes.index(classifier), Node("reshape", classifier.inputs, flat, attrs={"size": in_shape[:1]}))
    classifier.op, classifier.inputs, classifier.role = "linear", (flat,), "linear"
    classifier.attrs = {"in_shape": in_shape[:1], "out_shape": shapes[classifier.output][:1]}
    shapes[classifier.output] = shapes[classifier.output][:1]


def _merge_flattened_pools(nodes: List[Node], shapes: Dict[str, Tuple[int, ...]]) -> None:
    """gap(keepdim) read only by a flatten to [B, C] is gap without keepdim (one op, as pooled_feat)."""
    readers = _readers(nodes)
    producers = {node.output: node for node in nodes}
    for node in list(nodes):
        source = producers.get(node.inputs[0]) if node.inputs else None
        if (node.op == "reshape" and source is not None and source.op == "gap" and source.attrs["keepdim"]
                and readers[source.output] == 1 and shapes[node.output] == shapes[source.output][:1]):
            source.attrs["keepdim"] = False
            shapes[source.output] = shapes[node.output]
            nodes.remove(node)
            for other in nodes:
                other.inputs = tuple(source.output if key == node.output else key for key in other.inputs)


def _head(nodes: List[Node], name: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(gap, pooled, cam_error): the tensor whose spatial mean the classifier reads through single-input ops, that
    mean, and why CAM is undefined there (an op after the pooling that is not linear with its statistics held
    fixed)."""
    producers = {node.output: node for node in nodes}
    key, cam_error = nodes[-1].inputs[0], None
    while key in producers:
        node = producers[key]
        if node.op == "gap":
            return node.inputs[0], node.output, cam_error
        if len(node.inputs) != 1 or node.op not in LINEAR_HEAD_OPS + ("act",):
            return None, None, None
        if node.op == "act":
            cam_error = (f"explain method='cam': {name}'s head applies {node.attrs['kind']} ({node.output}) after the "
                         f"global pooling, so the logits are not linear in the pooled tensor; use method='gradcam'")
        key = node.inputs[0]
    return None, None, None


_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> Tuple:
    return tuple((type(m), m.training) for m in model.modules()), len(MODULE_RULES)


def _same_modules(refs: Sequence["weakref.ref"], model: nn.Module) -> bool:
    modules = list(model.modules())
    return len(refs) == len(modules) and all(ref() is m for ref, m in zip(refs, modules))


def build_graph(model: nn.Module, image_shape: Sequence[int]) -> Graph:
    """The relevance graph of `model` for inputs of `image_shape` (B, C, H, W); cached per model, per-sample shape
    and train / eval mode (module replacements rebuild it)."""
    _register_timm()
    dtype = next(model.parameters()).dtype
    key = (tuple(image_shape[1:]), dtype, _signature(model))
    cached = _CACHE.setdefault(model, OrderedDict())
    if key in cached and _same_modules(cached[key][0], model):
        cached.move_to_end(key)
        return cached[key][1]
    graph = _trace(model, image_shape, dtype)
    cached[key] = ([weakref.ref(m) for m in model.modules()], graph)
    while len(cached) > CACHE_SIZE:
        cached.popitem(last=False)
    return graph


def cached_graph(model: nn.Module, accept: Callable[[Graph], bool] = lambda graph: True) -> Optional[Graph]:
    """The most recently built graph of `model` in its present modules and mode (any input shape) that `accept`s."""
    signature = _signature(model)
    for (_, _, sig), (refs, graph) in reversed(list(_CACHE.get(model, {}).items())):
        if sig == signature and _same_modules(refs, model) and accept(graph):
            return graph
    return None


def _trace(model: nn.Module, image_shape: Sequence[int], dtype: torch.dtype) -> Graph:
    name = type(model).__name__
    tracer = Tracer(model, image_shape, dtype)
    try:
        fx_graph = tracer.trace(model)
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes the one-line reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphError(f"explain: cannot trace {name} with torch.fx ({type(e).__name__}: {reason}); see "
                         f"docs/explain.md, 'Tracing'") from e
    lowering = Lowering(model, tracer, fx_graph)
    logits, feats = lowering.run()
    return _finish(lowering, logits, feats)
