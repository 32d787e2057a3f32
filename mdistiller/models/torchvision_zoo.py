"""`torchvision:<name>` models: torchvision's classification CNNs under the zoo's contract (docs/models.md)."""
import difflib
from typing import Dict, List

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import ConfigError
from .external import ExternalModel, hub_model, wrap_classifier

PREFIX = "torchvision:"
# Stages are found on an input of the size these models are designed for, where no stage's map is 1x1 yet, so the
# choice does not depend on the data set's image size.
ANALYSIS_SIZE = 224


def _names() -> List[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_name(arch: str, key: str) -> None:
    """A ConfigError naming `key` and close names when torchvision has no classification model `arch`."""
    names = _names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5)
        hint = f"close names: {', '.join(PREFIX + c for c in close)}" if close else \
            "see torchvision.models.list_models(module=torchvision.models)"
        raise ConfigError(f"{key} = {PREFIX + arch!r} is not a torchvision classification model; {hint}")


def resolution_stages(model: nn.Module, graph: fx.Graph, qualname: Dict[fx.Node, str], gap: fx.Node) -> List[str]:
    """For each spatial size down to gap_feat's, the output of the outermost module that ends at that size (the
    latest of them): the stem, then each stage. Outermost, because the first op of the next block (the expansion of
    an inverted residual) may still run at the size before its strided conv."""
    with torch.no_grad():
        ShapeProp(fx.GraphModule(model, graph)).propagate(torch.zeros(1, 3, ANALYSIS_SIZE, ANALYSIS_SIZE))
    order = {node: index for index, node in enumerate(graph.nodes)}
    modules = {path for path, _ in model.named_modules() if path}
    ends: Dict[str, fx.Node] = {}  # module path -> its last node
    for node, name in qualname.items():
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = ".".join(parts[:depth])
            if path in modules:
                ends[path] = node
    gap_size = gap.meta["tensor_meta"].shape[-1]
    best: Dict[int, tuple] = {}  # spatial size -> (depth, -position, module path)
    for path, node in ends.items():
        shape = getattr(node.meta.get("tensor_meta"), "shape", ())
        # on a square input an NCHW map is square, a channels-last tensor (inside ConvNeXt's blocks) is not
        if order[node] <= order[gap] and len(shape) == 4 and shape[-2] == shape[-1] >= gap_size:
            key = (path.count("."), -order[node], path)
            best[shape[-1]] = min(best.get(shape[-1], key), key)
    return [path for _, _, path in sorted(best.values(), key=lambda entry: -entry[1])]


def build(arch: str, num_classes: int, image_size: int, pretrained: bool, key: str) -> ExternalModel:
    """torchvision model `arch` for `num_classes`, freshly initialised, or with its default hub weights (downloaded)
    when `pretrained`: a new classifier when the class counts differ."""
    check_name(arch, key)
    if pretrained:
        model = hub_model(lambda: torchvision.models.get_model(arch, weights="DEFAULT"), PREFIX + arch, key)
    else:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return wrap_classifier(model, PREFIX + arch, num_classes, image_size, resolution_stages)
