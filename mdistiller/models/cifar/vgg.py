"""Placeholder: being written (replace this whole file)."""


def vgg8_bn(*args, **kwargs):
    raise NotImplementedError("vgg8_bn is being written")


def vgg11_bn(*args, **kwargs):
    raise NotImplementedError("vgg11_bn is being written")


def vgg13_bn(*args, **kwargs):
    raise NotImplementedError("vgg13_bn is being written")


def vgg16_bn(*args, **kwargs):
    raise NotImplementedError("vgg16_bn is being written")


def vgg19_bn(*args, **kwargs):
    raise NotImplementedError("vgg19_bn is being written")
