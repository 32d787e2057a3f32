"""Per-architecture adapters: each writes its model's forward as a relevance graph (`graph.GraphBuilder`).

One function per model class, mirroring that class's `forward` op by op, with the tensor that feeds global average
pooling (`gap_feat`) and the stage outputs (`feats["feats"]`) marked. Tests check that re-running the graph gives the
model's logits, `gap_feat` and every stage tensor, so an adapter cannot silently drift from its model.
"""
from typing import Callable, Dict, Sequence, Type

import torch.nn as nn
import torchvision.models as tvm

from ..models.cifar import ShuffleNetv1 as shufflev1
from ..models.cifar import ShuffleNetv2 as shufflev2
from ..models.cifar import mobilenetv2 as cifar_mv2
from ..models.cifar import mv2_tinyimagenet as tiny_mv2
from ..models.cifar import resnet as cifar_resnet
from ..models.cifar import resnetv2 as cifar_resnetv2
from ..models.cifar import vgg as cifar_vgg
from ..models.cifar import wrn as cifar_wrn
from ..models.imagenet import mobilenetv1 as imagenet_mv1
from ..models.imagenet import resnet as imagenet_resnet
from .graph import INPUT, Graph, GraphBuilder

Adapter = Callable[[GraphBuilder, nn.Module], None]
ADAPTERS: Dict[Type[nn.Module], Adapter] = {}


def adapter(*classes: Type[nn.Module]) -> Callable[[Adapter], Adapter]:
    def register(fn: Adapter) -> Adapter:
        for cls in classes:
            ADAPTERS[cls] = fn
        return fn

    return register


def build_graph(model: nn.Module, image_shape: Sequence[int]) -> Graph:
    """The relevance graph of `model` for inputs of `image_shape` (B, C, H, W)."""
    fn = ADAPTERS.get(type(model))
    if fn is None:
        raise ValueError(f"explain: no relevance adapter for {type(model).__module__}.{type(model).__name__}; "
                         f"supported: {sorted(cls.__name__ for cls in ADAPTERS)}")
    builder = GraphBuilder(model, image_shape)
    fn(builder, model)
    return builder.build()


def _blocks(model: nn.Module, *layers: str):
    """(qualified name, block) of every block of the given stages, in order, grouped by stage."""
    return [[(f"{layer}.{i}", block) for i, block in enumerate(model.get_submodule(layer))] for layer in layers]


@adapter(cifar_resnet.ResNet)
def _cifar_resnet(g: GraphBuilder, model: nn.Module) -> None:
    x = g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0")
    g.stages.append(x)
    for stage in _blocks(model, "layer1", "layer2", "layer3"):
        for p, block in stage:
            res = x if block.downsample is None else g.conv(x, f"{p}.downsample.0", f"{p}.downsample.1")
            h = g.relu(g.conv(x, f"{p}.conv1", f"{p}.bn1"))
            x = g.relu(g.add(g.conv(h, f"{p}.conv2", f"{p}.bn2"), res), name=p)
        g.stages.append(x)
    g.gap_head(x, "fc")


def _shortcut(g: GraphBuilder, x: str, p: str, block: nn.Module) -> str:
    return x if len(block.shortcut) == 0 else g.conv(x, f"{p}.shortcut.0", f"{p}.shortcut.1")


@adapter(cifar_resnetv2.ResNet)
def _cifar_resnetv2(g: GraphBuilder, model: nn.Module) -> None:
    x = g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0")
    g.stages.append(x)
    for stage in _blocks(model, "layer1", "layer2", "layer3", "layer4"):
        for p, block in stage:
            h = g.relu(g.conv(x, f"{p}.conv1", f"{p}.bn1"))
            if isinstance(block, cifar_resnetv2.Bottleneck):
                h = g.conv(g.relu(g.conv(h, f"{p}.conv2", f"{p}.bn2")), f"{p}.conv3", f"{p}.bn3")
            else:
                h = g.conv(h, f"{p}.conv2", f"{p}.bn2")
            x = g.relu(g.add(h, _shortcut(g, x, p, block)), name=p)
        g.stages.append(x)
    g.gap_head(x, "linear")


