"""Batched, differentiable explanation maps (CAM, Grad-CAM, LRP, gradient x input) for any CNN whose forward
torch.fx can trace: the model zoo, timm and torchvision models, a user's own classes.

See docs/explain.md. The evaluation protocols live in `metrics`, `perturbation`, `segmentation` and `agreement`.
"""
from .explainer import (
    METHODS,
    Tape,
    class_activation_map,
    explain,
    explain_from_features,
    explain_recorded,
    record,
    supports,
)
from .rules import COMPOSITES, RULES, Composite, Group, Rule, Term, get_composite, get_rule
from .trace import GraphError, build_graph, register_leaf

__all__ = [
    "explain",
    "explain_recorded",
    "explain_from_features",
    "record",
    "supports",
    "Tape",
    "class_activation_map",
    "METHODS",
    "build_graph",
    "register_leaf",
    "GraphError",
    "get_rule",
    "get_composite",
    "RULES",
    "COMPOSITES",
    "Rule",
    "Group",
    "Term",
    "Composite",
]
