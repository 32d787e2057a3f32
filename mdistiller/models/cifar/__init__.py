"""CIFAR-100 (32x32) and Tiny-ImageNet (64x64) model zoo, with upstream mdistiller's registry names."""
import os

from .mobilenetv2 import mobile_half
from .mv2_tinyimagenet import mobilenetv2_tinyimagenet
from .resnet import resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, resnet56, resnet110
from .resnetv2 import ResNet18, ResNet50
from .ShuffleNetv1 import ShuffleV1
from .ShuffleNetv2 import ShuffleV2
from .vgg import vgg8_bn, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../.."))
cifar100_model_prefix = os.path.join(REPO_ROOT, "download_ckpts/cifar_teachers/")
tiny_imagenet_model_prefix = os.path.join(REPO_ROOT, "download_ckpts/tiny_imagenet_teachers/")


def _teacher(name: str) -> str:
    return os.path.join(cifar100_model_prefix, f"{name}_vanilla/ckpt_epoch_240.pth")


cifar_model_dict = {
    # teachers
    "resnet56": (resnet56, _teacher("resnet56")),
    "resnet110": (resnet110, _teacher("resnet110")),
    "resnet32x4": (resnet32x4, _teacher("resnet32x4")),
    "ResNet50": (ResNet50, _teacher("ResNet50")),
    "wrn_40_2": (wrn_40_2, _teacher("wrn_40_2")),
    "vgg13": (vgg13_bn, _teacher("vgg13")),
    # students
    "resnet8": (resnet8, None),
    "resnet14": (resnet14, None),
    "resnet20": (resnet20, None),
    "resnet32": (resnet32, None),
    "resnet44": (resnet44, None),
    "resnet8x4": (resnet8x4, None),
    "ResNet18": (ResNet18, None),
    "wrn_16_1": (wrn_16_1, None),
    "wrn_16_2": (wrn_16_2, None),
    "wrn_40_1": (wrn_40_1, None),
    "vgg8": (vgg8_bn, None),
    "vgg11": (vgg11_bn, None),
    "vgg16": (vgg16_bn, None),
    "vgg19": (vgg19_bn, None),
    "MobileNetV2": (mobile_half, None),
    "ShuffleV1": (ShuffleV1, None),
    "ShuffleV2": (ShuffleV2, None),
}

tiny_imagenet_model_dict = {
    "ResNet18": (ResNet18, os.path.join(tiny_imagenet_model_prefix, "ResNet18_vanilla/ti_res18")),
    "MobileNetV2": (mobilenetv2_tinyimagenet, None),
    "ShuffleV2": (ShuffleV2, None),
}