@adapter(cifar_wrn.WideResNet)
def _wrn(g: GraphBuilder, model: nn.Module) -> None:
    x = g.conv(INPUT, "conv1", name="f0")
    g.stages.append(x)
    for stage in _blocks(model, "block1.layer", "block2.layer", "block3.layer"):
        for p, block in stage:
            if block.droprate > 0 and block.training:
                raise ValueError(f"explain: {p} applies dropout in training mode (random, not in the relevance "
                                 f"graph); call .eval() or use dropRate=0")
            act = g.relu(g.bn(x, f"{p}.bn1"))
            h = g.conv(g.relu(g.conv(act, f"{p}.conv1", f"{p}.bn2")), f"{p}.conv2")
            res = x if block.equalInOut else g.conv(act, f"{p}.convShortcut")
            x = g.add(res, h, name=p)
        g.stages.append(x)
    g.gap_head(g.relu(g.bn(x, "bn1"), name="gap_feat"), "fc")


@adapter(cifar_vgg.VGG)
def _cifar_vgg(g: GraphBuilder, model: nn.Module) -> None:
    x = INPUT
    for i in range(5):
        x = g.relu(g.sequential(x, f"block{i}"), name=f"f{i}")
        g.stages.append(x)
        if i < 3 or (i == 3 and g.image_shape[2] == 64):
            x = g.maxpool(x, f"pool{i}")
    g.gap_head(x, "classifier")


@adapter(cifar_mv2.MobileNetV2)
def _cifar_mobilenetv2(g: GraphBuilder, model: nn.Module) -> None:
    x = g.sequential(INPUT, "conv1")
    g.stages.append(x)
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            branch = g.sequential(x, f"blocks.{i}.{j}.conv")
            x = g.add(x, branch, name=f"blocks.{i}.{j}") if block.use_res_connect else branch
        if i in (1, 2, 4, 6):
            g.stages.append(x)
    g.gap_head(g.sequential(x, "conv2"), "classifier.0")


def _linear_bottleneck(g: GraphBuilder, x: str, p: str, block: nn.Module) -> str:
    branch = g.sequential(x, f"{p}.residual")
    keep = block.stride == 1 and block.in_channels == block.out_channels
    return g.add(branch, x, name=p) if keep else branch


@adapter(tiny_mv2.MobileNetV2)
def _tiny_mobilenetv2(g: GraphBuilder, model: nn.Module) -> None:
    x = g.sequential(INPUT, "pre")
    g.stages.append(x)
    x = _linear_bottleneck(g, x, "stage1", model.stage1)
    for i in range(2, 7):
        for j, block in enumerate(model.get_submodule(f"stage{i}")):
            x = _linear_bottleneck(g, x, f"stage{i}.{j}", block)
        if i in (2, 3, 4):
            g.stages.append(x)
    x = _linear_bottleneck(g, x, "stage7", model.stage7)
    x = g.sequential(x, "conv1")
    g.stages.append(x)
    g.gap_head(x, "conv2")


@adapter(shufflev1.ShuffleNet)
def _shufflev1(g: GraphBuilder, model: nn.Module) -> None:
    x = g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0")
    g.stages.append(x)
    for stage in _blocks(model, "layer1", "layer2", "layer3"):
        for p, block in stage:
            h = g.shuffle(g.relu(g.conv(x, f"{p}.conv1", f"{p}.bn1")), block.shuffle1.groups)
            h = g.conv(g.relu(g.conv(h, f"{p}.conv2", f"{p}.bn2")), f"{p}.conv3", f"{p}.bn3")
            if block.stride == 2:
                x = g.cat([h, g.avgpool(x, f"{p}.shortcut.0")])
            else:
                x = g.add(h, x)
            x = g.relu(x, name=p)
        g.stages.append(x)
    g.gap_head(x, "linear")


