"""Model registries: `cifar_model_dict`, `tiny_imagenet_model_dict` (name -> (constructor, teacher_ckpt or None))
and `imagenet_model_dict` (name -> constructor taking `pretrained=`)."""
from .cifar import cifar_model_dict, tiny_imagenet_model_dict
from .imagenet import imagenet_model_dict

__all__ = ["cifar_model_dict", "tiny_imagenet_model_dict", "imagenet_model_dict"]
