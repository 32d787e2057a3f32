"""Explainability evaluation: perturbation test, segmentation test and teacher-student map agreement.

    python tools/explain_eval.py perturbation -m resnet32x4 -c pretrain -m resnet8x4 -c ckpt/student_best \
        -d cifar100 --method cam [--negative] [--target {top,label}] [--num-images N] [--out DIR]
    python tools/explain_eval.py segmentation --data gtsegs_ijcv.mat -m ResNet18 -c pretrain -d imagenet --method cam
    python tools/explain_eval.py agreement -t resnet32x4 -tc pretrain -m resnet8x4 -c ckpt --method cam gradcam \
        -d cifar100

Each writes a JSON and a PNG into --out. Protocols: docs/evaluation.md.
"""
import argparse
import copy
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision import transforms  # noqa: E402

from mdistiller.dataset.shapes import SHAPES_MEAN, SHAPES_STD, VAL_SEED, ShapesDataset  # noqa: E402
from mdistiller.explain import METHODS, explain  # noqa: E402
from mdistiller.explain.agreement import agreement_test  # noqa: E402
from mdistiller.explain.perturbation import perturbation_test  # noqa: E402
from mdistiller.explain.segmentation import GtSegsDataset, segmentation_evaluate  # noqa: E402
from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict  # noqa: E402

# Training normalisation per dataset, for inputs that do not come through a dataset's own transform.
NORM_STATS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "shapes": (SHAPES_MEAN, SHAPES_STD),
}
DEFAULT_NUM_CLASSES = {"imagenet": 1000, "cifar100": 100, "tiny_imagenet": 200, "shapes": 4}
Normalize = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- models


