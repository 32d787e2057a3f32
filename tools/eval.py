"""Evaluate a model on a validation split, as upstream mdistiller:

    python3 tools/eval.py -m resnet8x4 -c output/cifar100_baselines/dkd,res32x4,res8x4/student_best [-bs 64]

CKPT may be a full checkpoint (`best`, `latest`), a `student_*` file, a teacher file, a bare state dict or a timm /
torchvision weights file (docs/models.md); the default "pretrain" is the registry's teacher checkpoint (torchvision
weights on ImageNet), "hub" downloads the hub weights of a timm:<name> / torchvision:<name> model. Trailing KEY VALUE
pairs override the config (e.g. DATASET.ROOT). Prints top-1, top-5 and the mean cross-entropy.
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.dataset import DATASETS, get_val_loader
from mdistiller.distillers import Vanilla
from mdistiller.engine.config import load_cfg
from mdistiller.engine.utils import log_msg, validate
from mdistiller.launch.build import default_device, load_model
from mdistiller.launch.cli import run_cli


def evaluate(model_name: str, ckpt: str, dataset: str, batch_size: int, opts: List[str]):
    """(top-1, top-5, loss) of `model_name` with weights `ckpt` on the validation split of `dataset`."""
    cfg = load_cfg(None, ["DATASET.TYPE", dataset, "DATASET.TEST.BATCH_SIZE", batch_size] + list(opts))
    val_loader, num_classes = get_val_loader(dataset, cfg.DATASET.ROOT, batch_size, cfg.DATASET.NUM_WORKERS)
    model = load_model(model_name, dataset, num_classes, ckpt)
    distiller = Vanilla(model).to(default_device())
    top1, top5, loss = validate(val_loader, distiller)
    print(log_msg("Top-1: {:.2f}| Top-5: {:.2f}| Loss: {:.4f}".format(top1, top5, loss), "EVAL"), flush=True)
    return top1, top5, loss


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("evaluation of a trained model.")
    parser.add_argument("-m", "--model", type=str, default="",
                        help="model name (docs/models.md), e.g. resnet8x4, timm:resnet18")
    parser.add_argument("-c", "--ckpt", type=str, default="pretrain",
                        help="weights file, pretrain (the registry's teacher, default) or hub")
    parser.add_argument("-d", "--dataset", type=str, default="cifar100", choices=sorted(DATASETS))
    parser.add_argument("-bs", "--batch-size", type=int, default=64)
    parser.add_argument("--debug", action="store_true", default=False, help="tracebacks instead of one-line errors")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    return run_cli(
        "eval.py", lambda: evaluate(args.model, args.ckpt, args.dataset, args.batch_size, args.opts or []), args.debug
    )


if __name__ == "__main__":
    sys.exit(main())
