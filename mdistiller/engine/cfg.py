"""Every configuration default of the framework, in one yacs node (upstream mdistiller keys first)."""
from yacs.config import CfgNode as CN


def show_cfg(cfg: CN) -> None:
    """Print the general nodes and the node of the chosen distiller (upstream's start-of-run dump)."""
    from .utils import log_msg

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

# Dataset
CFG.DATASET = CN()
CFG.DATASET.TYPE = "cifar100"
CFG.DATASET.ROOT = "data"
CFG.DATASET.DOWNLOAD = False
CFG.DATASET.NUM_WORKERS = 2
CFG.DATASET.TRAIN_SUBSET = 0  # >0: train on this many training images (a fixed, seeded choice)
CFG.DATASET.VALIDATION_FROM_TRAIN = 0  # >0: hold out this many training images and validate on them, not the test split
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
CFG.SOLVER.TYPE = "SGD"
# Speed (issue 8). BATCH_SIZE is the global batch: under torchrun each of WORLD_SIZE ranks takes BATCH_SIZE/WORLD_SIZE.
CFG.SOLVER.SYNC_BN = False  # DDP only: student BatchNorm statistics over the global batch
CFG.SOLVER.AMP = ""  # "", "bf16" or "fp16" (with a GradScaler); CUDA only, ignored on CPU
CFG.SOLVER.CHANNELS_LAST = False  # models and batches in NHWC memory format
CFG.SOLVER.SKIP_NONFINITE = False  # True: skip an optimizer step whose loss is NaN/inf (one host sync per step)
CFG.SOLVER.COMPILE = ""  # torch.compile: "" off, "teacher" (frozen: inference graph), "all" (+ the student)
CFG.SOLVER.DOT = CN()
CFG.SOLVER.DOT.DELTA = 0.075

# Log
CFG.LOG = CN()
CFG.LOG.TENSORBOARD_FREQ = 500
CFG.LOG.SAVE_CHECKPOINT_FREQ = 40
CFG.LOG.PREFIX = "./output"
CFG.LOG.WANDB = False

# Distillation methods
CFG.KD = CN()
CFG.KD.TEMPERATURE = 4
CFG.KD.LOSS = CN()
CFG.KD.LOSS.CE_WEIGHT = 0.1
CFG.KD.LOSS.KD_WEIGHT = 0.9

CFG.AT = CN()
CFG.AT.P = 2
CFG.AT.LOSS = CN()
CFG.AT.LOSS.CE_WEIGHT = 1.0
CFG.AT.LOSS.FEAT_WEIGHT = 1000.0

CFG.RKD = CN()
CFG.RKD.DISTANCE_WEIGHT = 25
CFG.RKD.ANGLE_WEIGHT = 50
CFG.RKD.LOSS = CN()
CFG.RKD.LOSS.CE_WEIGHT = 1.0
CFG.RKD.LOSS.FEAT_WEIGHT = 1.0
CFG.RKD.PDIST = CN()
CFG.RKD.PDIST.EPSILON = 1e-12
CFG.RKD.PDIST.SQUARED = False

CFG.FITNET = CN()
CFG.FITNET.HINT_LAYER = 2
CFG.FITNET.INPUT_SIZE = (32, 32)
CFG.FITNET.LOSS = CN()
CFG.FITNET.LOSS.CE_WEIGHT = 1.0
CFG.FITNET.LOSS.FEAT_WEIGHT = 100.0

CFG.KDSVD = CN()
CFG.KDSVD.K = 1
CFG.KDSVD.LOSS = CN()
CFG.KDSVD.LOSS.CE_WEIGHT = 1.0
CFG.KDSVD.LOSS.FEAT_WEIGHT = 1.0

CFG.OFD = CN()
CFG.OFD.LOSS = CN()
CFG.OFD.LOSS.CE_WEIGHT = 1.0
CFG.OFD.LOSS.FEAT_WEIGHT = 0.001
CFG.OFD.CONNECTOR = CN()
CFG.OFD.CONNECTOR.KERNEL_SIZE = 1
CFG.OFD.TEACHER_TRAIN_MODE = False  # True: upstream's behaviour (teacher BatchNorm in train mode during distillation)

CFG.NST = CN()
CFG.NST.LOSS = CN()
CFG.NST.LOSS.CE_WEIGHT = 1.0
CFG.NST.LOSS.FEAT_WEIGHT = 50.0