def strip_state_dict(obj: object, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """A bare state dict from a full checkpoint {"model": distiller state}, a student file {"model": sd} or a bare sd.

    Distiller checkpoints keep only the `[module.]student.` entries (the teacher and connectors are dropped)."""
    sd = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{source}: expected a state dict, {{'model': state_dict}} or a full checkpoint")
    keys = list(sd)
    for prefix in ("module.student.", "student."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def build_model(name: str, dataset: str, num_classes: int, ckpt: str) -> torch.nn.Module:
    """Model `name` from the registry of `dataset`; `ckpt` is a path, "pretrain" (the registry's teacher weights) or
    "none" (random initialisation, for smoke tests)."""
    if dataset == "imagenet":
        if name not in imagenet_model_dict:
            raise ValueError(f"-m {name}: not in imagenet_model_dict ({', '.join(sorted(imagenet_model_dict))})")
        model = imagenet_model_dict[name](pretrained=ckpt == "pretrain")
        teacher_path = None
    else:
        registry = tiny_imagenet_model_dict if dataset == "tiny_imagenet" else cifar_model_dict
        if name not in registry:
            raise ValueError(f"-m {name}: not in the {dataset} model registry ({', '.join(sorted(registry))})")
        ctor, teacher_path = registry[name]
        model = ctor(num_classes=num_classes)
    if ckpt not in ("none", "pretrain") or (ckpt == "pretrain" and dataset != "imagenet"):
        path = teacher_path if ckpt == "pretrain" else ckpt
        if path is None:
            raise ValueError(f"-c pretrain: model {name} has no teacher checkpoint in the {dataset} registry")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"-c {ckpt}: checkpoint file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(strip_state_dict(state, path))
    return model.eval()


def resolve_layer(method: str, layer: Union[str, int, None]) -> Union[str, int]:
    """Default layer per method: at "gap", LRP and gradient x input reduce to CAM / (H*W) (identical rankings), so
    they are evaluated at the input pixels unless a layer is given."""
    if layer is not None:
        return layer
    return "input" if method in ("lrp", "gradient_input") else "gap"


def make_map_fn(
    model: torch.nn.Module, method: str, layer: Union[str, int, None]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x_normalised, classes (B,)) -> (B, h, w) maps of `model` for one class per sample."""
    layer = resolve_layer(method, layer)

    def map_fn(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return explain(model, x, classes[:, None], method=method, layer=layer)[:, 0]

    return map_fn


# ---------------------------------------------------------------------------------------------------- data


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> Normalize:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: (x - m.to(x.device)) / s.to(x.device)


def _split_normalize(
    transform: Optional[Callable],
) -> Tuple[Optional[Callable], Tuple[Sequence[float], Sequence[float]]]:
    """The transform without its Normalize step, and that step's (mean, std)."""
    if isinstance(transform, transforms.Compose):
        steps = [t for t in transform.transforms if not isinstance(t, transforms.Normalize)]
        norms = [t for t in transform.transforms if isinstance(t, transforms.Normalize)]
        if norms:
            return transforms.Compose(steps), (tuple(norms[-1].mean), tuple(norms[-1].std))
    if isinstance(transform, transforms.Normalize):
        return None, (tuple(transform.mean), tuple(transform.std))
    return transform, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _unnormalized(dataset: object) -> Tuple[object, Tuple[Sequence[float], Sequence[float]]]:
    """A shallow copy of `dataset` (through Subset wrappers) whose transform yields [0, 1] images."""
    if isinstance(dataset, Subset):
        inner, stats = _unnormalized(dataset.dataset)
        return Subset(inner, dataset.indices), stats
    if not hasattr(dataset, "transform"):
        raise ValueError(f"dataset {type(dataset).__name__} has no `transform` to take the normalisation from")
    ds = copy.copy(dataset)
    ds.transform, stats = _split_normalize(dataset.transform)
    return ds, stats


def load_eval_data(args: argparse.Namespace) -> Tuple[DataLoader, Normalize, int]:
    """Loader of ([0, 1] images, labels) over the first --num-images validation images, the model normalisation and
    the number of classes. `shapes` is generated here; other names go through `mdistiller.dataset.get_val_loader`."""
    if args.dataset == "shapes":
        size, n = args.image_size or 32, args.num_images or 200
        ds = ShapesDataset(n, size, VAL_SEED, args.num_classes or 4, transforms.ToTensor())
        stats, num_classes = NORM_STATS["shapes"], len(ds.classes)
    else:
        from mdistiller.dataset import get_val_loader

        val_loader, num_classes = get_val_loader(args.dataset, args.data_root, args.batch_size)
        ds, stats = _unnormalized(val_loader.dataset)
        num_classes = args.num_classes or num_classes
    if args.num_images and args.num_images < len(ds):
        ds = Subset(ds, range(args.num_images))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    return loader, _normalizer(*stats), num_classes


# ---------------------------------------------------------------------------------------------------- outputs


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def _save(fig: plt.Figure, path: str) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def _labels(args: argparse.Namespace, names: List[str], ckpts: List[str]) -> List[str]:
    if args.labels:
        if len(args.labels) != len(names):
            raise ValueError(f"--labels: {len(args.labels)} labels for {len(names)} models")
        return list(args.labels)
    return [f"{n} ({c if c in ('none', 'pretrain') else os.path.basename(c)})" for n, c in zip(names, ckpts)]


def _pair_models(args: argparse.Namespace) -> List[str]:
    ckpts = args.ckpt or ["pretrain"] * len(args.model)
    if len(ckpts) != len(args.model):
        raise ValueError(f"-c given {len(ckpts)} times for {len(args.model)} -m models; give one -c per -m")
    return ckpts


# ---------------------------------------------------------------------------------------------------- commands


def run_perturbation(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = _pair_models(args)
    loader, normalize, num_classes = load_eval_data(args)
    labels = _labels(args, args.model, ckpts)
    results = []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = build_model(name, args.dataset, num_classes, ckpt).to(device)
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
    _write_json(stem + ".json", out)
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        ax.plot([100 * f for f in r["fractions"]], [100 * a for a in r["accuracies"]], marker="o",
                label=f"{r['label']}: AUC {r['auc']:.2f}")
    ax.set_xlabel(f"pixels removed, {'least' if args.negative else 'most'} relevant first (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{test} perturbation, {args.method}, {args.dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, stem + ".png")
    return out


def run_segmentation(args: argparse.Namespace) -> Dict[str, object]:
    if args.dataset not in NORM_STATS:
        raise ValueError(f"-d {args.dataset}: segmentation needs a known normalisation, one of {sorted(NORM_STATS)}")
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: file not found (ImageNet-Segmentation's gtsegs_ijcv.mat)")
    device = torch.device(args.device)
    ckpts = _pair_models(args)
    labels = _labels(args, args.model, ckpts)
    size = args.image_size or (224 if args.dataset == "imagenet" else 32)
    ds = GtSegsDataset(args.data, size=size, limit=args.num_images)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    normalize = _normalizer(*NORM_STATS[args.dataset])
    num_classes = args.num_classes or DEFAULT_NUM_CLASSES[args.dataset]
    results, examples = [], []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = build_model(name, args.dataset, num_classes, ckpt).to(device)
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
    _write_json(stem + ".json", out)
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
    _save(fig, stem + ".png")
    return out


def run_agreement(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = _pair_models(args)
    loader, normalize, num_classes = load_eval_data(args)
    labels = _labels(args, args.model, ckpts)
    teacher = build_model(args.teacher, args.dataset, num_classes, args.teacher_ckpt).to(device)
    results = []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        student = build_model(name, args.dataset, num_classes, ckpt).to(device)
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
    _write_json(stem + ".json", out)
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
    _save(fig, stem + ".png")
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def _layer(value: str) -> Union[str, int]:
    return int(value) if value.lstrip("-").isdigit() else value


def _common(p: argparse.ArgumentParser, dataset_default: str) -> None:
    p.add_argument("-m", "--model", action="append", required=True, help="registry name; repeat for several models")
    p.add_argument("-c", "--ckpt", action="append", help="checkpoint per -m: a path, 'pretrain' or 'none' (random)")
    p.add_argument("--labels", nargs="+", help="legend label per -m")
    p.add_argument("-d", "--dataset", default=dataset_default,
                   help="cifar100, imagenet, tiny_imagenet, digits, shapes (the model registry and normalisation)")
    p.add_argument("--layer", default=None, type=_layer, help="layer passed to mdistiller.explain.explain: gap, "
                   "input, a stage index or a module name (default: gap for cam/gradcam, input for lrp/gradient_input)")
    p.add_argument("--data-root", default="data", help="root of the real data sets (DATASET.ROOT)")
    p.add_argument("--num-classes", type=int, default=0, help="override the dataset's number of classes")
    p.add_argument("--num-images", type=int, default=0, help="evaluate the first N images only (0: all)")
    p.add_argument("--image-size", type=int, default=0, help="shapes / segmentation input size (0: dataset default)")
    p.add_argument("-bs", "--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="output/explain_eval", help="folder for the JSON and PNG files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("perturbation", help="accuracy while removing the most/least relevant pixels; AUC")
    _common(p, "cifar100")
    p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--negative", action="store_true", help="remove the least relevant pixels first")
    p.add_argument("--target", choices=("top", "label"), default="top", help="explain the prediction or the label")
    p.add_argument("--cache-dir", default="", help="store/reuse the low-resolution maps here")
    p = sub.add_parser("segmentation", help="pixel accuracy, mIoU, mAP, F1 against object masks")
    _common(p, "imagenet")
    p.add_argument("--data", required=True, help="gtsegs_ijcv.mat or a file written in its layout")
    p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--num-examples", type=int, default=6, help="rows in the PNG")
    p = sub.add_parser("agreement", help="cosine and top-region IoU between teacher and student maps")
    _common(p, "cifar100")
    p.add_argument("-t", "--teacher", required=True)
    p.add_argument("-tc", "--teacher-ckpt", default="pretrain")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["cam"])
    p.add_argument("--target", choices=("teacher", "label"), default="teacher")
    p.add_argument("--top", type=float, default=0.2, help="fraction of pixels forming the compared region")
    return parser


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    runner = {"perturbation": run_perturbation, "segmentation": run_segmentation, "agreement": run_agreement}
    return runner[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
