"""LRP rules as data (zennit's vocabulary), and composites that assign them to layer roles.

A linear layer z = W·x + b redistributes its output relevance R with one formula for every rule:

    R_in = Σ_groups coef · Σ_terms sign · x_t ⊙ W_tᵀ (mask · R / stab(Σ_terms sign · (W_t·x_t + b_t)))

where each term modifies the input (x, x⁺, x⁻, ones, box bounds) and the parameters (W, W⁺, W⁻, ones, W², W+γW±),
and a group may apply only to output units whose unmodified z is positive or negative (generalised γ). `Rule`
objects only describe this; `ops.py` (`Ruled.relevance`) evaluates it for every layer type. Stabilisers follow zennit:
stab(z) = z + ε·sign(z), with sign(0) = +1.
"""
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple, Union

import torch

INPUT_MODS = ("x", "pos", "neg", "ones", "low", "high")
PARAM_MODS = ("w", "pos", "neg", "ones", "square", "gamma_pos", "gamma_neg")


@dataclass(frozen=True)
class Term:
    """One modified forward: input modifier, parameter modifier (applied to weight and bias), bias on/off, sign."""

    inputs: str = "x"
    params: str = "w"
    bias: bool = True
    sign: float = 1.0

    def __post_init__(self):
        if self.inputs not in INPUT_MODS or self.params not in PARAM_MODS:
            raise ValueError(f"LRP Term({self.inputs!r}, {self.params!r}): expected inputs in {INPUT_MODS}, "
                             f"params in {PARAM_MODS}")


@dataclass(frozen=True)
class Group:
    """Terms that share one normaliser; `where` = "pos"/"neg" restricts it to outputs with z > 0 / z < 0."""

    terms: Tuple[Term, ...]
    coef: float = 1.0
    where: Optional[str] = None


@dataclass(frozen=True)
class Rule:
    """A named LRP rule; `groups` empty means Pass (relevance goes through unchanged)."""

    name: str
    groups: Tuple[Group, ...]
    epsilon: float = 1e-6
    gamma: float = 0.25


@dataclass(frozen=True)
class Composite:
    """Rules per layer role: the layer reading the input ("first"), other convolutions ("conv"), fully connected
    layers and the classifier ("linear"), and BatchNorms that cannot be folded into a preceding layer ("bn").

    Sums, average pooling and GAP use the z-rule with `stabilizer`; max pooling is winner-take-all; activations pass.
    `low`/`high` are the input bounds of the z-box rule (per-channel tensors broadcastable to the input, or None for
    the per-sample, per-channel minimum and maximum of the input).
    """

    first: Rule
    conv: Rule
    linear: Rule
    bn: Rule = field(default_factory=lambda: PASS)
    stabilizer: float = 1e-6
    low: Optional[torch.Tensor] = None
    high: Optional[torch.Tensor] = None


PASS = Rule("pass", ())


def _single(*terms: Term) -> Tuple[Group, ...]:
    return (Group(terms),)


def epsilon(epsilon: float = 1e-6) -> Rule:
    return Rule("epsilon", _single(Term()), epsilon=epsilon)


def zplus(stabilizer: float = 1e-6) -> Rule:
    """Sign-aware z⁺ (α=1, β=0): x⁺W⁺ + x⁻W⁻, bias only with the positive term (as zennit)."""
    return Rule("zplus", _single(Term("pos", "pos"), Term("neg", "neg", bias=False)), epsilon=stabilizer)


def alphabeta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> Rule:
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
        raise ValueError(f"alphabeta rule: alpha={alpha}, beta={beta}; expected alpha, beta >= 0 and alpha - beta = 1")
    positive = Group((Term("pos", "pos"), Term("neg", "neg", bias=False)), coef=alpha)
    negative = Group((Term("pos", "neg"), Term("neg", "pos", bias=False)), coef=-beta)
    return Rule(f"alpha{alpha:g}beta{beta:g}", (positive, negative), epsilon=stabilizer)


def gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> Rule:
    """Generalised γ: positive outputs favour positive contributions, negative outputs negative ones (zennit)."""
    positive = Group((Term("pos", "gamma_pos"), Term("neg", "gamma_neg", bias=False)), where="pos")
    negative = Group((Term("pos", "gamma_neg"), Term("neg", "gamma_pos", bias=False)), where="neg")
    return Rule("gamma", (positive, negative), epsilon=stabilizer, gamma=gamma)


def flat(stabilizer: float = 1e-6) -> Rule:
    return Rule("flat", _single(Term("ones", "ones", bias=False)), epsilon=stabilizer)


