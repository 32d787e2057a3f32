"""Distiller registry: `distiller_dict[cfg.DISTILLER.TYPE]`."""
from ._base import Distiller, Vanilla
from .DKD import DKD
from .ExpKD import CAM, ExpKD
from .KD import KD
from .AT import AT
from .CRD import CRD
from .FitNet import FitNet
from .KDSVD import KDSVD
from .NST import NST
from .OFD import OFD
from .PKT import PKT
from .ReviewKD import ReviewKD
from .RKD import RKD
from .SP import SP
from .VID import VID

distiller_dict = {
    "NONE": Vanilla,
    "KD": KD,
    "DKD": DKD,
    "EXPKD": ExpKD,
    "CAM": CAM,  # the Exp-KD fork's key and CAM.* config node
    "AT": AT,
    "FITNET": FitNet,
    "RKD": RKD,
    "PKT": PKT,
    "SP": SP,
    "NST": NST,
    "KDSVD": KDSVD,
    "VID": VID,
    "OFD": OFD,
    "REVIEWKD": ReviewKD,
    "CRD": CRD,  # needs num_data=: CRD(student, teacher, cfg, num_data)
}
