"""torchrun DistributedDataParallel: process group from the environment, per-rank shards, the wrapped distiller.

`SOLVER.BATCH_SIZE` is the global batch: each of the WORLD_SIZE ranks trains on BATCH_SIZE / WORLD_SIZE images per
step and DDP averages the gradients, so a step sees the same images as a single-process step of BATCH_SIZE.
Validation is sharded without padding and its sums are all-reduced. A single process (no WORLD_SIZE > 1 in the
environment) gets every object back unchanged.
"""
import os
import sys
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "shard_loaders", "wrap_model",
           "unwrap", "all_reduce_sum", "NoOpWriter", "ShardSampler", "DistillerDDP"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); NCCL on CUDA,
    gloo on CPU. Ranks other than 0 print nothing (errors still reach stderr). False when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return True


def shutdown() -> None:
    """Wait for every rank, then leave the process group: a rank that exits with gloo's threads alive aborts
    (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no-op in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class NoOpWriter:
    """Stands in for rank 0's writers (run lock, TensorBoard) on the other ranks: every method call does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class ShardSampler(Sampler):
    """This rank's share of a (shuffled) index order that every rank draws identically from `generator`.

    `pad=True` (training) repeats leading indices so every rank gets the same number, hence the same number of DDP
    steps; `pad=False` (validation) counts each image once. The generator is what `engine.rng` checkpoints, so
    `--resume` continues the same order."""

    def __init__(self, num_items: int, shuffle: bool, pad: bool, seed: int = 0,
                 num_replicas: Optional[int] = None, rank_: Optional[int] = None):
        self.num_items = num_items
        self.shuffle = shuffle
        self.pad = pad
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        self.generator = torch.Generator().manual_seed(seed)

    def _order(self) -> List[int]:
        if self.shuffle:
            return torch.randperm(self.num_items, generator=self.generator).tolist()
        return list(range(self.num_items))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.pad:
            total = -(-self.num_items // self.num_replicas) * self.num_replicas
            order += order[: total - len(order)]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        if self.pad:
            return -(-self.num_items // self.num_replicas)
        return len(range(self.rank, self.num_items, self.num_replicas))


def _reshard(loader: DataLoader, batch_size: int, sampler: ShardSampler) -> DataLoader:
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last, worker_init_fn=loader.worker_init_fn,
                      timeout=loader.timeout)


def shard_loaders(train_loader: DataLoader, val_loader: DataLoader, cfg) -> Tuple[DataLoader, DataLoader]:
    """Per-rank loaders: training batch BATCH_SIZE / WORLD_SIZE over a shared shuffled order, validation split."""
    if not is_distributed():
        return train_loader, val_loader
    world = world_size()
    if not isinstance(train_loader, DataLoader):  # DATASET.LOADER device: already this rank's share
        return train_loader, _reshard(val_loader, val_loader.batch_size,
                                      ShardSampler(len(val_loader.dataset), shuffle=False, pad=False))
    if cfg.SOLVER.BATCH_SIZE % world:
        raise ConfigError(f"SOLVER.BATCH_SIZE = {cfg.SOLVER.BATCH_SIZE} is the global batch and must be divisible "
                          f"by the {world} processes of this torchrun")
    seed = max(int(cfg.EXPERIMENT.SEED), 0)
    train = _reshard(train_loader, cfg.SOLVER.BATCH_SIZE // world,
                     ShardSampler(len(train_loader.dataset), shuffle=True, pad=True, seed=seed))
    val = _reshard(val_loader, val_loader.batch_size, ShardSampler(len(val_loader.dataset), shuffle=False, pad=False))
    return train, val


class DistillerDDP(DistributedDataParallel):
    """DDP over a distiller that still looks like the distiller: attributes (`student`, `get_learnable_parameters`)
    and state dicts are the wrapped module's, so checkpoints keep upstream's keys."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_model(distiller: nn.Module, cfg) -> nn.Module:
    """`distiller` under DDP when distributed (optionally with SyncBN outside the teacher); unchanged otherwise.
    The frozen teacher's parameters and buffers are left out of DDP's broadcasts (every rank loaded the same file)."""
    if not is_distributed():
        return distiller
    if cfg.SOLVER.TRAINER in ("dot", "crd_dot"):
        raise ConfigError(f"SOLVER.TRAINER = {cfg.SOLVER.TRAINER!r} takes two backward passes per step, which "
                          "DistributedDataParallel does not support; use the 'base' or 'crd' trainer under torchrun")
    device = next(distiller.parameters()).device
    teacher = getattr(distiller, "teacher", None)
    if cfg.SOLVER.SYNC_BN:
        if device.type != "cuda":
            raise ConfigError("SOLVER.SYNC_BN = True needs CUDA (torch's SyncBatchNorm has no CPU kernel); "
                              "set it False for a CPU/gloo run")
        for name, child in list(distiller.named_children()):
            if child is not teacher:
                setattr(distiller, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    if teacher is not None:
        ignored = [f"teacher.{name}" for name, _ in teacher.named_parameters()]
        ignored += [f"teacher.{name}" for name, _ in teacher.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistillerDDP(distiller, device_ids=device_ids)
