"""Model zoos with upstream mdistiller's registries: `cifar_model_dict`, `tiny_imagenet_model_dict`
(name -> (constructor, teacher_ckpt or None)) and `imagenet_model_dict` (name -> constructor taking `pretrained=`),
and `build_model`, the one way every tool builds a model by name."""
from typing import Dict, Optional

import torch.nn as nn

from ..errors import ConfigError
from .cifar import cifar_model_dict, tiny_imagenet_model_dict
from .imagenet import imagenet_model_dict

__all__ = ["cifar_model_dict", "tiny_imagenet_model_dict", "imagenet_model_dict", "zoo", "build_model",
           "default_checkpoint", "zoo_entry"]


def zoo(dataset: str) -> Dict[str, object]:
    """The registry of `dataset`: ImageNet's, Tiny-ImageNet's, or the CIFAR-sized (32x32) one for every other."""
    if dataset == "imagenet":
        return imagenet_model_dict
    if dataset == "tiny_imagenet":
        return tiny_imagenet_model_dict
    return cifar_model_dict


def zoo_entry(name: str, dataset: str, key: str = "model"):
    """The registry entry of `name`, or a ConfigError naming `key`, the value and the registered names."""
    registry = zoo(dataset)
    if name not in registry:
        raise ConfigError(f"{key} = {name!r} is not in the {dataset} model registry; expected one of "
                          f"{', '.join(registry)}")
    return registry[name]


def build_model(name: str, num_classes: int, dataset: str = "cifar100", pretrained: bool = False,
                key: str = "model") -> nn.Module:
    """Model `name` of the zoo of `dataset`, freshly initialised for `num_classes` (weights are loaded separately;
    `pretrained` asks ImageNet models for torchvision's weights). `key` names the option in errors."""
    entry = zoo_entry(name, dataset, key)
    if dataset == "imagenet":
        if num_classes != 1000:
            raise ConfigError(f"{key} = {name!r}: the ImageNet zoo builds 1000-class models, not {num_classes}")
        return entry(pretrained=pretrained)
    if pretrained:
        raise ConfigError(f"{key} = {name!r}: pretrained hub weights exist for ImageNet models only; load a "
                          f"checkpoint file instead")
    return entry[0](num_classes=num_classes)


def default_checkpoint(name: str, dataset: str, key: str = "model") -> Optional[str]:
    """The registry's teacher checkpoint file of `name` (None when it has none, and for ImageNet, whose default
    teachers are torchvision's weights)."""
    entry = zoo_entry(name, dataset, key)
    return None if dataset == "imagenet" else entry[1]
