"""Placeholder: being written (replace this whole file)."""


def wrn_16_1(*args, **kwargs):
    raise NotImplementedError("wrn_16_1 is being written")


def wrn_16_2(*args, **kwargs):
    raise NotImplementedError("wrn_16_2 is being written")


def wrn_40_1(*args, **kwargs):
    raise NotImplementedError("wrn_40_1 is being written")


def wrn_40_2(*args, **kwargs):
    raise NotImplementedError("wrn_40_2 is being written")
