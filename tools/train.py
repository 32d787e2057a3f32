"""Train a student (or a model alone) from a config, as upstream mdistiller:

    python3 tools/train.py --cfg configs/cifar100/dkd/res32x4_res8x4.yaml [--resume] [--debug] [KEY VALUE ...]
    torchrun --nproc_per_node=N tools/train.py --cfg ...   (DDP; SOLVER.BATCH_SIZE stays the global batch)

The run directory is LOG.PREFIX/EXPERIMENT.PROJECT/<NAME or TAG><KEY:VALUE,...>; `--resume` continues from its
`latest` checkpoint. Errors are one line on stderr; `--debug` shows the traceback instead.
"""
import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.engine.cli import run_cli  # noqa: E402


def train(cfg_path: str, resume: bool, opts: List[str]) -> None:
    from mdistiller.dataset import get_dataset
    from mdistiller.engine import distributed, trainer_dict
    from mdistiller.engine.build import build_distiller, check_names, default_device
    from mdistiller.engine.cfg import show_cfg
    from mdistiller.engine.config import ConfigError, experiment_name, load_cfg
    from mdistiller.engine.rng import seed_everything
    from mdistiller.engine.utils import log_msg

    distributed.init_from_env()  # torchrun: join the process group; ranks > 0 print nothing
    cfg = load_cfg(cfg_path, opts)
    if cfg.SOLVER.TRAINER not in trainer_dict:
        raise ConfigError(
            f"SOLVER.TRAINER = {cfg.SOLVER.TRAINER!r} is not registered; expected one of {', '.join(trainer_dict)}"
        )
    check_names(cfg)
    name, tags = experiment_name(cfg, opts)
    show_cfg(cfg)
    seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
    train_loader, val_loader = distributed.shard_loaders(train_loader, val_loader, cfg)
    distiller = build_distiller(cfg, num_data, num_classes).to(default_device())
    print(log_msg("Extra parameters of {}: {}".format(cfg.DISTILLER.TYPE, distiller.get_extra_parameters()), "INFO"))
    trainer = trainer_dict[cfg.SOLVER.TRAINER](name, distiller, train_loader, val_loader, cfg, tags=tags)
    trainer.train(resume=resume)
    distributed.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser("training for knowledge distillation.")
    parser.add_argument("--cfg", type=str, default="", help="experiment yaml (merged over mdistiller/engine/cfg.py)")
    parser.add_argument("--resume", action="store_true", default=False, help="continue from the run's `latest`")
    parser.add_argument("--debug", action="store_true", default=False, help="tracebacks instead of one-line errors")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    return run_cli("train.py", lambda: train(args.cfg, args.resume, args.opts or []), args.debug)


if __name__ == "__main__":
    sys.exit(main())
