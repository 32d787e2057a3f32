"""The relevance graph: the ordered ops of one model's forward, each naming the tensors it reads and writes.

Adapters (`adapters.py`) write a model's forward once more with a `GraphBuilder`, op by op, including what the model
does functionally (`F.relu`, `+`, `torch.cat`, channel shuffles, `F.avg_pool2d`), so the engine can both re-run the
forward and send relevance or gradients back through every op. Ops:

- "conv" / "linear": a Conv2d / Linear, optionally followed by the BatchNorm folded into it; a BatchNorm alone is a
  depthwise 1x1 "conv" whose parameters are its affine map (role "bn").
- "act" (relu, relu6), "add", "cat", "slice" (one side of a channel split), "shuffle" (channel shuffle),
  "avgpool", "maxpool", "gap" (spatial mean to [B, C]), "flatten".

What the engine does with each op (forward, recomputation, relevance and gradient) is its object in `ops.OPS`.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch.nn as nn

from .batchnorm import is_batchnorm

INPUT = "input"
NONNEG_OPS = ("act",)
INHERIT_OPS = ("add", "cat", "slice", "shuffle", "avgpool", "maxpool", "gap", "flatten")


@dataclass
class Node:
    op: str
    inputs: Tuple[str, ...]
    output: str
    modules: Tuple[str, ...] = ()
    role: str = ""
    attrs: Dict[str, object] = field(default_factory=dict)


@dataclass
class Graph:
    """Nodes in forward order; the last is the classifier. `gap` is the key of the tensor whose spatial mean feeds
    the classifier (None if the head is not GAP + linear), `stages` the keys of `feats["feats"]`."""

    model: nn.Module
    nodes: List[Node]
    stages: List[str]
    gap: Optional[str]
    nonneg: Set[str]

    @property
    def head(self) -> Node:
        return self.nodes[-1]

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def keys(self) -> List[str]:
        return [INPUT] + [node.output for node in self.nodes]

    def resolve(self, layer: Union[str, int]) -> str:
        """"gap", "input", a stage index (int or digit string, negative allowed) or a tensor key (module name)."""
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        if isinstance(layer, int):
            if not -len(self.stages) <= layer < len(self.stages):
                raise ValueError(f"explain layer={layer}: {type(self.model).__name__} has {len(self.stages)} stages")
            return self.stages[layer]
        if layer == "gap":
            if self.gap is None:
                raise ValueError(f"explain layer='gap': {type(self.model).__name__} has no global-average-pooling "
                                 f"head; use 'input', a stage index or one of {self.keys()[:8]}...")
            return self.gap
        if layer not in self.keys():
            raise ValueError(f"explain layer={layer!r}: not a tensor of {type(self.model).__name__}; expected 'gap', "
                             f"'input', a stage index or one of {self.keys()}")
        return layer


class GraphBuilder:
    """Records ops in call order; each method returns the key of the op's output tensor."""

    def __init__(self, model: nn.Module, image_shape: Sequence[int]):
        self.model = model
        self.image_shape = tuple(image_shape)
        self.nodes: List[Node] = []
        self.stages: List[str] = []
        self.gap_key: Optional[str] = None
        self._keys = {INPUT}

    def _add(self, op: str, inputs: Sequence[str], name: Optional[str], modules: Sequence[str] = (),
             role: str = "", **attrs: object) -> str:
        key = name or (modules[-1] if modules else f"{op}{len(self.nodes)}")
        if key in self._keys:
            raise ValueError(f"relevance graph of {type(self.model).__name__}: tensor key {key!r} defined twice")
        for x in inputs:
            if x not in self._keys:
                raise ValueError(f"relevance graph of {type(self.model).__name__}: {op} reads unknown tensor {x!r}")
        self._keys.add(key)
        self.nodes.append(Node(op, tuple(inputs), key, tuple(modules), role, dict(attrs)))
        return key

    def conv(self, x: str, conv: str, bn: Optional[str] = None, name: Optional[str] = None) -> str:
        """A Conv2d or Linear module (by qualified name), with the BatchNorm that directly follows it folded in."""
        module = self.model.get_submodule(conv)
        modules = (conv,) if bn is None else (conv, bn)
        if isinstance(module, nn.Linear):
            return self._add("linear", [x], name, modules, role="first" if x == INPUT else "linear")
        if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(f"relevance graph: {conv} is {module!r}; expected a Linear or a zero-padded Conv2d "
                             f"with numeric padding")
        return self._add("conv", [x], name, modules, role="first" if x == INPUT else "conv", stride=module.stride,
                         padding=module.padding, dilation=module.dilation, groups=module.groups)

    def bn(self, x: str, bn: str, name: Optional[str] = None) -> str:
        """A BatchNorm that no linear layer precedes directly: a per-channel affine map (depthwise 1x1 conv)."""
        channels = self.model.get_submodule(bn).num_features
        return self._add("conv", [x], name, (bn,), role="bn", stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                         groups=channels)

    def act(self, x: str, kind: str = "relu", name: Optional[str] = None) -> str:
        return self._add("act", [x], name, kind=kind)

    def relu(self, x: str, name: Optional[str] = None) -> str:
        return self.act(x, "relu", name)

    def add(self, a: str, b: str, name: Optional[str] = None) -> str:
        return self._add("add", [a, b], name)

    def cat(self, xs: Sequence[str], name: Optional[str] = None) -> str:
        return self._add("cat", xs, name)

    def split(self, x: str, ratio: float) -> Tuple[str, str]:
        """The first int(C·ratio) channels and the rest (ShuffleNetV2's SplitBlock)."""
        return self._add("slice", [x], None, ratio=ratio, part=0), self._add("slice", [x], None, ratio=ratio, part=1)

    def shuffle(self, x: str, groups: int, name: Optional[str] = None) -> str:
        return self._add("shuffle", [x], name, groups=groups)

    def avgpool(self, x: str, module: str, name: Optional[str] = None) -> str:
        """An AvgPool2d or AdaptiveAvgPool2d module (its hyper-parameters; it has no state)."""
        return self._add("avgpool", [x], name or module, pool=self.model.get_submodule(module))

    def maxpool(self, x: str, module: str, name: Optional[str] = None) -> str:
        return self._add("maxpool", [x], name or module, pool=self.model.get_submodule(module))

    def flatten(self, x: str, name: Optional[str] = None) -> str:
        return self._add("flatten", [x], name)

    def gap_head(self, x: str, classifier: str) -> str:
        """Global average pooling of `x` into the classifier (a Linear or a 1x1 Conv2d used as one)."""
        self.gap_key = x
        pooled = self._add("gap", [x], "pooled_feat")
        return self.head(pooled, classifier)

    def head(self, x: str, classifier: str) -> str:
        module = self.model.get_submodule(classifier)
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            raise ValueError(f"relevance graph: classifier {classifier} is {module!r}; expected Linear or 1x1 Conv2d")
        return self._add("linear", [x], classifier, (classifier,), role="linear")

    def sequential(self, x: str, prefix: str) -> str:
        """Walk an nn.Sequential of standard layers (folding each BatchNorm into the conv right before it)."""
        children = list(self.model.get_submodule(prefix).named_children())
        i = 0
        while i < len(children):
            child_name, child = children[i]
            name = f"{prefix}.{child_name}"
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                follows = children[i + 1][1] if i + 1 < len(children) else None
                if is_batchnorm(follows):
                    x = self.conv(x, name, f"{prefix}.{children[i + 1][0]}")
                    i += 1
                else:
                    x = self.conv(x, name)
            elif is_batchnorm(child):
                x = self.bn(x, name)
            elif isinstance(child, (nn.ReLU, nn.ReLU6)):
                x = self.act(x, "relu6" if isinstance(child, nn.ReLU6) else "relu", name)
            elif isinstance(child, (nn.MaxPool2d,)):
                x = self.maxpool(x, name)
            elif isinstance(child, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                x = self.avgpool(x, name)
            elif isinstance(child, nn.Flatten):
                x = self.flatten(x, name)
            elif isinstance(child, nn.Sequential):
                x = self.sequential(x, name)
            elif isinstance(child, nn.Dropout):
                if child.training and child.p > 0:
                    raise ValueError(f"relevance graph: {name} is a Dropout in training mode (random, not in the "
                                     f"graph); call .eval() on the model or set p=0")
            elif not isinstance(child, nn.Identity):
                raise ValueError(f"relevance graph: no rule for {name} ({type(child).__name__}) in {prefix}")
            i += 1
        return x

    def build(self) -> Graph:
        if not self.nodes or self.nodes[-1].op != "linear":
            raise ValueError(f"relevance graph of {type(self.model).__name__}: must end with the classifier")
        nonneg: Set[str] = set()
        for node in self.nodes:
            if node.op in NONNEG_OPS or (node.op in INHERIT_OPS and all(x in nonneg for x in node.inputs)):
                nonneg.add(node.output)
        return Graph(self.model, self.nodes, self.stages, self.gap_key, nonneg)
