"""What tools/explain_eval.py and tools/visualize.py share: the model/checkpoint/data options, the evaluation data in
[0, 1] with the model's normalisation kept apart, explanation map functions (with their cache) and the JSON / CSV /
PNG writers. The options and outputs are described in docs/evaluation.md."""
import argparse
import copy
import csv
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from ..dataset import DATASETS, get_val_loader, normalization, num_classes, shapes
from ..dataset.shapes import VAL_SEED, ShapesDataset
from ..errors import ConfigError
from ..explain import COMPOSITES, METHODS, RULES, explain
from ..explain.segmentation import write_gtsegs
from ..models import check_model_name
from .build import PRETRAIN, RANDOM, default_device

Normalize = Callable[[torch.Tensor], torch.Tensor]
Stats = Tuple[Sequence[float], Sequence[float]]
MapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SHAPES = "shapes"  # generated in memory (mdistiller.dataset.shapes), not one of DATASETS
SHAPES_NUM_CLASSES = 4  # the shapes classes unless --num-classes says otherwise
DATASET_KEY = "-d/--dataset"
DEFAULT_RULE = "epsilon_plus_flat"  # explain()'s default LRP composite
LRP_RULES = sorted(COMPOSITES) + sorted(r for r in RULES if r != "zbox")  # zbox is valid on the input layer only


# ---------------------------------------------------------------------------------------------------- options


def parse_layer(value: str) -> Union[str, int]:
    """--layer: a stage index (int) or a name ("gap", "input", a module name)."""
    return int(value) if value.lstrip("-").isdigit() else value


def add_common_arguments(p: argparse.ArgumentParser, dataset_default: str,
                         out_help: str = "folder for the JSON, CSV and PNG files") -> None:
    """The options of every model-evaluating subcommand: models and checkpoints, data, layer, device, output."""
    p.add_argument("-m", "--model", action="append", required=True, help="registry name; repeat for several models")
    p.add_argument("-c", "--ckpt", action="append", help="checkpoint per -m: a path, 'pretrain' or 'none' (random)")
    p.add_argument("--labels", nargs="+", help="legend label per -m")
    p.add_argument("-d", "--dataset", default=dataset_default,
                   help="cifar100, imagenet, tiny_imagenet, digits, shapes (the model registry and normalisation)")
    p.add_argument("--layer", default=None, type=parse_layer, help="layer passed to mdistiller.explain.explain: gap, "
                   "input, a stage index or a module name (default: gap for cam/gradcam, input for lrp/gradient_input;"
                   " LRP to a stage index gives that stage's resolution)")
    p.add_argument("--data-root", default="data", help="root of the real data sets (DATASET.ROOT)")
    p.add_argument("--num-classes", type=int, default=0, help="override the dataset's number of classes")
    p.add_argument("--num-images", type=int, default=0, help="evaluate the first N images only (0: all)")
    p.add_argument("--image-size", type=int, default=0, help="shapes / segmentation input size (0: dataset default)")
    p.add_argument("-bs", "--batch-size", type=int, default=16)
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--out", default="output/explain_eval", help=out_help)
    add_debug_argument(p)


def add_method_arguments(p: argparse.ArgumentParser, several: bool = False) -> None:
    """--method (one, or several with `several`) and the LRP options --rule and --zero-bias."""
    if several:
        p.add_argument("--method", nargs="+", choices=METHODS, default=["cam"])
    else:
        p.add_argument("--method", choices=METHODS, default="cam")
    p.add_argument("--rule", choices=LRP_RULES, default=None,
                   help=f"LRP only: a composite or one rule for every layer (default {DEFAULT_RULE}; docs/explain.md)")
    p.add_argument("--zero-bias", action="store_true",
                   help="LRP only: biases take no relevance, so it is conserved (docs/explain.md)")


def lrp_options(methods: Sequence[str], rule: Optional[str], zero_bias: bool) -> Dict[str, object]:
    """{"rule", "zero_bias"} for make_map_fn; a ConfigError when they are given without --method lrp (they would
    be silently ignored)."""
    if "lrp" not in methods and (rule is not None or zero_bias):
        given = " and ".join(o for o, on in (("--rule", rule is not None), ("--zero-bias", zero_bias)) if on)
        raise ConfigError(f"{given}: LRP options, given without --method lrp (--method {' '.join(methods)})")
    return {"rule": rule or DEFAULT_RULE, "zero_bias": zero_bias}


def add_resize_argument(p: argparse.ArgumentParser) -> None:
    """--center-crop: the training pipeline's resize and centre crop instead of the reference's straight resize."""
    p.add_argument("--center-crop", action="store_true",
                   help="ImageNet-style data (resize then centre crop in the validation transform, e.g. imagenet): "
                   "keep that crop; default: resize straight to the crop size (224x224 for imagenet) as the "
                   "reference's perturbation test does")


