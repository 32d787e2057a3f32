"""Open models (timm, torchvision) under the zoo's contract, by tracing them with torch.fx (docs/models.md).

A plain classifier `model(x) -> logits` is traced once with torchvision's NodePathTracer (nodes named by module
path) and its head is read off the graph, walking back from the logits: the last Linear is the classifier, the first
global average pooling before it pools `gap_feat` (its input) into `pooled_feat` (its output, flattened). The stage
outputs come from the family's rule. torchvision's `create_feature_extractor` then builds train and eval graphs that
return those tensors, and their output is rewritten to the zoo's `(logits, feats)`. The result is one fx GraphModule:
`torch.fx.symbolic_trace` traces it, its logits are the original forward's ops, and its state dict has the original
model's keys, so timm and torchvision weight files load as they are.
"""
import inspect
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import DualGraphModule, NodePathTracer, create_feature_extractor

from ..errors import ConfigError

__all__ = ["ExternalModel", "StageRule", "wrap_classifier", "hub_model"]

# (model, eval graph, node -> module-path name, gap_feat node) -> the names of the stage outputs, in order
StageRule = Callable[[nn.Module, fx.Graph, Dict[fx.Node, str], fx.Node], List[str]]

# The feature extractor's default leaves (documented in torchvision.models.feature_extraction), given to the analysis
# trace as well so that both name the same nodes.
_TORCHVISION_OPS = [
    cls for _, cls in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(cls, nn.Module)
]


class ExternalModel(DualGraphModule):
    """A traced open model returning `(logits, {"feats", "preact_feats", "gap_feat", "pooled_feat"})`; its train and
    eval graphs are switched by `train()`, as in torchvision's DualGraphModule. `meta` (kept by deep copies) holds the
    model's name, its classifier's module path and the leaves it was traced with."""

    @property
    def model_name(self) -> str:
        return self.meta["name"]

    @property
    def tracer_kwargs(self) -> dict:
        """The leaves this model was traced with, for `torchvision.models.feature_extraction.LeafModuleAwareTracer`:
        a plain `torch.fx.symbolic_trace` traces into them, which fails for the few that timm keeps whole because
        they branch on shapes (e.g. Conv2dSame of the tf_ models)."""
        return _with_autowrap_modules(self.meta["leaves"])

    def get_classifier(self) -> nn.Linear:
        return self.get_submodule(self.meta["classifier"])

    def __deepcopy__(self, memo):
        """torchvision's copy comes back in train mode whatever the original's mode (its __init__ ends in train()):
        restore it, so that a frozen teacher's copy (BatchNorm folding, EMA) stays frozen."""
        copied = super().__deepcopy__(memo)
        type(copied).__name__ = type(self).__name__
        copied.train(self.training)
        return copied


def _with_autowrap_modules(leaves: dict) -> dict:
    """`leaves` plus the feature extractor's default autowrapped modules (kept out of `meta`, which is deep-copied)."""
    return {**leaves, "autowrap_modules": (math, torchvision.ops)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_input(node: fx.Node) -> Optional[fx.Node]:
    return next((arg for arg in node.args if isinstance(arg, fx.Node)), None)


def _is_global_average_pool(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1))
    if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1])
    return False


def _head(model: nn.Module, graph: fx.Graph, name: str) -> Tuple[fx.Node, fx.Node, fx.Node]:
    """(logits, classifier, pooling), walking back from the logits along each op's first input: the last Linear,
    then the first global average pooling before it (whatever runs in between, e.g. MobileNetV3's conv head)."""
    output = next(node for node in graph.nodes if node.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node):
        raise ConfigError(f"{name}: its forward returns {type(logits).__name__}, not one logits tensor")
    classifier, node = None, logits
    while node is not None:
        if classifier is None:
            if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.Linear):
                classifier = node
        elif _is_global_average_pool(node, model):
            return logits, classifier, node
        node = _first_input(node)
    found = "a Linear classifier but no global average pooling before it" if classifier else "no Linear classifier"
    raise ConfigError(f"{name}: its head has {found}; the zoo's contract needs a CNN whose last map is globally "
                      f"average-pooled towards a Linear classifier (docs/models.md)")


def _replace_classifier(model: nn.Module, path: str, num_classes: int) -> None:
    """A fresh Linear for `num_classes` in place of the classifier at `path` (hub weights of another class count)."""
    old = model.get_submodule(path)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Linear(old.in_features, num_classes))


