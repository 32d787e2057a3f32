"""Our training step and epoch against a plain eager mdistiller-style loop, measured in the same run; JSON ratios.

    python3 benchmarks/speed.py --device cpu --methods KD DKD EXPKD --batch-size 64 --steps 3 --epoch-images 192 \
        SOLVER.COMPILE teacher
    python3 benchmarks/speed.py --scaling batch --batch-sizes 64 128 256 512 1024 --methods EXPKD
    python3 benchmarks/speed.py --scaling topk --topks 1 5 20 50 100

The reference is what upstream mdistiller does: a DataLoader over PIL images with RandomCrop/Flip/ToTensor/Normalize
in worker processes, the eager fp32 teacher (no BatchNorm folding), `torch.optim.SGD` defaults, and a host sync per
step (upstream reads `loss.cpu()` and the accuracy every iteration). Ours is the framework's own path: the trainer's
`train_iter` (no host sync, foreach/fused SGD, SOLVER.AMP/CHANNELS_LAST/COMPILE as given), the distiller's folded
teacher, and `DATASET.LOADER device`. Both start from the same weights and see synthetic CIFAR-sized data.

"step" = one optimisation step on a batch already on the device (model cost only; fastest of steps interleaved between
the two loops); "epoch" = a pass over `--epoch-images` images including data loading (what a training run pays; best
of `--epoch-repeats` passes each, alternating). Ratios > 1 mean ours is faster. One JSON
object per line: per method (or per scaling point), then a summary line with the minimum ratios.
"""
import argparse
import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.dataset import cifar100
from mdistiller.dataset._common import ArrayImages, Instance
from mdistiller.dataset.device_loader import DeviceLoader
from mdistiller.distillers import distiller_class
from mdistiller.engine.config import load_cfg
from mdistiller.engine.speed import StepPrecision, prepare_model
from mdistiller.engine.trainer import BaseTrainer, TrainMeters
from mdistiller.engine.utils import accuracy
from mdistiller.models import build_model

NUM_CLASSES = 100
EPOCH_IMAGES_CIFAR = 50_000
EPOCHS_CIFAR = 240


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(count: int, seed: int):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (count, 32, 32, 3)).astype(np.uint8), rng.randint(0, NUM_CLASSES, count).tolist()


def _distiller(method: str, teacher: str, student: str, opts: Sequence, fold: bool, device: torch.device):
    cfg = load_cfg(None, ["DISTILLER.TYPE", method, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                          *opts])
    cls = distiller_class(method)
    if not fold:
        cls = type(f"Eager{cls.__name__}", (cls,), {"fold_teacher": False})
    torch.manual_seed(0)
    model = cls(build_model(student, NUM_CLASSES, dataset="cifar100"),
                build_model(teacher, NUM_CLASSES, dataset="cifar100", key="--teacher"), cfg)
    return model.to(device), cfg


class _Ours(BaseTrainer):
    """The trainer's step (precision, speed flags, optimizer) without its run directory."""

    def __init__(self, distiller, cfg, device: torch.device):
        self.cfg, self.device, self.main = cfg, device, True
        self.distiller = prepare_model(distiller, cfg)
        self.precision = StepPrecision(cfg, device)
        self.optimizer = self.init_optimizer(cfg)
        self.meters = TrainMeters(device)

    def step(self, image: torch.Tensor, target: torch.Tensor) -> None:
        self.train_iter((image, target), 1, self.meters)