def add_debug_argument(p: argparse.ArgumentParser) -> None:
    """--debug: tracebacks instead of one-line errors (mdistiller.launch.cli.run_cli)."""
    p.add_argument("--debug", action="store_true", default=False, help="tracebacks instead of one-line errors")


def pair_models(args: argparse.Namespace) -> List[str]:
    """The checkpoint of each -m (all 'pretrain' without -c), after checking every -m (and -t) name against the
    model registry of -d, so that a bad name fails before any data is read."""
    ckpts = args.ckpt or [PRETRAIN] * len(args.model)
    if len(ckpts) != len(args.model):
        raise ConfigError(f"-c given {len(ckpts)} times for {len(args.model)} -m models; give one -c per -m")
    for name in args.model:
        check_model_name(name, args.dataset, "-m/--model")
    if getattr(args, "teacher", None) is not None:
        check_model_name(args.teacher, args.dataset, "-t/--teacher")
    return ckpts


def model_labels(args: argparse.Namespace, names: List[str], ckpts: List[str]) -> List[str]:
    """--labels, or "name (checkpoint file name | pretrain | none)" per model."""
    if args.labels:
        if len(args.labels) != len(names):
            raise ConfigError(f"--labels: {len(args.labels)} labels for {len(names)} models")
        return list(args.labels)
    return [f"{n} ({c if c in (RANDOM, PRETRAIN) else os.path.basename(c)})" for n, c in zip(names, ckpts)]


# ---------------------------------------------------------------------------------------------------- data


def check_dataset(dataset: str) -> None:
    """A ConfigError naming -d/--dataset for a data set that is neither a known type nor "shapes"."""
    if dataset != SHAPES and dataset not in DATASETS:
        raise ConfigError(f"{DATASET_KEY} = {dataset!r} is unknown; expected one of "
                         f"{', '.join(sorted([*DATASETS, SHAPES]))}")


def dataset_num_classes(dataset: str, override: int = 0) -> int:
    """`override` if given, else the data set's number of classes (shapes: SHAPES_NUM_CLASSES)."""
    check_dataset(dataset)
    if override:
        return override
    return SHAPES_NUM_CLASSES if dataset == SHAPES else num_classes(dataset)


def dataset_normalizer(dataset: str) -> Normalize:
    """The training normalisation of `dataset`, for [0, 1] inputs that do not come through its transforms."""
    check_dataset(dataset)
    return normalizer(*normalization(dataset))