def _last_node(path: str, qualname: Dict[fx.Node, str], name: str) -> str:
    """The name of the last node inside module `path` (or of node `path`): each output is then named once, as the
    feature extractor assigns a node to one name only."""
    inside = [q for q in qualname.values() if q == path or q.startswith(path + ".")]
    if not inside:
        raise ConfigError(f"{name}: no traced op inside module {path!r}, one of its stages")
    return inside[-1]


def _traced(trace: Callable[[], object], name: str):
    try:
        return trace()
    except Exception as error:  # fx fails inside the model's own code, with any exception type
        raise ConfigError(f"{name}: torch.fx cannot trace it ({type(error).__name__}: {_first_line(error)}); "
                          f"docs/models.md") from error


def _to_contract(graph: fx.Graph, stages: Sequence[str], gap: str, pool: str, logits: str) -> None:
    """Rewrite a feature extractor's output `{name: tensor}` to the zoo's `(logits, feats)`."""
    output = next(node for node in graph.nodes if node.op == "output")
    values = output.args[0]
    with graph.inserting_before(output):
        pooled = graph.call_function(torch.flatten, (values[pool], 1))
    feats = [values[stage] for stage in stages]
    output.args = ((values[logits], {"feats": feats, "preact_feats": list(feats), "gap_feat": values[gap],
                                     "pooled_feat": pooled}),)
    graph.lint()


def _probe(model: ExternalModel, image_size: int) -> None:
    """One blank image in eval mode (no statistics touched): gap_feat and pooled_feat checked against the contract."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = model(torch.zeros(1, 3, image_size, image_size))
    except RuntimeError as error:
        raise ConfigError(f"{model.model_name}: a {image_size}x{image_size} input fails: {_first_line(error)}") \
            from error
    finally:
        model.train(was_training)
    gap, pooled = feats["gap_feat"], feats["pooled_feat"]
    if gap.dim() != 4 or pooled.shape != gap.shape[:2]:
        raise ConfigError(f"{model.model_name}: the pooled tensor has shape {list(gap.shape)} and the pooling gives "
                          f"{list(pooled.shape)}; the zoo's contract needs a [B, C, H, W] map pooled to [B, C]")


def wrap_classifier(model: nn.Module, name: str, num_classes: int, image_size: int, stage_rule: StageRule,
                    leaf_modules: Sequence[type] = (), autowrap_functions: Sequence[Callable] = ()) -> ExternalModel:
    """`model` (a classifier returning logits) as an ExternalModel named `name`, with a fresh classifier when its
    own has another number of classes than `num_classes`; checked on one `image_size` input. `leaf_modules` and
    `autowrap_functions` are kept whole by the tracer (timm's registered ones); every Linear is a leaf."""
    linears = {type(module) for module in model.modules() if isinstance(module, nn.Linear)}
    leaves = {"leaf_modules": [*_TORCHVISION_OPS, *leaf_modules, *linears],
              "autowrap_functions": list(autowrap_functions)}
    tracer_kwargs = _with_autowrap_modules(leaves)
    was_training = model.training
    model.eval()
    tracer = NodePathTracer(**tracer_kwargs)
    graph = _traced(lambda: tracer.trace(model), name)
    qualname = tracer.node_to_qualname
    logits, classifier, pool = _head(model, graph, name)
    if model.get_submodule(classifier.target).out_features != num_classes:
        _replace_classifier(model, classifier.target, num_classes)
    gap = _first_input(pool)
    stages = [_last_node(stage, qualname, name) for stage in stage_rule(model, graph, qualname, gap)]
    names = [qualname[gap], qualname[pool], qualname[logits]]
    extractor = _traced(lambda: create_feature_extractor(
        model, return_nodes=list(dict.fromkeys([*stages, *names])), tracer_kwargs=dict(tracer_kwargs),
        suppress_diff_warning=True), name)
    for mode_graph in (extractor.train_graph, extractor.eval_graph):
        _to_contract(mode_graph, stages, *names)
    wrapped = ExternalModel(extractor, extractor.train_graph, extractor.eval_graph, class_name="ExternalModel")
    wrapped.meta = {"name": name, "classifier": classifier.target, "leaves": leaves}
    wrapped.train(was_training)
    model.train(was_training)
    _probe(wrapped, image_size)
    return wrapped


def hub_model(build: Callable[[], nn.Module], name: str, key: str) -> nn.Module:
    """`build()`, which downloads the hub's pretrained weights (or reads them from the hub's cache); any failure, no
    network above all, is one line naming the option."""
    try:
        return build()
    except Exception as error:  # urllib, requests and huggingface_hub each raise their own types
        raise ConfigError(f"{key} = {name!r}: fetching the hub's pretrained weights failed ({type(error).__name__}: "
                          f"{_first_line(error)}); without network, pass a weights file instead") from error
