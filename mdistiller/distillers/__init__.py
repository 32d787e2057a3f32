"""Distiller registry: `distiller_dict[cfg.DISTILLER.TYPE]`."""
from ._base import Distiller, Vanilla
from .DKD import DKD
from .KD import KD

distiller_dict = {
    "NONE": Vanilla,
    "KD": KD,
    "DKD": DKD,
}
