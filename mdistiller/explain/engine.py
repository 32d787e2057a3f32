"""One engine for every model and method: obtain the activations of a relevance graph, then send relevance (LRP)
or gradients back from the classifier to one tensor, for K classes per sample at once.

Activations come from re-running the graph functionally (`forward`, never touching module state) or from a forward
the model already ran (`tape.bind`, from `record`). Relevance for K classes is one [B, K, ...] batch against the
[B, ...] activations (broadcast, not copied); rule normalisers depend only on the forward and are computed once per
sample. Everything is plain differentiable tensor algebra, so with grad enabled the result is differentiable with
respect to the parameters, normalisers included, and without it nothing is kept. What each op does lives in its op
object (`ops.py`); this module only orders the walk.

BatchNorm: a BN right after a conv/linear layer is folded into it from the live parameters, W' = W·γ/√(σ²+ε),
b' = (b−μ)·γ/√(σ²+ε) + β. In eval mode (μ, σ²) are the running statistics; in train mode (the student) they are the
current batch's statistics of the BN input, exactly what the forward normalised with, so z = W'x + b' is the BN
output; the statistics stay part of the graph (a student's map is differentiated through them), and no running
statistic is read or written. A BN with no layer right before it (WRN's pre-activation) is the per-channel affine map
with the same (μ, σ²) and gets the composite's "bn" rule (Pass by default, as zennit).
"""
from typing import Callable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from .batchnorm import is_batchnorm
from .graph import INPUT, Graph, Node
from .ops import ONES, Contributions, Spec, accumulate, op_of, output_mask, records_input
from .tape import Activations, bind

__all__ = ["Activations", "Observer", "Spec", "bind", "forward", "propagate", "tape_needs"]

Tensor = torch.Tensor
Observer = Callable[[Node, Tensor, Sequence[Optional[Tensor]]], None]


def forward(graph: Graph, image: Tensor) -> Activations:
    """Re-run the graph's forward from `image` with the live parameters; no module state is read-modified."""
    acts = Activations(graph, {INPUT: image})
    for node in graph.nodes:
        xs = [acts.values[key] for key in node.inputs]
        acts.values[node.output] = op_of(node).forward(acts, node, xs)
    return acts


def _head(acts: Activations, classes: Tensor, spec: Spec) -> Tensor:
    """Relevance (or gradient) at the classifier's input for the classes [B, K], seeded with R = logit (or 1),
    gathering the K weight rows instead of forming [B, K, num_classes]."""
    node = acts.graph.head
    w, _ = acts.params(node)
    if spec.mode != "lrp":
        return w[classes]
    rule = spec.rule(node)
    if not rule.groups:
        raise ValueError("LRP: the classifier needs a rule, not Pass")
    z = acts.values[node.output]
    seed = z.gather(1, classes)
    out = None
    for group in rule.groups:
        terms = op_of(node).terms(acts, node, rule, group.terms, spec)
        den = sum(sign * zt.expand(z.shape).gather(1, classes) for sign, _, _, zt in terms)
        s = seed / spec.stable(den, rule.epsilon)
        if group.where is not None:
            s = s * output_mask(group.where, seed)
        for sign, xt, wt, _ in terms:
            c = wt[classes] * s.unsqueeze(-1)
            out = accumulate(out, c if xt is ONES else xt.unsqueeze(1) * c, group.coef * sign)
    return out


def _backward(acts: Activations, node: Node, r: Tensor, spec: Spec) -> Contributions:
    """Relevance, gradient or linearised gradient (`Spec.mode`) of each input of `node` from that of its output."""
    xs = [acts.values[key] for key in node.inputs]
    return op_of(node).backward(acts, node, xs, r, spec)


def _recomputed(acts: Activations, node: Node, r: Tensor, spec: Spec) -> Contributions:
    """`_backward` under activation checkpointing: a differentiable walk keeps only each layer's relevance for the
    double backward and recomputes the rule's intermediates (normalisers, modified weights and inputs) there, so the
    student path's memory stays near that of the relevance tensors themselves. The folded parameters it reads must
    already be cached (`_fold_ahead`), so that the recomputation reads the same tensors."""
    return checkpoint(lambda relevance: _backward(acts, node, relevance, spec), r, use_reentrant=False)


def _fold_ahead(acts: Activations, nodes: Sequence[Node]) -> None:
    """Fold the BatchNorms and layers that a walk over `nodes` reads, including through recomputed values."""
    keys = [key for node in nodes for key in (*node.inputs, node.output)]
    for _, node in _reads(acts.graph, keys, lambda key: key in acts.values):
        if node.modules and is_batchnorm(acts.graph.module(node.modules[-1])):
            acts.bn_affine(node)
    for node in nodes:
        if op_of(node).ruled:
            acts.params(node)


def _reads(graph: Graph, keys: List[str], recorded: Callable[[str], bool]) -> Iterator[Tuple[str, Node]]:
    """(key, producing node) of `keys` and of every tensor that a key which is not `recorded` is recomputed from
    (`Op.reads`: an elementwise or pooling op's inputs; nothing for a conv / linear, whose recorded output is its BN
    input)."""
    producers = {node.output: node for node in graph.nodes}
    seen = set()
    while keys:
        key = keys.pop()
        if key in seen or key == INPUT:
            continue
        seen.add(key)
        node = producers[key]
        yield key, node
        if not recorded(key):
            keys.extend(op_of(node).reads(graph, node))


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
        if records_input(graph, node):
            readers.setdefault(node.inputs[0], node.modules[0])
    walk = _walk(graph, target) + [graph.head]
    layers = [node for node in walk if op_of(node).records]
    outputs = {node.modules[0] for node in layers} | {node.modules[-1] for node in layers}
    inputs: Set[str] = set()
    keys = [target] + [key for node in walk for key in (*node.inputs, node.output)]
    for key, node in _reads(graph, keys, lambda key: key in readers):
        if key in readers:
            inputs.add(readers[key])
        elif op_of(node).records:
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
            if contribution is not None:
                pending[key] = contribution if key not in pending else pending[key] + contribution
    if target not in pending:
        value = acts.values[target]
        return value.new_zeros(value.shape[0], classes.shape[1], *value.shape[1:])
    return pending[target]
