"""The activations a walk reads: those of a functional re-run of the graph (`engine.forward`), or those of a
forward the model ran itself (`bind`, from `record`), with every BatchNorm folded into its layer on demand.

A recorded forward keeps only what the model's backward keeps anyway (conv / linear inputs and outputs); every
other tensor is recomputed by its op whenever the walk reads it (`RecordedValues`), so explaining a training step
holds no extra activation (docs/explain.md, "Engine").
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .batchnorm import bn_affine, is_batchnorm
from .graph import INPUT, Graph, Node
from .ops import not_kept, op_of

Tensor = torch.Tensor


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
        """(W, b) of a ruled node's affine map (a conv / linear one with its BatchNorm folded in), from the live
        parameters."""
        if node.output not in self._params:
            self._params[node.output] = op_of(node).parameters(self, node)
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
                raise not_kept(node)
            else:
                pre = None  # running statistics: the input is not needed
            self._bn[node.output] = bn_affine(bn, pre, batch_stats)
        return self._bn[node.output]


class RecordedValues(dict):
    """The tensors of a recorded forward: those the model kept (conv / linear inputs and outputs), and every other
    one recomputed by its op whenever it is read, and not kept (a BN output is its input normalised again, a sum is
    added again), so explaining a training step holds no activation beyond what the step's own backward keeps."""

    def __init__(self, acts: Activations, recorded: Dict[str, Tensor]):
        super().__init__(recorded)
        self.acts = acts
        self.producers = {node.output: node for node in acts.graph.nodes}

    def __missing__(self, key: str) -> Tensor:
        node = self.producers[key]
        return op_of(node).recompute(self.acts, node)


def bind(graph: Graph, image: Tensor, captured: Dict[str, Tuple[Optional[Tensor], bool]],
         inputs: Optional[Dict[str, Tensor]] = None) -> Activations:
    """Activations of a forward the model ran itself (`record`): no layer is run again. Conv / linear outputs and
    inputs are the recorded tensors, which the model's backward keeps anyway; BatchNorm outputs, sums and other
    elementwise results are recomputed from them when the walk reads them (`RecordedValues`). `captured` maps module
    names to (output, uses batch statistics); an output is None where the tape did not keep it (`record(layer=...)`,
    and every BatchNorm's unless it is its input: a folded teacher's identity BN)."""
    inputs = inputs or {}
    for node in graph.nodes:
        for name in node.modules if op_of(node).records else ():
            if name not in captured:
                raise ValueError(f"explain_recorded: module {name} of {type(graph.model).__name__} did not run in the "
                                 f"recorded forward")
    acts = Activations(graph, {})
    recorded = {INPUT: image}
    for node in graph.nodes:
        op = op_of(node)
        if not op.records:
            continue
        if node.modules[0] in inputs:
            recorded.setdefault(node.inputs[0], op.recorded(node, inputs[node.modules[0]], "in"))
        out = captured[node.modules[-1]][0]
        if not is_batchnorm(graph.module(node.modules[-1])):
            if out is not None:
                recorded[node.output] = op.recorded(node, out, "out")
            continue
        acts.batch_stats[node.output] = captured[node.modules[-1]][1]
        if out is not None:
            recorded[node.output] = out
        if len(node.modules) == 2 and captured[node.modules[0]][0] is not None:
            acts.pre_bn[node.output] = captured[node.modules[0]][0]
    acts.values = RecordedValues(acts, recorded)
    return acts
