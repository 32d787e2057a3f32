r"""Explainability evaluation: perturbation test, segmentation test and teacher-student map agreement.

    python tools/explain_eval.py perturbation -m resnet32x4 -c pretrain -m resnet8x4 -c ckpt/student_best \
        -d cifar100 --method cam [--negative] [--ties {random,raster,topk}] [--num-images N] [--out DIR]
    python tools/explain_eval.py segmentation --data gtsegs_ijcv.mat -m ResNet18 -c pretrain -d imagenet --method cam
    python tools/explain_eval.py agreement -t resnet32x4 -tc pretrain -m resnet8x4 -c ckpt --method cam gradcam \
        -d cifar100
    python tools/explain_eval.py runs output/sweep -t resnet32x4 -tc pretrain --method cam --num-images 1000

Each writes into --out a JSON (aggregates, each with its std and 95 % interval over images), a CSV (one row per image
and model) and a PNG. `<subcommand> --help` says how to read its numbers. Protocols: docs/evaluation.md.
`runs` writes into each finished training run below its folders an explain.json (the agreement of its last student
with the teacher and its perturbation AUC), which tools/summarize.py adds to its table (docs/studies.md).
"""
import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml

from mdistiller.engine.checkpoint import atomic_write
from mdistiller.engine.records import EXPLAIN_FILE, file_sha256, read_json, read_results
from mdistiller.errors import ConfigError
from mdistiller.explain.agreement import agreement_test
from mdistiller.explain.metrics import PERTURBATION_FRACTIONS
from mdistiller.explain.perturbation import TIES, perturbation_test
from mdistiller.explain.segmentation import GtSegsDataset, segmentation_evaluate
from mdistiller.launch.build import PRETRAIN, RANDOM, default_device, load_model
from mdistiller.launch.cli import run_cli
from mdistiller.launch.eval_common import (
    SHAPES,
    MapCache,
    add_common_arguments,
    add_debug_argument,
    add_method_arguments,
    add_resize_argument,
    dataset_normalizer,
    dataset_num_classes,
    file_identity,
    load_eval_data,
    lrp_options,
    make_map_fn,
    model_labels,
    pair_models,
    resolve_layer,
    save_figure,
    write_csv,
    write_json,
)
from mdistiller.launch.summary import find_runs

TEACHER_KEYS = {"key": "-t/--teacher", "ckpt_key": "-tc/--teacher-ckpt"}
OWN_PREDICTION = "own prediction"  # the explained class of perturbation --target top and of the agreement teacher

PERTURBATION_HELP = """Accuracy while the most (positive test) or least (--negative) relevant pixels are blacked out,
10 % ... 90 %, and the area under that curve.

Reading the numbers:
  AUC = trapezoid of top-1 accuracy over 0 ... 90 % removed, x 100; range [0, 90].
  Positive test: lower is better (the map found the pixels the model needs). Negative test: higher is better.
  The AUC confounds map quality with the model: its clean accuracy (the curve starts there) and its robustness to
  black masks. On the shapes data a randomly initialised resnet8 scores about as low as a trained one
  (docs/evaluation.md), so compare students only beside their clean accuracy (printed and in the JSON) and on the
  same data, method, --target and --ties.
  Ties (plateaus of ReLU'd maps) move the AUC by up to about a point: --ties random (seeded, default), raster
  (top rows first, biased), topk (the reference's torch.topk call, for comparison with published numbers).
  Every aggregate comes with its std over images and a normal 95 % interval (mean +- 1.96 std / sqrt(n))."""

SEGMENTATION_HELP = """Thresholded maps (foreground: relevance above its mean) against object masks
(ImageNet-Segmentation's gtsegs_ijcv.mat or a file in its layout).

Reading the numbers (all in [0, 1], higher is better):
  pixel_accuracy and miou are accumulated over the data set (large objects weigh more); their 95 % interval is a
  seeded bootstrap over images. map (average precision) and f1 are means over images, with a normal interval.
  Confounds: pixel accuracy rewards an all-background map where objects are small; the mean threshold favours maps
  whose spread matches the object size; map depends on the min-max normalisation. The explained class is the
  model's prediction (the file has no label), right or wrong."""

AGREEMENT_HELP = """Cosine similarity and top-region IoU between teacher and student maps of the same class.

Reading the numbers:
  cosine in [-1, 1], iou in [0, 1]; higher = the student's maps are closer to the teacher's (identical weights
  give 1 and 1). They do not measure map quality (copying a poor teacher scores 1), and smooth non-negative maps
  (Grad-CAM) agree well by chance: compare against an untrained student (-c none). Each student's clean accuracy is
  printed beside its agreement. Means come with their std and a normal 95 % interval over images."""

