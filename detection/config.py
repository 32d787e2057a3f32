"""Every default of the detection project in one yacs node, and `_BASE_`-aware loading of its yaml files."""
from pathlib import Path
from typing import Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

_BASE_KEY = "_BASE_"
KD_TYPES = ("NONE", "DKD", "ReviewKD", "ReviewDKD")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")


def get_cfg() -> CN:
    """A fresh copy of the defaults (Detectron2's Faster R-CNN FPN defaults mapped onto torchvision's detector)."""
    cfg = CN()
    cfg.OUTPUT_DIR = "output/detection"
    cfg.SEED = -1  # -1: not seeded

    cfg.MODEL = CN()
    cfg.MODEL.DEVICE = ""  # "": cuda when available, else cpu
    # Labels are COCO category ids (torchvision's convention: 91 slots, 0 = background), so torchvision's
    # COCO detectors load unchanged as teachers.
    cfg.MODEL.NUM_CLASSES = 91
    cfg.MODEL.WEIGHTS = ""  # full student detector checkpoint (eval-only or fine-tuning start)
    # torchvision scale (images in [0, 1], RGB); Detectron2's 0-255 values divided by 255.
    cfg.MODEL.PIXEL_MEAN = [0.485, 0.456, 0.406]
    cfg.MODEL.PIXEL_STD = [0.229, 0.224, 0.225]
    cfg.MODEL.BACKBONE = CN()
    cfg.MODEL.BACKBONE.NAME = "resnet18"
    cfg.MODEL.BACKBONE.WEIGHTS = ""  # "": random init, "torchvision": ImageNet weights from the local cache, or a path
    cfg.MODEL.BACKBONE.NORM = "FrozenBN"  # "FrozenBN" or "BN"
    cfg.MODEL.BACKBONE.TRAINABLE_LAYERS = 3  # trailing backbone stages trained (Detectron2 FREEZE_AT 2 == 3 here)
    cfg.MODEL.RPN = CN()
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    cfg.MODEL.RPN.NMS_THRESH = 0.7
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    cfg.MODEL.ROI_HEADS = CN()
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = 100

    cfg.TEACHER = CN()
    cfg.TEACHER.BACKBONE = CN()
    cfg.TEACHER.BACKBONE.NAME = "resnet101"
    cfg.TEACHER.BACKBONE.NORM = "FrozenBN"
    # "torchvision" (COCO detector from the local cache; resnet50 only) or a checkpoint path
    cfg.TEACHER.WEIGHTS = ""
    cfg.TEACHER.PIXEL_MEAN = [0.485, 0.456, 0.406]
    cfg.TEACHER.PIXEL_STD = [0.229, 0.224, 0.225]

    cfg.KD = CN()
    cfg.KD.TYPE = "DKD"  # one of KD_TYPES
    cfg.KD.DKD = CN()
    cfg.KD.DKD.ALPHA = 1.0
    cfg.KD.DKD.BETA = 0.25
    cfg.KD.DKD.T = 1.0
    cfg.KD.REVIEWKD = CN()
    cfg.KD.REVIEWKD.LOSS_WEIGHT = 1.0

    cfg.DATASETS = CN()
    cfg.DATASETS.ROOT = "detection/datasets/coco"  # relative paths are taken from the working directory
    cfg.DATASETS.TRAIN = "train2017"  # images in ROOT/<split>, boxes in ROOT/annotations/instances_<split>.json
    cfg.DATASETS.TEST = "val2017"

    cfg.INPUT = CN()
    cfg.INPUT.MIN_SIZE_TRAIN = [640, 672, 704, 736, 768, 800]
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE = 1333
    cfg.INPUT.HFLIP_PROB = 0.5

    cfg.DATALOADER = CN()
    cfg.DATALOADER.NUM_WORKERS = 4

    cfg.SOLVER = CN()
    cfg.SOLVER.IMS_PER_BATCH = 16  # over all processes
    cfg.SOLVER.BASE_LR = 0.02
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 0.0001
    cfg.SOLVER.STEPS = [60000, 80000]
    cfg.SOLVER.GAMMA = 0.1
    cfg.SOLVER.MAX_ITER = 90000
    cfg.SOLVER.WARMUP_ITERS = 1000
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    cfg.SOLVER.LOG_PERIOD = 20

    cfg.TEST = CN()
    cfg.TEST.EVAL_PERIOD = 0  # 0: evaluate once, after the last iteration
    cfg.TEST.IMS_PER_BATCH = 1  # per process
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    base = data.pop(_BASE_KEY, None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base)
    _deep_update(merged, data)
    return merged


def _deep_update(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def load_cfg(config_file: Optional[str] = None, opts: Sequence[str] = ()) -> CN:
    """Defaults, then the yaml file (its `_BASE_` chain first, relative to the file), then `KEY VALUE` overrides."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_other_cfg(CN(_read_yaml(Path(config_file))))
    cfg.merge_from_list(list(opts))
    check_cfg(cfg)
    cfg.freeze()
    return cfg


def check_cfg(cfg: CN) -> None:
    """Reject values the code cannot honour, naming the key."""
    if cfg.KD.TYPE not in KD_TYPES:
        raise ValueError(f"KD.TYPE: got {cfg.KD.TYPE!r}, expected one of {KD_TYPES}")
    names = (("MODEL.BACKBONE.NAME", cfg.MODEL.BACKBONE.NAME), ("TEACHER.BACKBONE.NAME", cfg.TEACHER.BACKBONE.NAME))
    for key, name in names:
        if name not in BACKBONES:
            raise ValueError(f"{key}: got {name!r}, expected one of {BACKBONES}")
    norms = (("MODEL.BACKBONE.NORM", cfg.MODEL.BACKBONE.NORM), ("TEACHER.BACKBONE.NORM", cfg.TEACHER.BACKBONE.NORM))
    for key, norm in norms:
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"{key}: got {norm!r}, expected 'FrozenBN' or 'BN'")
    if list(cfg.SOLVER.STEPS) != sorted(cfg.SOLVER.STEPS):
        raise ValueError(f"SOLVER.STEPS: got {list(cfg.SOLVER.STEPS)}, expected increasing iterations")
