"""ResNet / MobileNetV2 + FPN bodies (torchvision building blocks) and the weight files they start from."""
from pathlib import Path

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

# torchvision ImageNet weights per backbone name (used only when "torchvision" is asked for and cached locally).
_IMAGENET_WEIGHTS = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": models.ResNet101_Weights.IMAGENET1K_V1,
    "mobilenet_v2": models.MobileNet_V2_Weights.IMAGENET1K_V1,
}
# MobileNetV2 `features` indices that end the stride-4/8/16/32 stages (Detectron2's m2..m5), with their widths.
_MV2_STAGE_ENDS = {"3": "0", "6": "1", "13": "2", "18": "3"}
_MV2_STAGE_CHANNELS = [24, 32, 96, 1280]
_MV2_STAGE_STARTS = [0, 2, 4, 7, 14]  # stem, then the first (strided) block of each stage
FPN_CHANNELS = 256


def cached_torchvision_file(weights: models.WeightsEnum, key: str) -> Path:
    """The local-cache path of a torchvision weight file; one clear error instead of an implicit download."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: torchvision weights {weights} are not in the local cache ({path}); "
            f"download {weights.url} there or give a checkpoint path"
        )
    return path


def load_state_dict_file(path: str, key: str) -> dict:
    """A bare state dict from `path` (accepts `{"model": state_dict}` files written by our engines)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: checkpoint file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def _body(name: str, norm: str, weights: str) -> nn.Module:
    norm_layer = FrozenBatchNorm2d if norm == "FrozenBN" else nn.BatchNorm2d
    body = getattr(models, name)(weights=None, norm_layer=norm_layer)
    if weights == "torchvision":
        state = torch.load(
            cached_torchvision_file(_IMAGENET_WEIGHTS[name], "MODEL.BACKBONE.WEIGHTS"), map_location="cpu",
            weights_only=True,
        )
    elif weights:
        state = load_state_dict_file(weights, "MODEL.BACKBONE.WEIGHTS")
    else:
        return body
    # Classifier heads are dropped by the FPN extractor, so they may be absent or of another width.
    missing, unexpected = body.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}, strict=False
    )
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"MODEL.BACKBONE.WEIGHTS: {weights} does not fit {name} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return body


def _mobilenet_v2_fpn(body: nn.Module, trainable_layers: int) -> BackboneWithFPN:
    features = body.features
    if not 0 <= trainable_layers <= len(_MV2_STAGE_STARTS):
        raise ValueError(
            f"MODEL.BACKBONE.TRAINABLE_LAYERS: got {trainable_layers}, expected 0..{len(_MV2_STAGE_STARTS)}"
        )
    stages = len(_MV2_STAGE_STARTS)
    freeze_before = len(features) if trainable_layers == 0 else _MV2_STAGE_STARTS[stages - trainable_layers]
    for param in features[:freeze_before].parameters():
        param.requires_grad_(False)
    return BackboneWithFPN(
        features, _MV2_STAGE_ENDS, _MV2_STAGE_CHANNELS, FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
    )


def build_backbone(name: str, norm: str = "FrozenBN", weights: str = "", trainable_layers: int = 5) -> BackboneWithFPN:
    """A 5-level FPN (strides 4..64, 256 channels, keys '0'..'3', 'pool') over a ResNet or MobileNetV2 body."""
    body = _body(name, norm, weights)
    if name == "mobilenet_v2":
        return _mobilenet_v2_fpn(body, trainable_layers)
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"MODEL.BACKBONE.TRAINABLE_LAYERS: got {trainable_layers}, expected 0..5")
    return _resnet_fpn_extractor(body, trainable_layers, returned_layers=[1, 2, 3, 4], extra_blocks=LastLevelMaxPool())