def normalizer(mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """x -> (x - mean) / std per channel, on x's device."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return lambda x: (x - m.to(x.device)) / s.to(x.device)


def split_normalize(transform: Optional[Callable]) -> Tuple[Optional[Callable], Stats]:
    """The transform without its Normalize step, and that step's (mean, std) (identity stats when it has none)."""
    if isinstance(transform, transforms.Compose):
        steps = [t for t in transform.transforms if not isinstance(t, transforms.Normalize)]
        norms = [t for t in transform.transforms if isinstance(t, transforms.Normalize)]
        if norms:
            return transforms.Compose(steps), (tuple(norms[-1].mean), tuple(norms[-1].std))
    if isinstance(transform, transforms.Normalize):
        return None, (tuple(transform.mean), tuple(transform.std))
    return transform, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def unnormalized(dataset: object) -> Tuple[object, Stats]:
    """A shallow copy of `dataset` (through Subset wrappers) whose transform yields [0, 1] images, and the
    (mean, std) its transform normalised with."""
    if isinstance(dataset, Subset):
        inner, stats = unnormalized(dataset.dataset)
        return Subset(inner, dataset.indices), stats
    if not hasattr(dataset, "transform"):
        raise ValueError(f"dataset {type(dataset).__name__} has no `transform` to take the normalisation from")
    ds = copy.copy(dataset)
    ds.transform, stats = split_normalize(dataset.transform)
    return ds, stats


def straight_resize(transform: Optional[Callable]) -> Optional[Callable]:
    """`transform` with each Resize(s) + CenterCrop(c) pair replaced by Resize((c, c)) (same interpolation): the
    reference resizes ImageNet validation images straight to 224x224, without the crop. Other transforms unchanged."""
    if not isinstance(transform, transforms.Compose):
        return transform
    out = []
    for step in transform.transforms:
        if isinstance(step, transforms.CenterCrop) and out and isinstance(out[-1], transforms.Resize):
            resize = out.pop()
            out.append(transforms.Resize(tuple(step.size), interpolation=resize.interpolation,
                                         antialias=resize.antialias))
        else:
            out.append(step)
    return transforms.Compose(out)


def load_eval_data(args: argparse.Namespace, center_crop: bool = True) -> Tuple[DataLoader, Normalize, int]:
    """Loader of ([0, 1] images, labels) over the first --num-images validation images, the model normalisation and
    the number of classes. `shapes` is generated here; other names go through `mdistiller.dataset.get_val_loader`.
    `center_crop=False` resizes straight to the crop size instead (`straight_resize`)."""
    check_dataset(args.dataset)
    if args.dataset == SHAPES:
        size, n = args.image_size or 32, args.num_images or 200
        ds = ShapesDataset(n, size, VAL_SEED, dataset_num_classes(SHAPES, args.num_classes), transforms.ToTensor())
        stats, num_classes = normalization(SHAPES), len(ds.classes)
    else:
        val_loader, num_classes = get_val_loader(args.dataset, args.data_root, args.batch_size)
        ds, stats = unnormalized(val_loader.dataset)
        if not center_crop:
            inner = ds.dataset if isinstance(ds, Subset) else ds
            inner.transform = straight_resize(inner.transform)
        num_classes = args.num_classes or num_classes
    if args.num_images and args.num_images < len(ds):
        ds = Subset(ds, range(args.num_images))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    return loader, normalizer(*stats), num_classes


# ---------------------------------------------------------------------------------------------------- maps


def resolve_layer(method: str, layer: Union[str, int, None]) -> Union[str, int]:
    """Default layer per method: at "gap", LRP and gradient x input reduce to CAM / (H*W) (identical rankings), so
    they are evaluated at the input pixels unless a layer is given."""
    if layer is not None:
        return layer
    return "input" if method in ("lrp", "gradient_input") else "gap"


def make_map_fn(model: nn.Module, method: str, layer: Union[str, int, None], rule: str = DEFAULT_RULE,
                zero_bias: bool = False) -> MapFn:
    """(x_normalised, classes (B,)) -> (B, h, w) maps of `model` for one class per sample; `rule` and `zero_bias`
    are LRP's (explain ignores them for the other methods)."""
    layer = resolve_layer(method, layer)

    def map_fn(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return explain(model, x, classes[:, None], method=method, layer=layer, rule=rule, zero_bias=zero_bias)[:, 0]

    return map_fn


def file_identity(path: str) -> Union[str, List[object]]:
    """What identifies a checkpoint or data argument for a cache: a file's absolute path, size and modification
    time (a retrained checkpoint at the same path is a different model); any other value ('pretrain') itself."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    return path


class MapCache:
    """The low-resolution maps of one (model, data, method, ...) run in one file under `cache_dir`, so that another
    subcommand or run over the same images (the negative test after the positive one, a second student beside the same
    teacher) reads them instead of explaining again. `key` must hold everything the maps depend on; the file name is
    a hash of it. The maps are stored for the whole run (not per batch), so the batch size may change. An empty
    `cache_dir` or `enabled=False` (a random model, -c none: new weights every run) disables the cache."""

    def __init__(self, cache_dir: str, key: Dict[str, object], enabled: bool = True) -> None:
        self.path = None
        if cache_dir and enabled:
            text = json.dumps(key, sort_keys=True, default=str)
            name = "_".join(str(key.get(k, "")) for k in ("model", "method"))
            name = "".join(c if c.isalnum() else "_" for c in name)
            self.path = os.path.join(cache_dir, f"{name}_{hashlib.sha1(text.encode()).hexdigest()[:16]}.pt")
        self.stored = torch.load(self.path, weights_only=True) if self.path and os.path.isfile(self.path) else None
        self.computed: List[torch.Tensor] = []
        self.offset = 0

    def wrap(self, map_fn: MapFn) -> MapFn:
        """`map_fn` reading the stored maps in call order (its images must come in the same order as when stored)."""

        def cached(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            start, self.offset = self.offset, self.offset + x.shape[0]
            if self.stored is None:
                maps = map_fn(x, classes).detach()
                self.computed.append(maps.cpu())
                return maps
            if self.offset > self.stored.shape[0]:
                raise ValueError(f"map cache {self.path}: holds {self.stored.shape[0]} maps, the run asks for more; "
                                 f"delete the file")
            return self.stored[start:self.offset].to(x.device)

        return cached

    def save(self) -> None:
        """Store the maps computed by the wrapped function (nothing if they were read from the cache)."""
        if self.path and self.stored is None and self.computed:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            torch.save(torch.cat(self.computed), self.path)
            print(f"cached maps in {self.path}")


# ---------------------------------------------------------------------------------------------------- outputs


def write_json(path: str, obj: object) -> None:
    """`obj` as indented JSON at `path`, announced on stdout."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """`rows` (dicts with the same keys, in column order) as CSV with a header line at `path`, announced on stdout."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def save_figure(fig: Figure, path: str) -> None:
    """`fig` as a PNG at `path` (120 dpi, tight), closed afterwards, announced on stdout."""
    import matplotlib.pyplot as plt  # here, so that importing this module does not pick a backend

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def write_shapes_gtsegs(path: str, num_samples: int, size: int = 32, seed: int = VAL_SEED, num_classes: int = 4) -> int:
    """Write samples with their object masks in the `gtsegs_ijcv.mat` layout (for the segmentation test)."""
    samples = [shapes.make_shape_sample(i, seed, size, num_classes) for i in range(num_samples)]
    return write_gtsegs(path, [s[0] for s in samples], [s[1] for s in samples])