RUNS_HELP = """For each finished training run below the folders (a results.json with finished: true), the agreement
of its student_latest with the teacher -t/-tc (both explain the teacher's predicted class) and its positive
perturbation AUC (--ties random, seed 0), on the first --num-images images of the run's test split, written into
the run directory as explain.json. tools/summarize.py adds them as columns. A run whose explain.json came from the
same checkpoints and settings is skipped, so the command can follow a sweep as it grows; one without student_latest
(records committed without their checkpoints) is skipped with a message. Reading the numbers: see
`agreement --help` and `perturbation --help`."""


def _interval(u: Dict[str, object], digits: int) -> str:
    """"± std [low, high]" of an uncertainty entry, or "" for a single image."""
    if u["ci95"] is None:
        return ""
    low, high = u["ci95"]
    return f" ± {u['std']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _error_bars(results: List[Dict[str, object]], key: str) -> Optional[List[List[float]]]:
    """matplotlib yerr (distances below and above) of the 95 % intervals of `key`, None for single images. Zero-width
    intervals (identical maps) can land a rounding error on the wrong side of the mean: clamped at 0."""
    if any(r["uncertainty"][key]["ci95"] is None for r in results):
        return None
    return [[max(0.0, r[key] - r["uncertainty"][key]["ci95"][0]) for r in results],
            [max(0.0, r["uncertainty"][key]["ci95"][1] - r[key]) for r in results]]


def _row(per_image: Dict[str, object], i: int) -> Dict[str, object]:
    """Image `i` of per-image records as a CSV row; the data-set position is the "image" column."""
    return {("image" if k == "index" else k): v[i].item() for k, v in per_image.items()}


def _stem(args: argparse.Namespace, name: str) -> str:
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, name)


def _map_key(args: argparse.Namespace, name: str, ckpt: str, method: str, explained: str) -> Dict[str, object]:
    """Everything the maps of one model depend on, for MapCache."""
    data = ({"data": file_identity(args.data), "size": args.image_size} if args.command == "segmentation" else
            {"data_root": None if args.dataset == SHAPES else os.path.abspath(args.data_root),
             "image_size": args.image_size, "center_crop": args.center_crop})
    key = {"model": name, "ckpt": file_identity(ckpt), "dataset": args.dataset, "num_classes": args.num_classes,
           "num_images": args.num_images, **data, "method": method, "layer": resolve_layer(method, args.layer),
           "explained": explained}
    if method == "lrp":
        key.update(rule=args.rule, zero_bias=args.zero_bias)
    return key


def _cached_map_fn(args: argparse.Namespace, model: torch.nn.Module, name: str, ckpt: str, method: str,
                   explained: str, lrp: Dict[str, object]):
    cache = MapCache(args.cache_dir, _map_key(args, name, ckpt, method, explained), enabled=ckpt != RANDOM)
    return cache, cache.wrap(make_map_fn(model, method, args.layer, **lrp))


def _method_info(args: argparse.Namespace, methods: List[str], lrp: Dict[str, object]) -> Dict[str, object]:
    info: Dict[str, object] = {"layer": {m: resolve_layer(m, args.layer) for m in methods}}
    if "lrp" in methods:
        info.update(lrp)
    return info


# ---------------------------------------------------------------------------------------------------- commands


