"""Throughput and peak memory of one training step (forward, backward, SGD step) on synthetic batches.

    python3 benchmarks/train_step.py --method DKD --teacher resnet32x4 --student resnet8x4 --batch-size 64 --device cpu

Prints one JSON line: method, models, batch size, device, img/s (median over the timed steps) and peak memory
(CUDA: max allocated bytes; CPU: the process's peak resident set size, which includes the Python runtime).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.distillers import distiller_class
from mdistiller.engine.config import load_cfg
from mdistiller.engine.speed import StepPrecision
from mdistiller.engine.trainer import BaseTrainer, TrainMeters
from mdistiller.models import build_model

IMAGE_SIZE = {"cifar100": 32, "tiny_imagenet": 64, "imagenet": 224, "digits": 32}
NUM_CLASSES = {"cifar100": 100, "tiny_imagenet": 200, "imagenet": 1000, "digits": 10}


class _StepTrainer(BaseTrainer):
    """The trainer's optimisation step without its run directory, loggers or loaders."""

    def __init__(self, distiller, cfg):
        self.cfg = cfg
        self.distiller = distiller
        self.device = next(distiller.parameters()).device
        self.precision = StepPrecision(cfg, self.device)
        self.optimizer = self.init_optimizer(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    method: str, teacher: str, student: str, batch_size: int, device: str, dataset: str, steps: int, warmup: int,
    opts: Sequence[str] = (),
) -> dict:
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, "DATASET.TYPE", dataset, "SOLVER.BATCH_SIZE", batch_size, *opts])
    num_classes, size = NUM_CLASSES[dataset], IMAGE_SIZE[dataset]
    model_student = build_model(student, num_classes, dataset=dataset, key="--student")
    cls = distiller_class(method)
    if not cls.needs_teacher:
        distiller = cls(model_student)
    else:
        model_teacher = build_model(teacher, num_classes, dataset=dataset, key="--teacher")  # random weights: same cost
        distiller = cls(model_student, model_teacher, cfg)
    device = torch.device(device)
    distiller = distiller.to(device)
    trainer = _StepTrainer(distiller, cfg)
    distiller.train()
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 3, size, size, generator=generator),
             torch.randint(0, num_classes, (batch_size,), generator=generator))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meters = TrainMeters(device)
    times: List[float] = []
    cpu_times: List[float] = []  # this process's CPU time: robust to other processes sharing the cores
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step in range(warmup + steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_iter(batch, 1, meters)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    meters.summary()  # raises if a loss was not finite
    result = {
        "method": method,
        "teacher": teacher if distiller_class(method).needs_teacher else None,
        "student": student,
        "dataset": dataset,
        "batch_size": batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "opts": list(opts),
        "step_ms_median": 1000 * statistics.median(times),
        "img_per_s": batch_size / statistics.median(times),
        "cpu_ms_median": 1000 * statistics.median(cpu_times),
    }
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["step_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    return result


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="KD", help="distiller registry key (NONE, KD, DKD, ...)")
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default="cifar100", choices=sorted(IMAGE_SIZE))
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = measure(
        args.method, args.teacher, args.student, args.batch_size, args.device, args.dataset, args.steps, args.warmup,
        args.opts,
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
