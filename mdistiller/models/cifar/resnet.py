"""Placeholder: being written (replace this whole file)."""


def resnet8(*args, **kwargs):
    raise NotImplementedError("resnet8 is being written")


def resnet14(*args, **kwargs):
    raise NotImplementedError("resnet14 is being written")


def resnet20(*args, **kwargs):
    raise NotImplementedError("resnet20 is being written")


def resnet32(*args, **kwargs):
    raise NotImplementedError("resnet32 is being written")


def resnet44(*args, **kwargs):
    raise NotImplementedError("resnet44 is being written")


def resnet56(*args, **kwargs):
    raise NotImplementedError("resnet56 is being written")


def resnet110(*args, **kwargs):
    raise NotImplementedError("resnet110 is being written")


def resnet8x4(*args, **kwargs):
    raise NotImplementedError("resnet8x4 is being written")


def resnet32x4(*args, **kwargs):
    raise NotImplementedError("resnet32x4 is being written")
