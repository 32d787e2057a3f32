"""Batched, differentiable explanation maps (CAM, Grad-CAM, LRP, gradient x input) for every model of the zoo.

See docs/explain.md. The evaluation protocols live in `metrics`, `perturbation`, `segmentation` and `agreement`.
"""
from .adapters import ADAPTERS, build_graph
from .explainer import METHODS, Tape, class_activation_map, explain, explain_from_features, explain_recorded, record
from .rules import COMPOSITES, RULES, Composite, Group, Rule, Term, get_composite, get_rule

__all__ = [
    "explain",
    "explain_recorded",
    "explain_from_features",
    "record",
    "Tape",
    "class_activation_map",
    "METHODS",
    "build_graph",
    "ADAPTERS",
    "get_rule",
    "get_composite",
    "RULES",
    "COMPOSITES",
    "Rule",
    "Group",
    "Term",
    "Composite",
]
