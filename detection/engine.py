"""Iteration-based training and COCO evaluation of an RCNNKD, single process or under torchrun (DDP)."""
import bisect
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from yacs.config import CfgNode

from .data import CocoDetection, collate
from .evaluation import coco_box_ap, to_coco_results
from .model import build_distiller, build_student

CHECKPOINT = "latest"  # {"iteration", "model" (all but the teacher), "optimizer"}
STUDENT_CHECKPOINT = "student_latest"  # {"model": student detector state dict}: MODEL.WEIGHTS / TEACHER.WEIGHTS
EVAL_FILE = "coco_eval.json"
RESULTS_FILE = "coco_instances_results.json"


@dataclass(frozen=True)
class Env:
    """Where this process runs: its rank among `world_size` torchrun processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_env(cfg: CfgNode) -> Env:
    """Join torchrun's process group only when WORLD_SIZE > 1; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = cfg.MODEL.DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = 0
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
    if cfg.SEED >= 0:
        torch.manual_seed(cfg.SEED + rank)
    return Env(rank, world_size, device)


def save_checkpoint(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a truncated checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_at(iteration: int, solver: CfgNode) -> float:
    """Detectron2's schedule: linear warm-up from WARMUP_FACTOR, then ×GAMMA at each of STEPS."""
    factor = solver.GAMMA ** bisect.bisect_right(list(solver.STEPS), iteration)
    if iteration < solver.WARMUP_ITERS:
        alpha = iteration / solver.WARMUP_ITERS
        factor *= solver.WARMUP_FACTOR * (1 - alpha) + alpha
    return solver.BASE_LR * factor


def _train_batches(cfg: CfgNode, env: Env, start_iter: int) -> Iterator:
    """Endless per-process batches of IMS_PER_BATCH / world_size images, reshuffled every pass over the data."""
    if cfg.SOLVER.IMS_PER_BATCH % env.world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH: {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {env.world_size} processes"
        )
    per_process = cfg.SOLVER.IMS_PER_BATCH // env.world_size
    dataset = CocoDetection(
        cfg.DATASETS.ROOT, cfg.DATASETS.TRAIN, cfg.MODEL.NUM_CLASSES, train=True, hflip_prob=cfg.INPUT.HFLIP_PROB
    )
    if len(dataset) < per_process:
        raise ValueError(f"DATASETS.TRAIN: {len(dataset)} usable images, fewer than {per_process} per batch")
    sampler = DistributedSampler(dataset, env.world_size, env.rank, shuffle=True, seed=max(cfg.SEED, 0), drop_last=True)
    loader = DataLoader(
        dataset, per_process, sampler=sampler, num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=collate,
        drop_last=True,
    )
    epoch = start_iter // len(loader)
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate(student: nn.Module, cfg: CfgNode, env: Env, iteration: Optional[int] = None) -> Optional[Dict[str, float]]:
    """COCOeval box AP of `student` on DATASETS.TEST; the main process writes EVAL_FILE and RESULTS_FILE."""
    dataset = CocoDetection(cfg.DATASETS.ROOT, cfg.DATASETS.TEST, cfg.MODEL.NUM_CLASSES, train=False)
    shard = Subset(dataset, range(env.rank, len(dataset), env.world_size))
    loader = DataLoader(shard, cfg.TEST.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=collate)
    was_training = student.training
    student.eval()
    results: List[dict] = []
    for images, targets in loader:
        detections = student([image.to(env.device) for image in images])
        for target, detection in zip(targets, detections):
            results.extend(to_coco_results(int(target["image_id"]), detection))
    student.train(was_training)
    if env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if not env.is_main:
        return None
    metrics = coco_box_ap(dataset.coco, results, dataset.image_ids)
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RESULTS_FILE, "w") as f:
        json.dump(results, f)
    with open(out / EVAL_FILE, "w") as f:
        json.dump({"iteration": iteration, "bbox": metrics}, f, indent=2)
    print("bbox " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
    return metrics


def evaluate_only(cfg: CfgNode) -> Optional[Dict[str, float]]:
    """Evaluate the student detector in MODEL.WEIGHTS (e.g. OUTPUT_DIR/student_latest)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: --eval-only needs a student detector checkpoint (e.g. student_latest)"
        )
    env = setup_env(cfg)
    return evaluate(build_student(cfg).to(env.device), cfg, env)


def train(cfg: CfgNode, resume: bool = False) -> Optional[Dict[str, float]]:
    """Train for SOLVER.MAX_ITER iterations (resuming from OUTPUT_DIR/latest if asked), then evaluate."""
    env = setup_env(cfg)
    out = Path(cfg.OUTPUT_DIR)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.dump())
    distiller = build_distiller(cfg).to(env.device)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
    start_iter = 0
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {out / CHECKPOINT}")
        state = load_checkpoint(out / CHECKPOINT)
        missing, unexpected = distiller.load_state_dict(state["model"], strict=False)
        mismatched = unexpected + [k for k in missing if not k.startswith("teacher.")]
        if mismatched:
            raise ValueError(f"--resume: {out / CHECKPOINT} does not match this config (keys {mismatched[:3]})")
        optimizer.load_state_dict(state["optimizer"])
        start_iter = state["iteration"]
    model = distiller
    if env.world_size > 1:
        model = DistributedDataParallel(distiller, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    writer = None
    if env.is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(out / "train.events"))
    model.train()
    batches = _train_batches(cfg, env, start_iter)
    metrics = None
    tic = time.time()
    for iteration in range(start_iter, cfg.SOLVER.MAX_ITER):
        lr = lr_at(iteration, cfg.SOLVER)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = next(batches)
        images = [image.to(env.device) for image in images]
        targets = [{k: v.to(env.device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            values = {k: v.item() for k, v in losses.items()}
            raise FloatingPointError(f"iteration {iteration}: non-finite loss {values}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = iteration + 1
        if env.is_main and (done % cfg.SOLVER.LOG_PERIOD == 0 or done == cfg.SOLVER.MAX_ITER):
            values = {k: v.item() for k, v in losses.items()}
            for key, value in {**values, "total_loss": loss.item(), "lr": lr}.items():
                writer.add_scalar(key, value, done)
            rate = (time.time() - tic) / (done - start_iter)
            print(
                f"iter {done}/{cfg.SOLVER.MAX_ITER}  lr {lr:.5f}  total_loss {loss.item():.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                + f"  {rate:.3f} s/it",
                flush=True,
            )
        if env.is_main and (done % cfg.SOLVER.CHECKPOINT_PERIOD == 0 or done == cfg.SOLVER.MAX_ITER):
            save_checkpoint(
                {"iteration": done, "model": distiller.trainable_state_dict(), "optimizer": optimizer.state_dict()},
                out / CHECKPOINT,
            )
            save_checkpoint({"model": distiller.student.state_dict()}, out / STUDENT_CHECKPOINT)
        if done == cfg.SOLVER.MAX_ITER or (cfg.TEST.EVAL_PERIOD and done % cfg.TEST.EVAL_PERIOD == 0):
            metrics = evaluate(distiller.student, cfg, env, done)
            if writer is not None:
                for key, value in metrics.items():
                    if math.isfinite(value):
                        writer.add_scalar(f"bbox/{key}", value, done)
    if writer is not None:
        writer.close()
    return metrics
