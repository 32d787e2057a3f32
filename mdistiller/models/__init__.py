"""Model zoos with upstream mdistiller's registries: `cifar_model_dict`, `tiny_imagenet_model_dict`
(name -> (constructor, teacher_ckpt or None)) and `imagenet_model_dict` (name -> constructor taking `pretrained=`);
open models by name (`timm:<name>`, `torchvision:<name>`) and users' registered ones (`register_model`); and
`build_model`, the one way every tool builds a model by name (docs/models.md)."""
from typing import Dict, Optional

import torch.nn as nn

from ..errors import ConfigError
from . import timm_zoo, torchvision_zoo
from .cifar import cifar_model_dict, tiny_imagenet_model_dict
from .imagenet import imagenet_model_dict
from .registered import model_dict, register_model

__all__ = ["cifar_model_dict", "tiny_imagenet_model_dict", "imagenet_model_dict", "zoo", "build_model",
           "default_checkpoint", "zoo_entry", "check_model_name", "is_zoo_name", "register_model", "model_dict"]

FAMILIES = {timm_zoo.PREFIX: timm_zoo, torchvision_zoo.PREFIX: torchvision_zoo}


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
                          f"{', '.join([*registry, *model_dict])}, or timm:<name> / torchvision:<name> "
                          f"(docs/models.md)")
    return registry[name]


def _family(name: str, key: str):
    """(the timm/torchvision module, the name without its prefix) of a prefixed name; (None, name) otherwise."""
    prefix, colon, arch = name.partition(":")
    if not colon:
        return None, name
    if prefix + colon not in FAMILIES:
        raise ConfigError(f"{key} = {name!r}: unknown prefix {prefix + colon!r}; expected one of "
                          f"{', '.join(FAMILIES)} (docs/models.md)")
    return FAMILIES[prefix + colon], arch


def is_zoo_name(name: str) -> bool:
    """Whether `name` is looked up in the zoos: not a timm:/torchvision: name, not a registered model."""
    return ":" not in name and name not in model_dict


def check_model_name(name: str, dataset: str = "cifar100", key: str = "model") -> None:
    """A ConfigError naming `key` unless `name` is a timm:/torchvision: model, a registered model or in the zoo of
    `dataset`; checks the name only, builds nothing."""
    family, arch = _family(name, key)
    if family is not None:
        family.check_name(arch, key)
    elif is_zoo_name(name):
        zoo_entry(name, dataset, key)


def build_model(name: str, num_classes: int, image_size: int = 32, dataset: str = "cifar100",
                pretrained: bool = False, key: str = "model") -> nn.Module:
    """Model `name` freshly initialised for `num_classes` and square inputs of `image_size` (weights are loaded
    separately): `timm:<name>`, `torchvision:<name>`, a registered model or a zoo model (the zoo of `dataset`).
    `pretrained` downloads hub weights for timm:/torchvision: models and asks ImageNet zoo models for torchvision's
    cached weights. `key` names the option in errors."""
    if not isinstance(image_size, int):
        raise TypeError(f"build_model: image_size is an int, got {image_size!r} (pass the data set as dataset=...)")
    family, arch = _family(name, key)
    if family is not None:
        return family.build(arch, num_classes, image_size, pretrained, key)
    if name in model_dict:
        if pretrained:
            raise ConfigError(f"{key} = {name!r}: pretrained hub weights exist for timm: and torchvision: models "
                              f"only; load a checkpoint file instead")
        return model_dict[name](num_classes, image_size)
    entry = zoo_entry(name, dataset, key)
    if dataset == "imagenet":
        if num_classes != 1000:
            raise ConfigError(f"{key} = {name!r}: the ImageNet zoo builds 1000-class models, not {num_classes}")
        return entry(pretrained=pretrained)
    if pretrained:
        raise ConfigError(f"{key} = {name!r}: pretrained hub weights exist for ImageNet zoo models and timm: / "
                          f"torchvision: models only; load a checkpoint file instead")
    return entry[0](num_classes=num_classes)


def default_checkpoint(name: str, dataset: str, key: str = "model") -> Optional[str]:
    """The registry's teacher checkpoint file of `name`: upstream's released CIFAR-100 and Tiny-ImageNet teachers;
    None when it has none, for ImageNet (whose default teachers are torchvision's weights) and for every other data
    set (the CIFAR-sized zoo's files are CIFAR-100 models); None for timm:/torchvision: and registered models."""
    if not is_zoo_name(name):
        return None
    entry = zoo_entry(name, dataset, key)
    return entry[1] if dataset in ("cifar100", "tiny_imagenet") else None
