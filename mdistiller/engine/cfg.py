"""Every configuration default of the framework, in one yacs node: the general nodes here, and one node per
distiller, declared next to its class (`register_distiller(name, defaults=...)`) and added here when it registers."""
import copy

from yacs.config import CfgNode as CN

from ..distillers import distiller_dict
from ..errors import ConfigError
from .utils import log_msg


def show_cfg(cfg: CN) -> None:
    """Print the general nodes and the node of the chosen distiller (upstream's start-of-run dump)."""
    dump_cfg = CN()
    for key in ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "LOG"):
        dump_cfg[key] = cfg[key]
    if cfg.DISTILLER.TYPE in cfg:
        dump_cfg[cfg.DISTILLER.TYPE] = cfg[cfg.DISTILLER.TYPE]
    print(log_msg("CONFIG:\n{}".format(dump_cfg.dump()), "INFO"))


CFG = CN()

# Experiment
CFG.EXPERIMENT = CN()
CFG.EXPERIMENT.PROJECT = "distill"
CFG.EXPERIMENT.NAME = ""
CFG.EXPERIMENT.TAG = "default"
CFG.EXPERIMENT.SEED = -1  # -1: not seeded (upstream behaviour)
CFG.EXPERIMENT.DETERMINISTIC = False
CFG.EXPERIMENT.IMPORTS = []  # modules or .py files imported before anything is built (users' distillers, trainers)

# Dataset
CFG.DATASET = CN()
CFG.DATASET.TYPE = "cifar100"
CFG.DATASET.ROOT = "data"
CFG.DATASET.DOWNLOAD = False
CFG.DATASET.NUM_WORKERS = 2
CFG.DATASET.TRAIN_SUBSET = 0  # >0: train on this many training images (a fixed, seeded choice)
CFG.DATASET.VALIDATION_FROM_TRAIN = 0  # >0: hold out this many training images and validate on them, not the test split
CFG.DATASET.IMAGE_SIZE = 32  # "folder": the square input size (CIFAR-style augmentation up to 64, ImageNet-style above)
CFG.DATASET.MEAN = []  # "folder": per-channel normalisation; [] uses ImageNet's statistics
CFG.DATASET.STD = []
CFG.DATASET.LOADER = "torch"  # "torch": DataLoader + PIL transforms; "device": CIFAR uint8 + aug on the train device
CFG.DATASET.TEST = CN()
CFG.DATASET.TEST.BATCH_SIZE = 64

# Distiller
CFG.DISTILLER = CN()
CFG.DISTILLER.TYPE = "NONE"  # vanilla
CFG.DISTILLER.TEACHER = "ResNet50"
CFG.DISTILLER.STUDENT = "resnet32"
CFG.DISTILLER.TEACHER_CKPT = ""  # empty: the registry's default teacher checkpoint

# Solver
CFG.SOLVER = CN()
CFG.SOLVER.TRAINER = "base"
CFG.SOLVER.BATCH_SIZE = 64
CFG.SOLVER.EPOCHS = 240
CFG.SOLVER.LR = 0.05
CFG.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
CFG.SOLVER.LR_DECAY_RATE = 0.1
CFG.SOLVER.WEIGHT_DECAY = 0.0001
CFG.SOLVER.MOMENTUM = 0.9
CFG.SOLVER.TYPE = "SGD"  # "SGD" (upstream) or "AdamW" (betas 0.9, 0.999; MOMENTUM unused)
# Recipes (docs/recipes.md); these defaults train exactly as upstream.
CFG.SOLVER.SCHEDULER = "step"  # "step": LR_DECAY_STAGES/RATE (upstream); "cosine": anneal to MIN_LR after warm-up
CFG.SOLVER.MIN_LR = 0.0  # "cosine": the LR the cosine anneals towards
CFG.SOLVER.WARMUP_EPOCHS = 0  # W > 0: epoch e <= W trains at the scheduled LR times e/W (either scheduler)
CFG.SOLVER.LABEL_SMOOTHING = 0.0  # epsilon of the student's cross-entropy term (loss_ce) of every distiller
CFG.SOLVER.CLIP_GRAD = 0.0  # > 0: clip the total gradient norm of the learnable parameters to it before each step
CFG.SOLVER.EMA_DECAY = 0.0  # > 0: also train, validate and save an exponential moving average of the student
# Speed (docs/reliability.md). BATCH_SIZE is the global batch: under torchrun each of WORLD_SIZE ranks takes
# BATCH_SIZE/WORLD_SIZE.
CFG.SOLVER.SYNC_BN = False  # DDP only: student BatchNorm statistics over the global batch
CFG.SOLVER.AMP = ""  # "", "bf16" or "fp16" (with a GradScaler); CUDA only, ignored on CPU
CFG.SOLVER.CHANNELS_LAST = False  # models and batches in NHWC memory format
CFG.SOLVER.SKIP_NONFINITE = False  # True: skip an optimizer step whose loss is NaN/inf (one host sync per step)
CFG.SOLVER.COMPILE = ""  # torch.compile: "" off, "teacher" (frozen: inference graph), "all" (+ the student)
CFG.SOLVER.DOT = CN()
CFG.SOLVER.DOT.DELTA = 0.075

# Log
CFG.LOG = CN()
CFG.LOG.TENSORBOARD_FREQ = 500  # every N training steps: each loss term and the LR to TensorBoard; 0: off
CFG.LOG.SAVE_CHECKPOINT_FREQ = 40
CFG.LOG.PREFIX = "./output"
CFG.LOG.WANDB = False



def add_distiller_node(name: str, cls: type) -> None:
    """Add the config node a distiller declared (called for every registered distiller, now and later)."""
    node, defaults = getattr(cls, "config_node", None), getattr(cls, "config_defaults", None)
    if not node or defaults is None:
        return
    if node in CFG:
        if not isinstance(CFG[node], CN) or CFG[node] != CN(copy.deepcopy(defaults)):
            raise ConfigError(f"distiller {name!r} declares the config node {node}, which already exists with other "
                              f"defaults; choose another node name")
        return
    CFG[node] = CN(copy.deepcopy(defaults))


distiller_dict.subscribe(add_distiller_node)
