"""Tune Exp-KD's explanation term on the embedded digits data, against vanilla and KD, on a validation split.

The teacher is trained once on the training images and cached. Each student trains on DATASET.TRAIN_SUBSET images for
a fixed number of steps; a seed fixes the subset, the initialisation and the batch order, so every method of a seed
sees the same data from the same start. Accuracy is measured on DATASET.VALIDATION_FROM_TRAIN images held out of the
training split (never the test split). Prints one JSON line per run and a markdown table of mean ± std per method.
The digits are 8x8 originals served at 32x32, so by default they are average-pooled to 16x16 (no information lost,
a quarter of the CPU time); the final maps are then 4x4 for CIFAR ResNets.

    python tools/tune_expkd.py                      # the default grid (docs/expkd.md)
    python tools/tune_expkd.py --student MobileNetV2 --methods kd cam_l2_w10
"""
import argparse
import json
import os
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from mdistiller.dataset import batches, get_dataset
from mdistiller.distillers import distiller_dict
from mdistiller.engine.cfg import CFG
from mdistiller.models import cifar_model_dict

# name -> (DISTILLER.TYPE, overrides); "cam_<norm>_w<weight>" on top of KD's CE 0.1 + KD 0.9 at T 4.
METHODS: Dict[str, tuple] = {"vanilla": ("NONE", {}), "kd": ("KD", {})}
for _norm, _weights in {"l2": (0.1, 1, 10, 100), "none": (0.01, 0.1, 1), "softmax": (10, 100, 1000)}.items():
    for _w in _weights:
        METHODS[f"cam_{_norm}_w{_w:g}"] = ("EXPKD", {"EXPKD.NORM": _norm, "EXPKD.EXP_WEIGHT": float(_w)})
for _k in (1, 0):
    METHODS[f"cam_l2_w10_top{_k}"] = ("EXPKD", {"EXPKD.NORM": "l2", "EXPKD.EXP_WEIGHT": 10.0, "EXPKD.TOPK": _k})
DEFAULT_METHODS = ["vanilla", "kd", "cam_l2_w10", "cam_l2_w100", "cam_none_w0.1", "cam_softmax_w100", "cam_l2_w10_top0"]


def base_cfg(args, seed: int):
    cfg = CFG.clone()
    cfg.merge_from_list([
        "DATASET.TYPE", "digits", "DATASET.NUM_WORKERS", 0, "DATASET.VALIDATION_FROM_TRAIN", args.val,
        "DATASET.TEST.BATCH_SIZE", 256, "SOLVER.BATCH_SIZE", args.batch, "EXPERIMENT.SEED", seed,
        "DISTILLER.TEACHER", args.teacher, "DISTILLER.STUDENT", args.student,
        "EXPKD.WARMUP", args.warmup, "KD.TEMPERATURE", 4,
    ])
    return cfg


def resized(image: torch.Tensor, size: int) -> torch.Tensor:
    return image if image.shape[-1] == size else F.adaptive_avg_pool2d(image, size)


def evaluate(model: torch.nn.Module, loader, size: int) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        with batches(loader) as stream:
            for image, target, *_ in stream:
                image = resized(image, size)
                correct += (model(image)[0].argmax(1) == target).sum().item()
                total += target.numel()
    return 100.0 * correct / total


def fit(module, params, loader, steps: int, lr: float, size: int, forward) -> None:
    """SGD (momentum 0.9, wd 5e-4) for `steps` steps, LR ×0.1 after 75 %; `forward(image, target, epoch)` -> loss."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    step, epoch = 0, 0
    while step < steps:
        epoch += 1
        module.train()
        with batches(loader) as stream:
            for image, target, *_ in stream:
                if step == int(0.75 * steps):
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.1
                loss = forward(resized(image, size), target, epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if step == steps:
                    return


def teacher_model(args, num_classes: int) -> torch.nn.Module:
    """The teacher trained on every training image outside the validation split, cached under --out."""
    path = os.path.join(args.out, f"teacher_{args.teacher}_val{args.val}_s{args.size}_{args.teacher_steps}.pth")
    model = cifar_model_dict[args.teacher][0](num_classes=num_classes)
    cfg = base_cfg(args, seed=0)
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        torch.manual_seed(0)
        train_loader, _, _, _ = get_dataset(cfg)
        fit(model, model.parameters(), train_loader, args.teacher_steps, 0.05, args.size,
            lambda image, target, epoch: F.cross_entropy(model(image)[0], target))
        os.makedirs(args.out, exist_ok=True)
        torch.save(model.state_dict(), path)
    _, val_loader, _, _ = get_dataset(cfg)
    top1 = evaluate(model, val_loader, args.size)
    print(json.dumps({"teacher": args.teacher, "val_top1": round(top1, 2)}), flush=True)
    return model.eval()


def run(args, method: str, seed: int, teacher: torch.nn.Module) -> float:
    distiller_type, overrides = METHODS[method]
    cfg = base_cfg(args, seed)
    cfg.merge_from_list(["DATASET.TRAIN_SUBSET", args.subset])
    cfg.merge_from_list([item for kv in overrides.items() for item in kv])
    torch.manual_seed(seed)
    train_loader, val_loader, _, num_classes = get_dataset(cfg)
    student = cifar_model_dict[args.student][0](num_classes=num_classes)
    if distiller_type == "NONE":
        distiller = distiller_dict["NONE"](student)
    else:
        distiller = distiller_dict[distiller_type](student, teacher, cfg)
    fit(distiller, distiller.get_learnable_parameters(), train_loader, args.steps, args.lr, args.size,
        lambda image, target, epoch: sum(distiller(image=image, target=target, epoch=epoch)[1].values()))
    return evaluate(student, val_loader, args.size)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    parser.add_argument("--subset", type=int, default=200, help="training images per student")
    parser.add_argument("--val", type=int, default=500, help="training images held out for validation")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--size", type=int, default=16, help="input side the 32x32 digits are pooled to")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=20, help="EXPKD.WARMUP in epochs of the subset")
    parser.add_argument("--out", default="output/tune_expkd")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    teacher = None
    results: Dict[str, List[float]] = {}
    for method in args.methods:
        for seed in args.seeds:
            if teacher is None and METHODS[method][0] != "NONE":
                teacher = teacher_model(args, num_classes=10)
            start = time.time()
            top1 = run(args, method, seed, teacher)
            results.setdefault(method, []).append(top1)
            print(json.dumps({"method": method, "seed": seed, "val_top1": round(top1, 2),
                              "seconds": round(time.time() - start, 1)}), flush=True)
    print(f"\n| method ({args.teacher} -> {args.student}) | val top-1 (mean ± std over {len(args.seeds)} seeds) |")
    print("|---|---|")
    for method, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {statistics.mean(accs):.1f} ± {spread:.1f} |")


if __name__ == "__main__":
    main()
