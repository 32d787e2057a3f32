"""BatchNorm folded into the preceding convolution, for frozen (eval-mode) teachers.

A frozen teacher's BatchNorm is an affine map per channel, so `bn(conv(x)) == conv'(x)` with `W' = W·γ/σ`,
`b' = (b − μ)·γ/σ + β`: one op less per conv, the teacher being ~2/3 of a KD step's FLOPs on CIFAR.

The pairs are found by tracing a hook-free copy of the model (a BatchNorm whose input is exactly a conv's output),
and the fold is kept only if the folded copy reproduces every output of the original. Parameter and buffer names are
unchanged (the conv keeps `weight`/`bias`, the BatchNorm its statistics), so state dicts save and load as before; the
folded weights are a cache recomputed whenever a source tensor changes (load_state_dict, `.to()`).
"""
import copy
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["fold_batchnorm", "FoldedConv2d", "FoldedBatchNorm2d"]

_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class FoldedBatchNorm2d(nn.Module):
    """Holds a folded BatchNorm's parameters and statistics under their names; identity in eval mode (the conv
    before it applies them), a plain BatchNorm in train mode."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps, self.momentum = bn.eps, bn.momentum
        self.train(bn.training)
        for name in _BN_STATE:
            value = getattr(bn, name)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum or 0.0,
                            self.eps)


class FoldedConv2d(nn.Conv2d):
    """A Conv2d that, in eval mode, applies its BatchNorm `bn` folded into its weights (cached per source version)."""

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm2d):
        with torch.device("meta"):
            super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        self.weight = conv.weight
        self.bias = conv.bias
        object.__setattr__(self, "bn", bn)  # not a child: its state stays under its own name
        self._folded: Optional[Tuple[tuple, torch.Tensor, torch.Tensor]] = None
        self.train(conv.training)

    def _sources(self) -> List[torch.Tensor]:
        tensors = [self.weight, self.bn.running_mean, self.bn.running_var]
        tensors += [t for t in (self.bias, self.bn.weight, self.bn.bias) if t is not None]
        return tensors

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(W', b') for the current weights and statistics."""
        key = tuple((id(t), t._version, t.device, t.dtype) for t in self._sources())
        if self._folded is None or self._folded[0] != key:
            bn = self.bn
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var.float() + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.float()
                bias = -bn.running_mean.float() if self.bias is None else self.bias.float() - bn.running_mean.float()
                bias = bias * scale + (bn.bias.float() if bn.bias is not None else 0.0)
                weight = self.weight.float() * scale.reshape(-1, 1, 1, 1)
            self._folded = (key, weight.to(self.weight.dtype), bias.to(self.weight.dtype))
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        weight, bias = self.folded()
        return self._conv_forward(x, weight, bias)


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    try:
        for module, _, _ in saved:
            module._forward_hooks, module._forward_pre_hooks = OrderedDict(), OrderedDict()
        probe = copy.deepcopy(model)
    finally:
        for module, hooks, pre_hooks in saved:
            module._forward_hooks, module._forward_pre_hooks = hooks, pre_hooks
    for module in probe.modules():  # a compiled `forward` set on the instance would still run the original
        module.__dict__.pop("forward", None)
    return probe


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _consumers(outputs: List[torch.Tensor]) -> Dict[object, int]:
    """How many times each autograd node is used as an input by the graph behind `outputs` (outputs count once)."""
    counts: Dict[object, int] = {}
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    for node in stack:
        counts[node] = counts.get(node, 0) + 1
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                counts[parent] = counts.get(parent, 0) + 1
                stack.append(parent)
    return counts


def _conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> List[Tuple[str, str]]:
    """(conv name, bn name) where the BatchNorm's input is the conv's output and nothing else uses that output
    (read off the autograd graph of one forward), each conv and BN called once."""
    outputs: Dict[int, Tuple[str, torch.Tensor]] = {}  # the tensors stay referenced, so no id is reused
    calls: Dict[str, int] = {}
    pairs: List[Tuple[str, str, object]] = []
    handles = []

    def conv_hook(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            outputs[id(output)] = (name, output)
        return hook

    def bn_hook(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            conv = outputs.get(id(args[0]))
            if conv is not None and conv[1] is args[0]:
                pairs.append((conv[0], name, args[0].grad_fn))
        return hook

    for name, module in model.named_modules():
        if type(module) is nn.Conv2d:
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_var is not None:
            handles.append(module.register_forward_hook(bn_hook(name)))
    try:
        with torch.enable_grad():
            consumers = _consumers(_flat_tensors(model(example.clone().requires_grad_(True))))
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, bn) for conv, bn, node in pairs
            if calls[conv] == 1 and calls[bn] == 1 and node is not None and consumers.get(node) == 1]


def _apply_fold(model: nn.Module, pairs: List[Tuple[str, str]]) -> None:
    for conv_name, bn_name in pairs:
        bn = FoldedBatchNorm2d(model.get_submodule(bn_name))
        _set_module(model, bn_name, bn)
        _set_module(model, conv_name, FoldedConv2d(model.get_submodule(conv_name), bn))


def _flat_tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _flat_tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _flat_tensors(value)]
    return []


def _outputs_match(reference, folded, rtol: float, atol: float) -> bool:
    ref, new = _flat_tensors(reference), _flat_tensors(folded)
    if len(ref) != len(new):
        return False
    for a, b in zip(ref, new):
        scale = a.detach().abs().max().clamp_min(1.0)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol * float(scale)):
            return False
    return True


def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-4) -> int:
    """Fold, in place, every eval-mode BatchNorm2d that directly follows a Conv2d of `model` and whose fold leaves
    the outputs on `example` unchanged (a conv whose raw output is also used elsewhere, as in pre-activation nets,
    keeps its BatchNorm); returns the number of folded pairs."""
    if model.training:
        raise ValueError("fold_batchnorm: the model is in train mode; BatchNorm folds only with frozen statistics")
    probe = _copy_without_hooks(model)  # the caller's hooks (explanation tapes) must not see the probe's forwards
    example = example.detach()
    with torch.autocast(example.device.type, enabled=False):  # compare in full precision
        pairs = _conv_bn_pairs(probe, example)
        if not pairs:
            return 0
        with torch.no_grad():
            reference = probe(example)
            _apply_fold(probe, pairs)
            if not _outputs_match(reference, probe(example), rtol, atol):
                return 0
    _apply_fold(model, pairs)
    return len(pairs)
