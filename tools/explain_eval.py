"""Explainability evaluation: perturbation test, segmentation test and teacher-student map agreement.

    python tools/explain_eval.py perturbation -m resnet32x4 -c pretrain -m resnet8x4 -c ckpt/student_best \
        -d cifar100 --method cam [--negative] [--target {top,label}] [--num-images N] [--out DIR]
    python tools/explain_eval.py segmentation --data gtsegs_ijcv.mat -m ResNet18 -c pretrain -d imagenet --method cam
    python tools/explain_eval.py agreement -t resnet32x4 -tc pretrain -m resnet8x4 -c ckpt --method cam gradcam \
        -d cifar100

Each writes a JSON and a PNG into --out. Protocols: docs/evaluation.md.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.explain import METHODS
from mdistiller.explain.agreement import agreement_test
from mdistiller.explain.perturbation import perturbation_test
from mdistiller.explain.segmentation import GtSegsDataset, segmentation_evaluate
from mdistiller.launch.build import PRETRAIN, load_model
from mdistiller.launch.cli import run_cli
from mdistiller.launch.eval_common import (
    add_common_arguments,
    dataset_normalizer,
    dataset_num_classes,
    load_eval_data,
    make_map_fn,
    model_labels,
    pair_models,
    resolve_layer,
    save_figure,
    write_json,
)

TEACHER_KEYS = {"key": "-t/--teacher", "ckpt_key": "-tc/--teacher-ckpt"}


# ---------------------------------------------------------------------------------------------------- commands


def run_perturbation(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = pair_models(args)
    loader, normalize, num_classes = load_eval_data(args)
    labels = model_labels(args, args.model, ckpts)
    results = []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = load_model(name, args.dataset, num_classes, ckpt).to(device)
        cache = None
        if args.cache_dir:
            os.makedirs(args.cache_dir, exist_ok=True)
            key = (f"{label}_{args.dataset}_{args.method}_{args.layer}_{args.target}_{len(loader.dataset)}"
                   f"_bs{args.batch_size}")
            cache = os.path.join(args.cache_dir, "".join(c if c.isalnum() else "_" for c in key) + ".pt")
        maps = torch.load(cache, weights_only=True) if cache and os.path.isfile(cache) else None
        res = perturbation_test(
            model, loader, make_map_fn(model, args.method, args.layer), normalize,
            negative=args.negative, target=args.target, device=device, maps=maps,
        )
        if cache and maps is None:
            torch.save(res["maps"], cache)
        del res["maps"]
        results.append({"label": label, "model": name, "ckpt": ckpt, **res})
        print(f"{label}: AUC {res['auc']:.4f}  accuracies {[round(a, 4) for a in res['accuracies']]}")
    test = "negative" if args.negative else "positive"
    out = {"test": test, "dataset": args.dataset, "method": args.method,
           "layer": resolve_layer(args.method, args.layer), "target": args.target,
           "results": results}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"perturbation_{args.dataset}_{args.method}_{test}")
    write_json(stem + ".json", out)
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        ax.plot([100 * f for f in r["fractions"]], [100 * a for a in r["accuracies"]], marker="o",
                label=f"{r['label']}: AUC {r['auc']:.2f}")
    ax.set_xlabel(f"pixels removed, {'least' if args.negative else 'most'} relevant first (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{test} perturbation, {args.method}, {args.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, stem + ".png")
    return out


def run_segmentation(args: argparse.Namespace) -> Dict[str, object]:
    normalize = dataset_normalizer(args.dataset)
    num_classes = dataset_num_classes(args.dataset, args.num_classes)
    ckpts = pair_models(args)
    labels = model_labels(args, args.model, ckpts)
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: file not found (ImageNet-Segmentation's gtsegs_ijcv.mat)")
    device = torch.device(args.device)
    size = args.image_size or (224 if args.dataset == "imagenet" else 32)
    ds = GtSegsDataset(args.data, size=size, limit=args.num_images)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    results, examples = [], []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = load_model(name, args.dataset, num_classes, ckpt).to(device)
        scores, ex = segmentation_evaluate(model, loader, make_map_fn(model, args.method, args.layer), normalize,
                                           device=device, keep=args.num_examples)
        results.append({"label": label, "model": name, "ckpt": ckpt, **scores})
        examples.append(ex)
        print(f"{label}: " + "  ".join(f"{k} {v:.6f}" for k, v in scores.items() if k != "num_images"))
    out = {"data": args.data, "dataset": args.dataset, "method": args.method,
           "layer": resolve_layer(args.method, args.layer), "size": size,
           "results": results}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"segmentation_{os.path.splitext(os.path.basename(args.data))[0]}_{args.method}")
    write_json(stem + ".json", out)
    n = examples[0]["image"].shape[0]
    cols = 2 + len(results)
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(examples[0]["image"][i].permute(1, 2, 0).numpy())
        axes[i, 1].imshow(examples[0]["mask"][i].numpy(), cmap="gray")
        for j, ex in enumerate(examples):
            axes[i, 2 + j].imshow(ex["map"][i].numpy(), cmap="jet")
    for j, title in enumerate(["image", "mask"] + [f"{r['label']}\nmIoU {r['miou']:.3f}" for r in results]):
        axes[0, j].set_title(title, fontsize=7)
    for a in axes.flat:
        a.axis("off")
    save_figure(fig, stem + ".png")
    return out


def run_agreement(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = pair_models(args)
    loader, normalize, num_classes = load_eval_data(args)
    labels = model_labels(args, args.model, ckpts)
    teacher = load_model(args.teacher, args.dataset, num_classes, args.teacher_ckpt, **TEACHER_KEYS).to(device)
    results = []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        student = load_model(name, args.dataset, num_classes, ckpt).to(device)
        for method in args.method:
            means, _ = agreement_test(
                teacher, student, loader, make_map_fn(teacher, method, args.layer),
                make_map_fn(student, method, args.layer), normalize, normalize,
                target=args.target, top=args.top, device=device,
            )
            results.append({"label": label, "model": name, "ckpt": ckpt, "method": method,
                            "layer": resolve_layer(method, args.layer), **means})
            print(f"{label} [{method}]: cosine {means['cosine']:.4f}  top-{args.top:.0%} IoU {means['iou']:.4f}")
    out = {"teacher": args.teacher, "teacher_ckpt": args.teacher_ckpt, "dataset": args.dataset,
           "target": args.target, "top": args.top, "results": results}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"agreement_{args.dataset}_{args.teacher}")
    write_json(stem + ".json", out)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        rows = [r for r in results if r["label"] == label]
        xs = [args.method.index(r["method"]) + i * width for r in rows]
        for ax, key in zip(axes, ("cosine", "iou")):
            ax.bar(xs, [r[key] for r in rows], width=width, label=label)
    for ax, title in zip(axes, ("cosine similarity", f"IoU of top {args.top:.0%}")):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(args.method))], args.method)
        ax.set_ylim(top=1.0)
        ax.set_title(f"teacher {args.teacher} vs students: {title}", fontsize=8)
    axes[0].legend(fontsize=7)
    save_figure(fig, stem + ".png")
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("perturbation", help="accuracy while removing the most/least relevant pixels; AUC")
    add_common_arguments(p, "cifar100")
    p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--negative", action="store_true", help="remove the least relevant pixels first")
    p.add_argument("--target", choices=("top", "label"), default="top", help="explain the prediction or the label")
    p.add_argument("--cache-dir", default="", help="store/reuse the low-resolution maps here")
    p = sub.add_parser("segmentation", help="pixel accuracy, mIoU, mAP, F1 against object masks")
    add_common_arguments(p, "imagenet")
    p.add_argument("--data", required=True, help="gtsegs_ijcv.mat or a file written in its layout")
    p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--num-examples", type=int, default=6, help="rows in the PNG")
    p = sub.add_parser("agreement", help="cosine and top-region IoU between teacher and student maps")
    add_common_arguments(p, "cifar100")
    p.add_argument("-t", "--teacher", required=True)
    p.add_argument("-tc", "--teacher-ckpt", default=PRETRAIN)
    p.add_argument("--method", nargs="+", choices=METHODS, default=["cam"])
    p.add_argument("--target", choices=("teacher", "label"), default="teacher")
    p.add_argument("--top", type=float, default=0.2, help="fraction of pixels forming the compared region")
    return parser


def execute(args: argparse.Namespace) -> Dict[str, object]:
    """Run the subcommand of parsed `args`; the results it also wrote as JSON."""
    runner = {"perturbation": run_perturbation, "segmentation": run_segmentation, "agreement": run_agreement}
    return runner[args.command](args)


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """The tool without its error handling (errors propagate): for tests and notebooks."""
    return execute(build_parser().parse_args(argv))


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: exit status 0, or one line on stderr and 2 (bad option value) or 1 (other errors)."""
    args = build_parser().parse_args(argv)
    return run_cli("explain_eval.py", lambda: execute(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