CFG.PKT = CN()
CFG.PKT.LOSS = CN()
CFG.PKT.LOSS.CE_WEIGHT = 1.0
CFG.PKT.LOSS.FEAT_WEIGHT = 30000.0

CFG.SP = CN()
CFG.SP.LOSS = CN()
CFG.SP.LOSS.CE_WEIGHT = 1.0
CFG.SP.LOSS.FEAT_WEIGHT = 3000.0

CFG.VID = CN()
CFG.VID.LOSS = CN()
CFG.VID.LOSS.CE_WEIGHT = 1.0
CFG.VID.LOSS.FEAT_WEIGHT = 1.0
CFG.VID.EPS = 1e-5
CFG.VID.INIT_PRED_VAR = 5.0
CFG.VID.INPUT_SIZE = (32, 32)

CFG.CRD = CN()
CFG.CRD.MODE = "exact"  # "exact" or "relax"
CFG.CRD.FEAT = CN()
CFG.CRD.FEAT.DIM = 128
CFG.CRD.FEAT.STUDENT_DIM = 256
CFG.CRD.FEAT.TEACHER_DIM = 256
CFG.CRD.LOSS = CN()
CFG.CRD.LOSS.CE_WEIGHT = 1.0
CFG.CRD.LOSS.FEAT_WEIGHT = 0.8
CFG.CRD.NCE = CN()
CFG.CRD.NCE.K = 16384
CFG.CRD.NCE.MOMENTUM = 0.5
CFG.CRD.NCE.TEMPERATURE = 0.07

CFG.REVIEWKD = CN()
CFG.REVIEWKD.CE_WEIGHT = 1.0
CFG.REVIEWKD.REVIEWKD_WEIGHT = 1.0
CFG.REVIEWKD.WARMUP_EPOCHS = 20
CFG.REVIEWKD.SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.IN_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.OUT_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.MAX_MID_CHANNEL = 512
CFG.REVIEWKD.STU_PREACT = False

CFG.DKD = CN()
CFG.DKD.CE_WEIGHT = 1.0
CFG.DKD.ALPHA = 1.0
CFG.DKD.BETA = 8.0
CFG.DKD.T = 4.0
CFG.DKD.WARMUP = 20

# Exp-KD (issue 5): CE + KD + explanation-map transfer on the teacher's top-K classes
CFG.EXPKD = CN()
CFG.EXPKD.CE_WEIGHT = 0.1
CFG.EXPKD.KD_WEIGHT = 0.9
CFG.EXPKD.KD_T = 4.0
CFG.EXPKD.EXP_WEIGHT = 100.0  # tuned on digits with NORM l2 at 4x4 maps (docs/expkd.md)
CFG.EXPKD.WARMUP = 20  # epochs of linear ramp of the explanation term
CFG.EXPKD.TOPK = 5  # teacher's top-K classes; 0 = all classes
CFG.EXPKD.EXPLAINER = "cam"  # "cam", "gradcam", "lrp" (mdistiller.explain)
CFG.EXPKD.LAYER = "gap"  # "gap" or a stage index / module name (gradcam, lrp)
CFG.EXPKD.RULE = "epsilon_plus_flat"  # LRP rule or composite
CFG.EXPKD.DETACH_NORMALIZERS = False  # lrp: the student's rule normalisers are constants (cheaper, approximate)
CFG.EXPKD.RESOLUTION = 0  # pool both maps to RxR; 0 = the student's map size
CFG.EXPKD.NORM = "l2"  # per (sample, class) over space: "softmax" (temperature T), "l2", "none"
CFG.EXPKD.T = 1.0
CFG.EXPKD.DISTANCE = "mse"  # "mse", "kl" (needs NORM softmax), "cos"

# The Exp-KD fork's node, read by the "CAM" alias (ALPHA, BETA, METHOD, UPSAMPLE are unused, as in the fork)
CFG.CAM = CN()
CFG.CAM.LOSS = CN()
CFG.CAM.LOSS.CE_WEIGHT = 1.0
CFG.CAM.LOSS.FEAT_WEIGHT = 5.0
CFG.CAM.ALPHA = 1.0
CFG.CAM.BETA = 8.0
CFG.CAM.T = 1.0
CFG.CAM.K = 50
CFG.CAM.WARMUP = 1
CFG.CAM.METHOD = 0
CFG.CAM.UPSAMPLE = 1