def wsquare(stabilizer: float = 1e-6) -> Rule:
    """w² rule (Montavon et al., 2017), without bias like the flat rule."""
    return Rule("wsquare", _single(Term("ones", "square", bias=False)), epsilon=stabilizer)


def zbox(stabilizer: float = 1e-6) -> Rule:
    """zᴮ for bounded inputs: x·W − l·W⁺ − h·W⁻ (bounds come from the composite)."""
    terms = (Term("x", "w"), Term("low", "pos", sign=-1.0), Term("high", "neg", sign=-1.0))
    return Rule("zbox", _single(*terms), epsilon=stabilizer)


RULES = {
    "epsilon": epsilon,
    "zplus": zplus,
    "alpha2beta1": alphabeta,
    "alpha1beta0": lambda stabilizer=1e-6: alphabeta(1.0, 0.0, stabilizer),
    "gamma": gamma,
    "flat": flat,
    "wsquare": wsquare,
    "zbox": zbox,
}


def _composite(first: Rule, conv: Rule, linear: Rule, **kwargs) -> Composite:
    return Composite(first=first, conv=conv, linear=linear, **kwargs)


COMPOSITES = {
    "epsilon_plus_flat": lambda: _composite(flat(), zplus(), epsilon()),
    "epsilon_plus": lambda: _composite(zplus(), zplus(), epsilon()),
    "epsilon_gamma_box": lambda: _composite(zbox(), gamma(), epsilon()),
    "epsilon_alpha2_beta1_flat": lambda: _composite(flat(), alphabeta(), epsilon()),
    "epsilon_alpha2_beta1": lambda: _composite(alphabeta(), alphabeta(), epsilon()),
}


def get_rule(name: str, **params: float) -> Rule:
    """A rule by name (`RULES`), e.g. get_rule("epsilon", epsilon=1e-9)."""
    if name not in RULES:
        raise ValueError(f"LRP rule {name!r}: expected one of {sorted(RULES)}")
    return RULES[name](**params)


def get_composite(rule: Union[str, Rule, Composite], epsilon: Optional[float] = None,
                  stabilizer: Optional[float] = None, **overrides: object) -> Composite:
    """A composite by name (`COMPOSITES`), or one rule for every layer.

    `epsilon` sets ε of every epsilon rule, `stabilizer` that of every other rule and of the z-rule on sums and
    pooling; `overrides` replace Composite fields (e.g. first=get_rule("zbox"), low=..., high=...).
    """
    if isinstance(rule, Composite):
        composite = rule
    elif isinstance(rule, Rule):
        composite = _composite(rule, rule, rule)
    elif rule in COMPOSITES:
        composite = COMPOSITES[rule]()
    elif rule == "zbox":
        raise ValueError("LRP rule 'zbox' applies to the input layer only: use 'epsilon_gamma_box' or "
                         "get_composite(<composite>, first=get_rule('zbox'))")
    elif rule in RULES:
        single = RULES[rule]()
        composite = _composite(single, single, single)
    else:
        raise ValueError(f"LRP rule {rule!r}: expected a composite {sorted(COMPOSITES)} or a rule {sorted(RULES)}")
    if overrides:
        composite = replace(composite, **overrides)
    if epsilon is None and stabilizer is None:
        return composite

    def restabilize(r: Rule) -> Rule:
        value = epsilon if r.name == "epsilon" else stabilizer
        return r if value is None or not r.groups else replace(r, epsilon=value)

    roles = {role: restabilize(getattr(composite, role)) for role in ("first", "conv", "linear", "bn")}
    return replace(composite, stabilizer=composite.stabilizer if stabilizer is None else stabilizer, **roles)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps·sign(z) with sign(0) = +1 (zennit's stabiliser), so the division never flips or explodes at 0."""
    # z + 0.0 turns -0.0 into +0.0, so copysign gives sign(0) = +1; two passes instead of a where over scalars.
    # new_full fills on z's device (torch.tensor(eps, device=...) would copy from the host on every call).
    return z + torch.copysign(z.new_full((), eps), z.detach() + 0.0)


RuleLike = Union[str, Rule, Composite]
__all__ = [
    "Term", "Group", "Rule", "Composite", "PASS", "RULES", "COMPOSITES", "get_rule", "get_composite", "stabilize",
    "epsilon", "zplus", "alphabeta", "gamma", "flat", "wsquare", "zbox", "RuleLike", "INPUT_MODS", "PARAM_MODS",
]
