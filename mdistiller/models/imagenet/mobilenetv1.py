"""Placeholder: being written (replace this whole file)."""


def MobileNetV1(*args, **kwargs):
    raise NotImplementedError("MobileNetV1 is being written")
