"""Train or evaluate a distilled COCO detector:

    python3 detection/train_net.py --config-file detection/configs/DKD/DKD-R18-R101.yaml [--resume] [KEY VALUE ...]
    python3 detection/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/DKD-R18-R101/student_latest
    torchrun --nproc_per_node 4 detection/train_net.py --config-file ...
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `detection` (and `mdistiller`) importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detection.config import load_cfg
from detection.engine import evaluate_only, train


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Knowledge distillation for COCO detection (torchvision Faster R-CNN)")
    parser.add_argument("--config-file", default="", metavar="FILE", help="yaml config (its _BASE_ is merged first)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST and exit")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/latest")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, e.g. SOLVER.IMS_PER_BATCH 4")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = load_cfg(args.config_file, args.opts)
    if args.eval_only:
        evaluate_only(cfg)
    else:
        train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
