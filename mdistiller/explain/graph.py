"""The relevance graph: the ordered ops of one model's forward, each naming the tensors it reads and writes.

`trace.build_graph` makes it by tracing the model with torch.fx, so the engine can both re-run the forward and send
relevance or gradients back through every op. Ops (what the engine does with each is its object in `ops.OPS`):

- "conv" / "linear": a Conv2d / Linear, optionally followed by the BatchNorm folded into it; a BatchNorm alone is a
  depthwise 1x1 "conv" whose parameters are its affine map (role "bn").
- "norm": a LayerNorm over the last dimension (role "bn": an affine map with the sample's statistics held fixed).
- "act" (relu, relu6, silu, gelu, hardswish, hardsigmoid, sigmoid, tanh), "add", "mul" (a signal times a gate),
  "scale" (times a constant or a parameter), "cat", "index" (a slice), "reshape", "permute", "avgpool", "maxpool",
  "gap" (the spatial mean).
"""
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch.nn as nn

INPUT = "input"
NONNEG_ACTS = ("relu", "relu6", "sigmoid", "hardsigmoid")
# ops whose output is non-negative where every input is (then z+ rules need no negative-input term)
INHERIT_OPS = ("add", "mul", "cat", "index", "reshape", "permute", "avgpool", "maxpool", "gap")


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
    """Nodes in forward order; the last is the classifier.

    `gap`: the key of the tensor whose spatial mean feeds the classifier (None if the logits do not come from a
    global average pooling), `pooled` the key of that mean. `head`: the ops from the pooling to the classifier;
    `cam_error` says why CAM is not defined there (None: the classifier is linear in the pooled tensor, normaliser
    scales held fixed). `stages`: the keys of `feats["feats"]` (None for a stage that does not lead to the logits).
    `aliases`: further names (enclosing modules, fx nodes) of tensors; `shapes` their per-sample shapes.
    `overwritten`: the conv / linear modules whose output the forward overwrites in place (a tape keeps a copy)."""

    model_ref: "weakref.ref[nn.Module]"
    nodes: List[Node]
    stages: List[Optional[str]]
    gap: Optional[str]
    pooled: Optional[str]
    cam_error: Optional[str]
    nonneg: Set[str]
    aliases: Dict[str, str]
    shapes: Dict[str, Tuple[int, ...]]
    overwritten: Set[str] = field(default_factory=set)

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise ValueError("relevance graph: its model no longer exists")
        return model

    @property
    def head(self) -> Node:
        return self.nodes[-1]

    @property
    def plain_head(self) -> bool:
        """Whether the pooled tensor is the classifier's input (CAM and Grad-CAM at gap are then one einsum with
        the classifier's weight)."""
        return self.pooled is not None and self.head.inputs[0] == self.pooled

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def keys(self) -> List[str]:
        return [INPUT] + [node.output for node in self.nodes]

    def resolve(self, layer: Union[str, int]) -> str:
        """"gap", "input", a stage index (int or digit string, negative allowed) or a tensor key (module name)."""
        name = type(self.model).__name__
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        if isinstance(layer, int):
            if not -len(self.stages) <= layer < len(self.stages):
                raise ValueError(f"explain layer={layer}: {name} has {len(self.stages)} stages")
            if self.stages[layer] is None:
                raise ValueError(f"explain layer={layer}: stage {layer} of {name} does not lead to the logits")
            return self.stages[layer]
        if layer == "gap":
            if self.gap is None:
                raise ValueError(f"explain layer='gap': {name} has no global-average-pooling head; use 'input', a "
                                 f"stage index or one of {self.keys()[:8]}...")
            return self.gap
        if layer in self.aliases:
            return self.aliases[layer]
        if layer != INPUT and layer not in self.shapes:
            raise ValueError(f"explain layer={layer!r}: not a tensor of {name}; expected 'gap', 'input', a stage "
                             f"index or one of {self.keys()}")
        return layer


class GraphBuilder:
    """Emits ops in forward order; `add` returns the key of the op's output tensor."""

    def __init__(self):
        self.nodes: List[Node] = []
        self.shapes: Dict[str, Tuple[int, ...]] = {}

    def add(self, op: str, inputs: Sequence[str], key: str, shape: Sequence[int], modules: Sequence[str] = (),
            role: str = "", **attrs: object) -> str:
        """A node writing tensor `key` of per-sample `shape`; a taken key gets a "_N" suffix."""
        key = self.fresh(key)
        self.shapes[key] = tuple(shape)
        self.nodes.append(Node(op, tuple(inputs), key, tuple(modules), role, dict(attrs)))
        return key

    def fresh(self, key: str) -> str:
        if key not in self.shapes and key != INPUT:
            return key
        i = 1
        while f"{key}_{i}" in self.shapes:
            i += 1
        return f"{key}_{i}"


def nonneg_keys(nodes: Sequence[Node]) -> Set[str]:
    """Tensors that are non-negative by construction (rectified, or made only from rectified tensors)."""
    nonneg: Set[str] = set()
    for node in nodes:
        rectified = node.op == "act" and node.attrs["kind"] in NONNEG_ACTS
        if rectified or (node.op in INHERIT_OPS and all(x in nonneg for x in node.inputs)):
            nonneg.add(node.output)
    return nonneg
