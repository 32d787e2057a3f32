"""Train a student (or a model alone) from a config, as upstream mdistiller:

    python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml [--resume] [--debug] [KEY VALUE ...]
    torchrun --nproc_per_node=N tools/train.py --cfg ...   (DDP; SOLVER.BATCH_SIZE stays the global batch)

The run directory is LOG.PREFIX/EXPERIMENT.PROJECT/<NAME or TAG><KEY:VALUE,...> (or --run-dir DIR); `--resume`
continues from its `latest` checkpoint. It holds results.json and metrics.csv (docs/records.md).
Errors are one line on stderr; `--debug` shows the traceback instead.
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.launch.cli import run_cli
from mdistiller.launch.train import train


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("training for knowledge distillation.")
    parser.add_argument("--cfg", type=str, default="", help="experiment yaml (merged over the defaults)")
    parser.add_argument("--resume", action="store_true", default=False, help="continue from the run's `latest`")
    parser.add_argument("--run-dir", default=None,
                        help="write the run here instead of LOG.PREFIX/EXPERIMENT.PROJECT/<name>")
    parser.add_argument("--debug", action="store_true", default=False, help="tracebacks instead of one-line errors")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    return run_cli("train.py", lambda: train(args.cfg, args.resume, args.opts or [], args.run_dir), args.debug)


if __name__ == "__main__":
    sys.exit(main())