def run_perturbation(args: argparse.Namespace) -> Dict[str, object]:
    device = torch.device(args.device)
    ckpts = pair_models(args)
    lrp = lrp_options([args.method], args.rule, args.zero_bias)
    loader, normalize, num_classes = load_eval_data(args, center_crop=args.center_crop)
    labels = model_labels(args, args.model, ckpts)
    explained = OWN_PREDICTION if args.target == "top" else "label"
    results, rows = [], []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = load_model(name, args.dataset, num_classes, ckpt).to(device)
        cache, map_fn = _cached_map_fn(args, model, name, ckpt, args.method, explained, lrp)
        res = perturbation_test(model, loader, map_fn, normalize, negative=args.negative, target=args.target,
                                device=device, ties=args.ties, seed=args.seed)
        cache.save()
        per_image = res.pop("per_image")
        for i in range(res["num_images"]):
            rows.append({"model": label, "image": int(per_image["index"][i]), "label": int(per_image["label"][i]),
                         "pred": int(per_image["pred"][i]), "explained": int(per_image["explained"][i]),
                         **{f"correct_at_{round(100 * f)}": int(h)
                            for f, h in zip(PERTURBATION_FRACTIONS, per_image["hits"][i])},
                         "auc": float(per_image["auc"][i])})
        results.append({"label": label, "model": name, "ckpt": ckpt, **res})
        print(f"{label}: clean accuracy {res['clean_accuracy']:.4f}  "
              f"AUC {res['auc']:.2f}{_interval(res['uncertainty']['auc'], 2)}  "
              f"accuracies {[round(a, 4) for a in res['accuracies']]}")
    test = "negative" if args.negative else "positive"
    stem = _stem(args, f"perturbation_{args.dataset}_{args.method}_{test}")
    out = {"test": test, "better": "higher AUC" if args.negative else "lower AUC", "dataset": args.dataset,
           "method": args.method, **_method_info(args, [args.method], lrp), "target": args.target,
           "ties": args.ties, "seed": args.seed, "center_crop": args.center_crop, "per_image_csv": stem + ".csv",
           "results": results}
    write_json(stem + ".json", out)
    write_csv(stem + ".csv", rows)
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        x = [100 * f for f in r["fractions"]]
        line, = ax.plot(x, [100 * a for a in r["accuracies"]], marker="o",
                        label=f"{r['label']}: AUC {r['auc']:.2f} (clean acc. {100 * r['clean_accuracy']:.1f} %)")
        steps = r["uncertainty"]["accuracies"]
        if steps[0]["ci95"] is not None:
            ax.fill_between(x, [100 * s["ci95"][0] for s in steps], [100 * s["ci95"][1] for s in steps],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel(f"pixels removed, {'least' if args.negative else 'most'} relevant first (%)")
    ax.set_ylabel("top-1 accuracy (%), band: 95 % interval")
    ax.set_title(f"{test} perturbation ({out['better']} is better), {args.method}, {args.dataset}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, stem + ".png")
    return out


def run_segmentation(args: argparse.Namespace) -> Dict[str, object]:
    normalize = dataset_normalizer(args.dataset)
    num_classes = dataset_num_classes(args.dataset, args.num_classes)
    ckpts = pair_models(args)
    lrp = lrp_options([args.method], args.rule, args.zero_bias)
    labels = model_labels(args, args.model, ckpts)
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: file not found (ImageNet-Segmentation's gtsegs_ijcv.mat)")
    device = torch.device(args.device)
    size = args.image_size or (224 if args.dataset == "imagenet" else 32)
    ds = GtSegsDataset(args.data, size=size, limit=args.num_images)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    results, examples, rows = [], [], []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        model = load_model(name, args.dataset, num_classes, ckpt).to(device)
        cache, map_fn = _cached_map_fn(args, model, name, ckpt, args.method, OWN_PREDICTION, lrp)
        res = segmentation_evaluate(model, loader, map_fn, normalize, device=device, keep=args.num_examples,
                                    seed=args.seed)
        cache.save()
        per_image = res["per_image"]
        for i in range(len(per_image["index"])):
            rows.append({"model": label, **_row(per_image, i)})
        scores = res["scores"]
        results.append({"label": label, "model": name, "ckpt": ckpt, **scores, "uncertainty": res["uncertainty"]})
        examples.append(res["examples"])
        print(f"{label}: " + "  ".join(f"{k} {v:.4f}{_interval(res['uncertainty'][k], 4)}"
                                       for k, v in scores.items() if k in res["uncertainty"]))
    stem = _stem(args, f"segmentation_{os.path.splitext(os.path.basename(args.data))[0]}_{args.method}")
    out = {"data": args.data, "dataset": args.dataset, "better": "higher, every score", "method": args.method,
           **_method_info(args, [args.method], lrp), "size": size, "seed": args.seed, "per_image_csv": stem + ".csv",
           "results": results}
    write_json(stem + ".json", out)
    write_csv(stem + ".csv", rows)
    n = examples[0]["image"].shape[0] if examples[0] else 0
    if n:
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
    lrp = lrp_options(args.method, args.rule, args.zero_bias)
    loader, normalize, num_classes = load_eval_data(args, center_crop=args.center_crop)
    labels = model_labels(args, args.model, ckpts)
    teacher = load_model(args.teacher, args.dataset, num_classes, args.teacher_ckpt, **TEACHER_KEYS).to(device)
    explained = ("label" if args.target == "label" else
                 f"prediction of {args.teacher} {file_identity(args.teacher_ckpt)}")
    results, rows = [], []
    for name, ckpt, label in zip(args.model, ckpts, labels):
        student = load_model(name, args.dataset, num_classes, ckpt).to(device)
        for method in args.method:
            t_cache, t_map_fn = _cached_map_fn(args, teacher, args.teacher, args.teacher_ckpt, method,
                                               "label" if args.target == "label" else OWN_PREDICTION, lrp)
            s_cache, s_map_fn = _cached_map_fn(args, student, name, ckpt, method, explained, lrp)
            res = agreement_test(teacher, student, loader, t_map_fn, s_map_fn, normalize, normalize,
                                 target=args.target, top=args.top, device=device)
            t_cache.save()
            s_cache.save()
            per_image = res.pop("per_image")
            for i in range(res["num_images"]):
                rows.append({"model": label, "method": method, **_row(per_image, i)})
            results.append({"label": label, "model": name, "ckpt": ckpt, "method": method,
                            "layer": resolve_layer(method, args.layer), **res})
            u = res["uncertainty"]
            print(f"{label} [{method}]: student accuracy {res['student_accuracy']:.4f} (teacher "
                  f"{res['teacher_accuracy']:.4f})  cosine {res['cosine']:.4f}{_interval(u['cosine'], 4)}  "
                  f"top-{args.top:.0%} IoU {res['iou']:.4f}{_interval(u['iou'], 4)}")
    stem = _stem(args, f"agreement_{args.dataset}_{args.teacher}")
    out = {"teacher": args.teacher, "teacher_ckpt": args.teacher_ckpt, "dataset": args.dataset,
           "better": "higher = closer to the teacher (not map quality)", **_method_info(args, args.method, lrp),
           "target": args.target, "top": args.top, "center_crop": args.center_crop, "per_image_csv": stem + ".csv",
           "results": results}
    write_json(stem + ".json", out)
    write_csv(stem + ".csv", rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        rows_l = [r for r in results if r["label"] == label]
        xs = [args.method.index(r["method"]) + i * width for r in rows_l]
        for ax, key in zip(axes, ("cosine", "iou")):
            ax.bar(xs, [r[key] for r in rows_l], width=width, yerr=_error_bars(rows_l, key), capsize=2,
                   label=f"{label} (acc. {100 * rows_l[0]['student_accuracy']:.1f} %)")
    for ax, title in zip(axes, ("cosine similarity", f"IoU of top {args.top:.0%}")):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(args.method))], args.method)
        ax.set_ylim(top=1.0)
        ax.set_title(f"teacher {args.teacher} vs students: {title} (95 % interval)", fontsize=8)
    axes[0].legend(fontsize=7)
    save_figure(fig, stem + ".png")
    return out


def _run_student(run_dir: str) -> Dict[str, str]:
    """The dataset, data root and student of a training run, from its config.yaml."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        return {"dataset": cfg["DATASET"]["TYPE"], "data_root": cfg["DATASET"]["ROOT"],
                "student": cfg["DISTILLER"]["STUDENT"]}
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: cannot read DATASET.TYPE, DATASET.ROOT, DISTILLER.STUDENT ({error})") from error


def run_runs(args: argparse.Namespace) -> Dict[str, object]:
    """explain.json in every finished run below the folders: `agreement` of its student_latest with -t/-tc and its
    positive `perturbation` AUC, on the first --num-images test images. A run whose explain.json was made from the
    same files and settings is skipped; the teacher's maps are computed once per call."""
    teacher_sha = file_sha256(args.teacher_ckpt)
    written, skipped, missing = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for run_dir in find_runs(args.folders):
            results = read_results(run_dir) or {}
            if results.get("finished") is not True:
                print(f"{run_dir}: unfinished, skipped")
                continue
            ckpt = os.path.join(run_dir, "student_latest")
            if not os.path.isfile(ckpt):  # records without checkpoints: a clone of committed study records
                print(f"{run_dir}: no student_latest, skipped")
                missing.append(run_dir)
                continue
            trained = _run_student(run_dir)
            key = {"teacher": args.teacher, "teacher_ckpt_sha256": teacher_sha, "student": trained["student"],
                   "student_ckpt_sha256": file_sha256(ckpt), "dataset": trained["dataset"], "method": args.method,
                   "num_images": args.num_images, "top": args.top, "ties": "random", "seed": 0}
            path = os.path.join(run_dir, EXPLAIN_FILE)
            if (read_json(path) or {}).get("key") == key:
                skipped.append(run_dir)
                continue
            common = ["-m", trained["student"], "-c", ckpt, "-d", trained["dataset"], "--data-root",
                      trained["data_root"], "--method", args.method, "--num-images", str(args.num_images),
                      "-bs", str(args.batch_size), "--device", args.device, "--out", scratch,
                      "--cache-dir", os.path.join(scratch, "maps")]
            agreement = run(["agreement", "-t", args.teacher, "-tc", args.teacher_ckpt, "--top", str(args.top),
                             *common])["results"][0]
            perturbation = run(["perturbation", *common])["results"][0]
            record = {"key": key, "agreement_cosine": agreement["cosine"], "agreement_iou": agreement["iou"],
                      "perturbation_auc": perturbation["auc"], "student_accuracy": agreement["student_accuracy"],
                      "teacher_accuracy": agreement["teacher_accuracy"],
                      "uncertainty": {"agreement_cosine": agreement["uncertainty"]["cosine"],
                                      "agreement_iou": agreement["uncertainty"]["iou"],
                                      "perturbation_auc": perturbation["uncertainty"]["auc"]}}
            text = json.dumps(record, indent=1) + "\n"
            atomic_write(path, lambda f, text=text: f.write(text.encode()), EXPLAIN_FILE)
            print(f"wrote {path}")
            written.append(run_dir)
    return {"written": written, "skipped": skipped, "missing": missing}


# ---------------------------------------------------------------------------------------------------- CLI


def _subparser(sub: argparse._SubParsersAction, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=description,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default="", help="store / reuse the low-resolution maps here (one file per model, "
                   "method and data, shared by the subcommands; not for -c none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = _subparser(sub, "perturbation", "accuracy while removing the most/least relevant pixels; AUC (positive test: "
                   "lower is better)", PERTURBATION_HELP)
    add_common_arguments(p, "cifar100")
    add_method_arguments(p)
    add_resize_argument(p)
    p.add_argument("--negative", action="store_true", help="remove the least relevant pixels first")
    p.add_argument("--target", choices=("top", "label"), default="top", help="explain the prediction or the label")
    p.add_argument("--ties", choices=TIES, default="random",
                   help="order of equally relevant pixels: random (seeded by --seed and the image index; default), "
                   "raster (top rows first), topk (torch.topk per step, the reference's order)")
    p.add_argument("--seed", type=int, default=0, help="seed of --ties random")
    _add_cache(p)
    p = _subparser(sub, "segmentation", "pixel accuracy, mIoU, mAP, F1 against object masks (higher is better)",
                   SEGMENTATION_HELP)
    add_common_arguments(p, "imagenet")
    add_method_arguments(p)
    p.add_argument("--data", required=True, help="gtsegs_ijcv.mat or a file in its layout")
    p.add_argument("--num-examples", type=int, default=6, help="rows in the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals")
    _add_cache(p)
    p = _subparser(sub, "agreement", "cosine and top-region IoU between teacher and student maps (higher = closer to "
                   "the teacher)", AGREEMENT_HELP)
    add_common_arguments(p, "cifar100")
    add_method_arguments(p, several=True)
    add_resize_argument(p)
    p.add_argument("-t", "--teacher", required=True)
    p.add_argument("-tc", "--teacher-ckpt", default=PRETRAIN)
    p.add_argument("--target", choices=("teacher", "label"), default="teacher")
    p.add_argument("--top", type=float, default=0.2, help="fraction of pixels forming the compared region")
    _add_cache(p)
    p = _subparser(sub, "runs", "explain.json in each finished training run: agreement with a teacher and "
                   "perturbation AUC of its last student (read by tools/summarize.py)", RUNS_HELP)
    p.add_argument("folders", nargs="+", help="folders searched for run directories (results.json)")
    p.add_argument("-t", "--teacher", required=True)
    p.add_argument("-tc", "--teacher-ckpt", required=True)
    p.add_argument("--method", choices=("cam", "gradcam", "lrp", "gradient_input"), default="cam")
    p.add_argument("--top", type=float, default=0.2, help="fraction of pixels forming the compared region")
    p.add_argument("--num-images", type=int, default=1000, help="the first N test images (0: all)")
    p.add_argument("-bs", "--batch-size", type=int, default=100)
    p.add_argument("--device", default=str(default_device()))
    add_debug_argument(p)
    return parser


def execute(args: argparse.Namespace) -> Dict[str, object]:
    """Run the subcommand of parsed `args`; the results it also wrote as JSON."""
    runner = {"perturbation": run_perturbation, "segmentation": run_segmentation, "agreement": run_agreement,
              "runs": run_runs}
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
