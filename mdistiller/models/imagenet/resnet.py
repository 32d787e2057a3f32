"""Placeholder: being written (replace this whole file)."""


def resnet18(*args, **kwargs):
    raise NotImplementedError("resnet18 is being written")


def resnet34(*args, **kwargs):
    raise NotImplementedError("resnet34 is being written")


def resnet50(*args, **kwargs):
    raise NotImplementedError("resnet50 is being written")


def resnet101(*args, **kwargs):
    raise NotImplementedError("resnet101 is being written")


def resnet152(*args, **kwargs):
    raise NotImplementedError("resnet152 is being written")