@adapter(shufflev2.ShuffleNetV2)
def _shufflev2(g: GraphBuilder, model: nn.Module) -> None:
    x = g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0")
    g.stages.append(x)
    for stage in _blocks(model, "layer1", "layer2", "layer3"):
        for p, block in stage:
            if isinstance(block, shufflev2.DownBlock):
                left = g.relu(g.conv(g.conv(x, f"{p}.conv1", f"{p}.bn1"), f"{p}.conv2", f"{p}.bn2"))
                right = g.relu(g.conv(x, f"{p}.conv3", f"{p}.bn3"))
                right = g.relu(g.conv(g.conv(right, f"{p}.conv4", f"{p}.bn4"), f"{p}.conv5", f"{p}.bn5"))
                parts = [left, right]
            else:
                kept, x2 = g.split(x, block.split.ratio)
                h = g.relu(g.conv(x2, f"{p}.conv1", f"{p}.bn1"))
                h = g.relu(g.conv(g.conv(h, f"{p}.conv2", f"{p}.bn2"), f"{p}.conv3", f"{p}.bn3"))
                parts = [kept, h]
            x = g.shuffle(g.cat(parts), block.shuffle.groups, name=p)
        g.stages.append(x)
    g.gap_head(g.relu(g.conv(x, "conv2", "bn2"), name="gap_feat"), "linear")


@adapter(imagenet_resnet.ResNet)
def _imagenet_resnet(g: GraphBuilder, model: nn.Module) -> None:
    """Blocks start with relu(x) and end before their ReLU; the ReLU after each block is its output tensor."""
    x = g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0")
    g.stages.append(x)
    x = g.relu(g.maxpool(x, "maxpool"))
    for stage in _blocks(model, "layer1", "layer2", "layer3", "layer4"):
        for p, block in stage:
            res = x if block.downsample is None else g.conv(x, f"{p}.downsample.0", f"{p}.downsample.1")
            h = g.relu(g.conv(x, f"{p}.conv1", f"{p}.bn1"))
            if isinstance(block, imagenet_resnet.Bottleneck):
                h = g.conv(g.relu(g.conv(h, f"{p}.conv2", f"{p}.bn2")), f"{p}.conv3", f"{p}.bn3")
            else:
                h = g.conv(h, f"{p}.conv2", f"{p}.bn2")
            x = g.relu(g.add(h, res), name=p)
        g.stages.append(x)
    g.gap_head(x, "fc")


@adapter(imagenet_mv1.MobileNetV1)
def _mobilenetv1(g: GraphBuilder, model: nn.Module) -> None:
    x = INPUT
    for i in range(14):
        x = g.sequential(x, f"model.{i}")
        if i in (3, 5, 11, 13):
            g.stages.append(x)
    g.gap_head(x, "fc")


@adapter(tvm.ResNet)
def _torchvision_resnet(g: GraphBuilder, model: nn.Module) -> None:
    x = g.maxpool(g.relu(g.conv(INPUT, "conv1", "bn1"), name="f0"), "maxpool")
    for stage in _blocks(model, "layer1", "layer2", "layer3", "layer4"):
        for p, block in stage:
            res = x if block.downsample is None else g.conv(x, f"{p}.downsample.0", f"{p}.downsample.1")
            h = g.relu(g.conv(x, f"{p}.conv1", f"{p}.bn1"))
            if isinstance(block, tvm.resnet.Bottleneck):
                h = g.conv(g.relu(g.conv(h, f"{p}.conv2", f"{p}.bn2")), f"{p}.conv3", f"{p}.bn3")
            else:
                h = g.conv(h, f"{p}.conv2", f"{p}.bn2")
            x = g.relu(g.add(h, res), name=p)
        g.stages.append(x)
    g.gap_head(x, "fc")


@adapter(tvm.VGG)
def _torchvision_vgg(g: GraphBuilder, model: nn.Module) -> None:
    """features, adaptive pooling to 7x7, flatten, MLP classifier; no GAP head, so no CAM."""
    x = g.sequential(INPUT, "features")
    x = g.flatten(g.avgpool(x, "avgpool"))
    children = list(model.classifier.named_children())
    last = max(i for i, (_, child) in enumerate(children) if isinstance(child, nn.Linear))
    for name, child in children[:last]:
        if isinstance(child, nn.Linear):
            x = g.conv(x, f"classifier.{name}")
        elif isinstance(child, nn.ReLU):
            x = g.relu(x, name=f"classifier.{name}")
        elif isinstance(child, nn.Dropout) and child.training and child.p > 0:
            raise ValueError(f"explain: classifier.{name} is a Dropout in training mode; call .eval() on the model")
    g.head(x, f"classifier.{children[last][0]}")
    g.stages.extend(node.output for node in g.nodes if node.op == "maxpool")
