"""A training run from a config file and overrides: what `tools/train.py` runs (also under torchrun)."""
from typing import Optional, Sequence

from ..dataset import get_dataset
from ..distillers import distiller_class
from ..engine import distributed
from ..engine.cfg import show_cfg
from ..engine.config import experiment_name, load_cfg
from ..engine.rng import seed_everything
from ..engine.utils import log_msg
from .build import (
    build_distiller,
    check_names,
    default_device,
    teacher_checkpoint_path,
    trainer_class,
    unread_overrides,
)


def train(cfg_path: str, resume: bool, opts: Sequence[str], run_dir: Optional[str] = None) -> None:
    """Train as upstream's tools/train.py; `run_dir` replaces the LOG.PREFIX/PROJECT/name rule (sweeps use it)."""
    distributed.init_from_env()  # torchrun: join the process group; ranks > 0 print nothing
    opts = list(opts)
    cfg = load_cfg(cfg_path, opts)
    check_names(cfg)
    name, tags = experiment_name(cfg, opts)
    show_cfg(cfg)
    for key in unread_overrides(cfg, opts):
        print(log_msg(f"{key} is set but DISTILLER.TYPE {cfg.DISTILLER.TYPE} never reads it", "INFO"), flush=True)
    seed_everything(cfg.EXPERIMENT.SEED, cfg.EXPERIMENT.DETERMINISTIC)
    method = distiller_class(cfg.DISTILLER.TYPE)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfg, contrastive=method.contrastive_batches)
    train_loader, val_loader = distributed.shard_loaders(train_loader, val_loader, cfg)
    distiller = build_distiller(cfg, num_data, num_classes).to(default_device())
    print(log_msg("Extra parameters of {}: {}".format(cfg.DISTILLER.TYPE, distiller.get_extra_parameters()), "INFO"))
    teacher_ckpt = teacher_checkpoint_path(cfg) if method.needs_teacher else ""
    trainer = trainer_class(cfg)(name, distiller, train_loader, val_loader, cfg, tags=tags, run_dir=run_dir,
                                 overrides=opts, teacher_ckpt=teacher_ckpt)
    trainer.train(resume=resume)
    distributed.shutdown()
