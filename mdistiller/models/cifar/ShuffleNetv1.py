"""Placeholder: being written (replace this whole file)."""


def ShuffleV1(*args, **kwargs):
    raise NotImplementedError("ShuffleV1 is being written")
