"""Figures for distillation runs (matplotlib, PNG): what mdistiller ships as notebooks, as scripts.

    python tools/visualize.py heatmaps -m resnet32x4 -c pretrain -m resnet8x4 -c ckpt -d cifar100 --method cam
    python tools/visualize.py tsne -m resnet8x4 -c ckpt -d cifar100 --num-images 2000
    python tools/visualize.py corr -t resnet32x4 -tc pretrain -m resnet8x4 -c ckpt -d cifar100
    python tools/visualize.py curves output/run_a/worklog.txt output/run_b/worklog.txt --metrics test_acc train_loss

Models, checkpoints and data are resolved as in tools/explain_eval.py (mdistiller.launch.eval_common). `--out` is a
.png file, or a folder that then receives `<subcommand>.png` (docs/evaluation.md). Errors are one line on stderr;
`--debug` shows the traceback instead.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdistiller.errors import ConfigError
from mdistiller.explain.segmentation import upsample_maps
from mdistiller.launch.build import PRETRAIN, load_model
from mdistiller.launch.cli import run_cli
from mdistiller.launch.eval_common import (
    add_common_arguments,
    add_debug_argument,
    add_method_arguments,
    load_eval_data,
    lrp_options,
    make_map_fn,
    model_labels,
    pair_models,
    save_figure,
    write_json,
)

TEACHER_KEYS = {"key": "-t/--teacher", "ckpt_key": "-tc/--teacher-ckpt"}
OUT_HELP = "a .png file, or a folder (created if needed) that receives <subcommand>.png"
HEATMAP_IMAGES = 8  # heatmaps without --num-images


def figure_path(out: str, command: str) -> str:
    """--out as the PNG path: itself if it names a .png file, else `<out>/<command>.png` (a folder)."""
    return out if out.lower().endswith(".png") else os.path.join(out, f"{command}.png")


def parse_worklog(path: str) -> Dict[str, object]:
    """Per-epoch metrics of an mdistiller `worklog.txt`: {"epoch": [...], "<metric>": [...], "best_acc": float|None}.

    The file is blocks of `epoch: N`, `lr: x`, `key: value` lines between dashed lines, then `best_acc\\tvalue`."""
    rows: List[Dict[str, float]] = []
    best = None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or set(line) == {"-"}:
                continue
            if line.startswith("last_acc"):  # written by the trainer just before best_acc
                continue
            if line.startswith("best_acc"):
                best = float(line.split()[-1])
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'key: value', got {line!r}")
            if key == "epoch":
                rows.append({})
            elif not rows:
                raise ValueError(f"{path}:{lineno}: {key!r} before any 'epoch:' line")
            rows[-1][key.strip()] = float(value)
    if not rows:
        raise ValueError(f"{path}: no epoch found (not an mdistiller worklog.txt)")
    keys = sorted({k for r in rows for k in r})
    out: Dict[str, object] = {k: [r.get(k, float("nan")) for r in rows] for k in keys}
    out["best_acc"] = best
    return out


def run_curves(args: argparse.Namespace) -> Dict[str, object]:
    if args.labels and len(args.labels) != len(args.logs):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.logs)} worklog files")
    logs = {label: parse_worklog(p) for label, p in zip(args.labels or args.logs, args.logs)}
    metrics = args.metrics or sorted({k for log in logs.values() for k in log if k not in ("epoch", "best_acc", "lr")})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, log in logs.items():
            if metric in log:
                ax.plot(log["epoch"], log[metric], label=label)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    save_figure(fig, args.out)
    return {"metrics": metrics, "best_acc": {k: v["best_acc"] for k, v in logs.items()}, "out": args.out}


def _predict_all(model: torch.nn.Module, loader, normalize, device) -> Dict[str, np.ndarray]:
    logits, pooled, labels = [], [], []
    with torch.no_grad():
        for images, target in loader:
            out, feats = model(normalize(images.to(device)))
            logits.append(out.cpu())
            pooled.append(feats["pooled_feat"].reshape(out.shape[0], -1).cpu())
            labels.append(target)
    return {k: torch.cat(v).numpy() for k, v in (("logits", logits), ("pooled", pooled), ("labels", labels))}


def _first_images(loader, n: int):
    """The first `n` (images, labels) of `loader`, across as many batches as that takes."""
    images, labels, have = [], [], 0
    for x, y in loader:
        images.append(x[: n - have])
        labels.append(y[: n - have])
        have += images[-1].shape[0]
        if have >= n:
            break
    return torch.cat(images), torch.cat(labels)


def run_heatmaps(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = pair_models(args)
    lrp = lrp_options([args.method], args.rule, args.zero_bias)
    labels = model_labels(args, args.model, ckpts)
    loader, normalize, num_classes = load_eval_data(args)
    images, target = _first_images(loader, args.num_images or HEATMAP_IMAGES)
    images, target = images.to(device), target.to(device)
    models = [load_model(n, args.dataset, num_classes, c).to(device) for n, c in zip(args.model, ckpts)]
    x = normalize(images)
    with torch.no_grad():
        preds = [m(x)[0].argmax(1) for m in models]
    columns = []
    for model, pred in zip(models, preds):
        classes = {"label": target, "first": preds[0], "own": pred}[args.classes]
        map_fn = make_map_fn(model, args.method, args.layer, **lrp)
        maps = upsample_maps(map_fn(x, classes).detach(), images.shape[-2:])
        columns.append((maps.cpu(), classes.cpu(), pred.cpu()))
    n, cols = images.shape[0], 1 + len(models)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    names = getattr(loader.dataset, "classes", None)
    for i in range(n):
        img = images[i].permute(1, 2, 0).cpu().numpy().clip(0, 1)
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(f"label {names[target[i]] if names else int(target[i])}", fontsize=6)
        for j, (maps, classes, pred) in enumerate(columns):
            axes[i, 1 + j].imshow(img)
            axes[i, 1 + j].imshow(maps[i].numpy(), cmap="jet", alpha=0.5)
            axes[i, 1 + j].set_title(f"cls {int(classes[i])} pred {int(pred[i])}", fontsize=6)
    for j, label in enumerate(labels):
        axes[0, 1 + j].set_title(f"{label}\n" + axes[0, 1 + j].get_title(), fontsize=6)
    for a in axes.flat:
        a.axis("off")
    save_figure(fig, args.out)
    return {"method": args.method, "classes": args.classes, "num_images": n, "out": args.out}


def run_tsne(args: argparse.Namespace) -> Dict[str, object]:
    from sklearn.manifold import TSNE

    device = torch.device(args.device)
    ckpts = pair_models(args)
    labels = model_labels(args, args.model, ckpts)
    loader, normalize, num_classes = load_eval_data(args)
    fig, axes = plt.subplots(1, len(args.model), figsize=(5 * len(args.model), 5), squeeze=False)
    for ax, name, ckpt, label in zip(axes[0], args.model, ckpts, labels):
        res = _predict_all(load_model(name, args.dataset, num_classes, ckpt).to(device), loader, normalize, device)
        perplexity = min(args.perplexity, (res["pooled"].shape[0] - 1) / 3)
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=args.seed)
        emb = tsne.fit_transform(res["pooled"])
        ax.scatter(emb[:, 0], emb[:, 1], c=res["labels"], cmap="nipy_spectral", s=4, vmin=0, vmax=num_classes - 1)
        ax.set_title(f"t-SNE of pooled features: {label}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, args.out)
    return {"num_images": int(len(loader.dataset)), "out": args.out}


def class_mean_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) matrix whose row c is the mean logit vector of the images of class c (mdistiller's correlation
    notebook)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class_mean_logits: classes {np.flatnonzero(counts == 0)[:10].tolist()} have no image")
    matrix = np.zeros((num_classes, logits.shape[1]))
    np.add.at(matrix, labels, logits)
    return matrix / counts[:, None]


def correlation_difference(
    logits_t: np.ndarray, logits_s: np.ndarray, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """|M_student - M_teacher| of the class-mean logit matrices, diagonal zeroed (only inter-class structure)."""
    diff = np.abs(class_mean_logits(logits_s, labels, num_classes) - class_mean_logits(logits_t, labels, num_classes))
    np.fill_diagonal(diff, 0.0)
    return diff


def run_corr(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = pair_models(args)
    labels = model_labels(args, args.model, ckpts)
    loader, normalize, num_classes = load_eval_data(args)
    teacher_model = load_model(args.teacher, args.dataset, num_classes, args.teacher_ckpt, **TEACHER_KEYS)
    teacher = _predict_all(teacher_model.to(device), loader, normalize, device)
    diffs = {}
    for name, ckpt, label in zip(args.model, ckpts, labels):
        student = _predict_all(load_model(name, args.dataset, num_classes, ckpt).to(device), loader, normalize, device)
        diffs[label] = correlation_difference(teacher["logits"], student["logits"], teacher["labels"], num_classes)
    vmax = args.max_diff or max(float(d.max()) for d in diffs.values()) or 1.0
    fig, axes = plt.subplots(1, len(diffs), figsize=(5 * len(diffs), 4.3), squeeze=False)
    summary = {}
    for ax, (label, diff) in zip(axes[0], diffs.items()):
        im = ax.imshow(diff, cmap="PuBuGn", vmin=0, vmax=vmax)
        summary[label] = {"max": float(diff.max()), "mean": float(diff.mean())}
        ax.set_title(f"|student - teacher|: {label}\nmax {diff.max():.3f} mean {diff.mean():.3f}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, args.out)
    write_json(os.path.splitext(args.out)[0] + ".json", {"teacher": args.teacher, "students": summary})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("heatmaps", help="images x (teacher | student A | ...) heatmap grid")
    add_common_arguments(p, "cifar100", OUT_HELP)
    add_method_arguments(p)
    p.add_argument("--classes", choices=("first", "label", "own"), default="first",
                   help="explain the first model's prediction (all columns alike), the label, or each model's own")
    p = sub.add_parser("tsne", help="t-SNE of pooled features, one panel per model")
    add_common_arguments(p, "cifar100", OUT_HELP)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("corr", help="teacher-student difference of class-mean logit (correlation) matrices")
    add_common_arguments(p, "cifar100", OUT_HELP + " (and the .json beside it)")
    p.add_argument("-t", "--teacher", required=True)
    p.add_argument("-tc", "--teacher-ckpt", default=PRETRAIN)
    p.add_argument("--max-diff", type=float, default=0.0, help="colour-scale maximum (0: the largest difference)")
    p = sub.add_parser("curves", help="training curves from worklog.txt files")
    p.add_argument("logs", nargs="+", help="worklog.txt files")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--metrics", nargs="+", help="default: every metric in the logs except lr")
    p.add_argument("--out", help=OUT_HELP)
    add_debug_argument(p)
    for q in sub.choices.values():
        q.set_defaults(out="output/visualize")
    return parser


def execute(args: argparse.Namespace) -> Dict[str, object]:
    """Draw the subcommand's figure for parsed `args`; its summary, also printed as one JSON line."""
    args.out = figure_path(args.out, args.command)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runner = {"heatmaps": run_heatmaps, "tsne": run_tsne, "corr": run_corr, "curves": run_curves}
    result = runner[args.command](args)
    print(json.dumps(result))
    return result


def run(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """The tool without its error handling (errors propagate): for tests and notebooks."""
    return execute(build_parser().parse_args(argv))


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: exit status 0, or one line on stderr and 2 (bad option value) or 1 (other errors)."""
    args = build_parser().parse_args(argv)
    return run_cli("visualize.py", lambda: execute(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