class _Reference:
    """mdistiller's BaseTrainer.train_iter: eager fp32, default SGD, loss and accuracy read on the host each step."""

    def __init__(self, distiller, cfg, device: torch.device):
        self.distiller, self.device = distiller, device
        self.optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=cfg.SOLVER.LR,
                                         momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                         foreach=False)
        self.losses: List[float] = []

    def step(self, image: torch.Tensor, target: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        image, target = image.float().to(self.device), target.to(self.device)
        preds, losses_dict = self.distiller(image=image, target=target, epoch=1)
        loss = sum(value.mean() for value in losses_dict.values())
        loss.backward()
        self.optimizer.step()
        accuracy(preds, target, topk=(1, 5))[0].item()
        self.losses.append(float(loss.cpu().detach().numpy().mean()))


def _step_seconds(runners: Dict, batch, steps: int, warmup: int, device: torch.device) -> Dict[str, float]:
    """Fastest step of each runner (background load on a shared machine only ever slows a step), the runners'
    steps interleaved so that load from other processes hits both alike; warm-up durations under `<name>_warmup`."""
    times: Dict[str, List[float]] = {name: [] for name in runners}
    for name, runner in runners.items():
        start = time.perf_counter()
        for _ in range(warmup):
            runner.step(*batch)
        _sync(device)
        times[f"{name}_warmup"] = [time.perf_counter() - start]
    for name in runners:
        times[name] = []
    for _ in range(steps):
        for name, runner in runners.items():
            _sync(device)
            start = time.perf_counter()
            runner.step(*batch)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _epoch_img_s(runner, loader, device: torch.device) -> float:
    """Images per second over one pass of `loader` (loading included)."""
    _sync(device)
    start, count = time.perf_counter(), 0
    for batch in loader:
        runner.step(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
        count += batch[1].numel()
    _sync(device)
    return count / (time.perf_counter() - start)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, teacher: str, student: str, batch_size: int, device: torch.device, steps: int, warmup: int,
            epoch_images: int, workers: int, opts: Sequence = (), epoch: bool = True, epoch_repeats: int = 2) -> Dict:
    """One method at one batch size: step and (optionally) epoch throughput of ours and the reference."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device)
    target = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device)
    result = {"method": method, "teacher": teacher, "student": student, "batch_size": batch_size,
              "device": str(device), "threads": torch.get_num_threads(), "opts": list(map(str, opts))}
    runners = {}
    for name, fold in (("reference", False), ("ours", True)):
        distiller, cfg = _distiller(method, teacher, student, opts, fold, device)
        distiller.train()
        runners[name] = (_Reference if name == "reference" else _Ours)(distiller, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _step_seconds(runners, (image, target), steps, warmup, device)
    result["peak_mem_mb"] = _peak_memory_mb(device)  # both models; CPU: the process's peak RSS
    for name in runners:
        result[f"{name}_step_img_s"] = batch_size / seconds[name]
        result[f"{name}_warmup_s"] = seconds[f"{name}_warmup"]  # includes torch.compile for ours when asked
    result["step_ratio"] = seconds["reference"] / seconds["ours"]
    runners["ours"].meters.summary()  # raises if a loss was not finite
    if not epoch:
        return result
    images, targets = _images(epoch_images, seed=1)
    loaders = {
        "reference": torch.utils.data.DataLoader(
            Instance(ArrayImages(images, targets, cifar100.train_transform())), batch_size=batch_size, shuffle=True,
            num_workers=workers, pin_memory=device.type == "cuda"),
        "ours": DeviceLoader(images, targets, batch_size, device, cifar100.MEAN, cifar100.STD, seed=1),
    }
    best = {name: 0.0 for name in runners}
    for _ in range(epoch_repeats):  # ABAB, best of each: the machine's background load only ever slows a pass
        for name, runner in runners.items():
            best[name] = max(best[name], _epoch_img_s(runner, loaders[name], device))
    for name in runners:
        result[f"{name}_epoch_img_s"] = best[name]
    result["epoch_ratio"] = best["ours"] / best["reference"]
    for name in ("reference", "ours"):  # training images only; the 240 test passes come on top
        result[f"{name}_projected_240_epochs_min"] = EPOCHS_CIFAR * EPOCH_IMAGES_CIFAR / result[
            f"{name}_epoch_img_s"] / 60
    return result


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["KD", "DKD", "EXPKD"])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epoch-images", type=int, default=256, help="images in the timed epoch (0: no epoch)")
    parser.add_argument("--epoch-repeats", type=int, default=2, help="timed epochs per side (best is kept)")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (mdistiller default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--scaling", choices=["none", "batch", "topk"], default="none")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--topks", type=int, nargs="+", default=[1, 5, 20, 50, 100])
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for ours: KEY VALUE ...")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    common = dict(teacher=args.teacher, student=args.student, device=device, steps=args.steps, warmup=args.warmup,
                  epoch_images=args.epoch_images, workers=args.workers, epoch=args.epoch_images > 0,
                  epoch_repeats=args.epoch_repeats)
    results = []
    if args.scaling == "batch":
        for method in args.methods:
            for batch_size in args.batch_sizes:
                results.append(measure(method, batch_size=batch_size, opts=args.opts, **common))
                print(json.dumps(results[-1]), flush=True)
    elif args.scaling == "topk":
        for topk in args.topks:
            results.append(measure("EXPKD", batch_size=args.batch_size, opts=[*args.opts, "EXPKD.TOPK", topk],
                                   **common))
            print(json.dumps(results[-1]), flush=True)
    else:
        for method in args.methods:
            results.append(measure(method, batch_size=args.batch_size, opts=args.opts, **common))
            print(json.dumps(results[-1]), flush=True)
    summary = {"summary": True, "min_step_ratio": min(r["step_ratio"] for r in results)}
    if all("epoch_ratio" in r for r in results):
        summary["min_epoch_ratio"] = min(r["epoch_ratio"] for r in results)
    print(json.dumps(summary), flush=True)
    return results


if __name__ == "__main__":
    main()
