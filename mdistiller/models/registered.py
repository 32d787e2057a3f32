"""Users' own models by name: `@register_model("name")` on a constructor `fn(num_classes, image_size) -> nn.Module`,
in a file loaded through EXPERIMENT.IMPORTS (docs/extending.md). The model keeps the zoo's contract
(docs/models.md): `forward(x) -> (logits, feats)` and `get_classifier()`."""
from typing import Callable

import torch.nn as nn

from ..errors import ConfigError
from ..registry import Registry
from .cifar import cifar_model_dict, tiny_imagenet_model_dict
from .imagenet import imagenet_model_dict

ModelFn = Callable[[int, int], nn.Module]

# name -> constructor; filled by `register_model` as users' files are imported
model_dict: Registry = Registry("model", "register_model")


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator: `model_dict[name] = fn`. Names with ':' (timm:, torchvision:) and the zoos' names are taken."""
    if ":" in name:
        raise ConfigError(f"register_model({name!r}): names with ':' are reserved for timm: and torchvision: models")
    if any(name in zoo for zoo in (cifar_model_dict, tiny_imagenet_model_dict, imagenet_model_dict)):
        raise ConfigError(f"register_model({name!r}): the model zoo already has this name; choose another")
    return model_dict.register(name)
