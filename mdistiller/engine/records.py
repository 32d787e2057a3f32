"""What a run leaves for studies (docs/records.md): `results.json`, rewritten atomically at every epoch end, and
`metrics.csv`, one row per epoch. Both survive a kill (old or new file, never half of one) and a resume (rows of
epochs that are trained again are replaced, the wall time adds up over launches)."""
import csv
import hashlib
import io
import json
import os
import platform
import subprocess
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from yacs.config import CfgNode

from .. import __version__
from ..distillers import distiller_dict
from .checkpoint import atomic_write

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.csv"
EXPLAIN_FILE = "explain.json"  # the student's explanation metrics, written by tools/explain_eval.py runs
RECORD_VERSION = 1

# Keys that do not change what is trained: the seed (runs that differ only in it form one group), names, logging,
# and paths (the same teacher or data at another place is the same experiment; the teacher file's hash is recorded).
UNHASHED_KEYS = ("EXPERIMENT.SEED", "EXPERIMENT.PROJECT", "EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.IMPORTS",
                 "DATASET.ROOT", "DATASET.DOWNLOAD", "DISTILLER.TEACHER_CKPT", "LOG.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def flatten(node: Mapping, prefix: str = "") -> Dict[str, Any]:
    """{"SOLVER.LR": 0.05, ...} with tuples as lists."""
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def imported_nodes(cfg: CfgNode) -> List[str]:
    """Config nodes of distillers registered from outside the package, except the node of the one trained: whether
    a process happened to import a user's distiller (a sweep plans every config in one process) must not change the
    identity of an experiment that does not use it."""
    trained_node = getattr(distiller_dict.get(cfg.DISTILLER.TYPE), "config_node", None)
    return [f"{cls.config_node}." for cls in distiller_dict.values()
            if getattr(cls, "config_node", None) not in (None, trained_node)
            and not cls.__module__.startswith("mdistiller.")]


def config_sha(cfg: CfgNode) -> str:
    """12 hex digits identifying the experiment: the merged config without UNHASHED_KEYS and without the nodes of
    imported distillers it does not train."""
    skipped = UNHASHED_KEYS + tuple(imported_nodes(cfg))
    kept = {key: value for key, value in flatten(cfg).items()
            if not any(key == skip or (skip.endswith(".") and key.startswith(skip)) for skip in skipped)}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_sha256(path: str) -> Optional[str]:
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_revision(repo: str = REPO) -> Optional[str]:
    """HEAD of the checkout the package runs from, with "+dirty" when it has uncommitted changes; None outside git."""
    if not os.path.exists(os.path.join(repo, ".git")):
        return None
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def versions() -> Dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "mdistiller": __version__}


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None when there is none (or it cannot be read)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_results(run_dir: str) -> Optional[Dict[str, Any]]:
    """The run's results.json, or None when there is none (or it cannot be read)."""
    return read_json(os.path.join(run_dir, RESULTS_FILE))


def read_metrics(run_dir: str) -> List[Dict[str, str]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()), "run record")


class RunRecord:
    """Writes the run's results.json and metrics.csv (rank 0 only); see docs/records.md for every field."""

    def __init__(self, run_dir: str, cfg: CfgNode, overrides: Sequence[str], teacher_ckpt: str = ""):
        self.run_dir = run_dir
        self.started = time.monotonic()
        self.previous_wall_time = 0.0
        self.rows: List[Dict[str, Any]] = []
        self.fields: List[str] = []
        self.results: Dict[str, Any] = {
            "record_version": RECORD_VERSION,
            "finished": False,
            "epoch": 0,
            "epochs": cfg.SOLVER.EPOCHS,
            "best_acc": None,
            "best_epoch": None,
            "last_acc": None,
            "seed": cfg.EXPERIMENT.SEED,
            "distiller": cfg.DISTILLER.TYPE,
            "teacher": cfg.DISTILLER.TEACHER if cfg.DISTILLER.TYPE != "NONE" else None,
            "student": cfg.DISTILLER.STUDENT,
            "dataset": cfg.DATASET.TYPE,
            "overrides": {str(key): str(value) for key, value in zip(overrides[0::2], overrides[1::2])},
            "config_sha": config_sha(cfg),
            "teacher_ckpt": teacher_ckpt or None,
            "teacher_ckpt_sha256": file_sha256(teacher_ckpt) if cfg.DISTILLER.TYPE != "NONE" else None,
            "git_rev": git_revision(),
            "versions": versions(),
            "wall_time_s": 0.0,
            "train_img_per_s": None,
        }

    def start(self, first_epoch: int) -> None:
        """Before the first epoch of this launch: keep what earlier launches recorded for epochs before it."""
        if first_epoch > 1:
            previous = read_results(self.run_dir) or {}
            self.previous_wall_time = float(previous.get("wall_time_s") or 0.0)
            self.rows = [row for row in read_metrics(self.run_dir) if int(row["epoch"]) < first_epoch]
            if self.rows:
                self.fields = list(self.rows[0])
        self.results["epoch"] = first_epoch - 1
        self._write_results()

    def epoch_end(self, row: Mapping[str, Any], best_acc: float, best_epoch: int, last_acc: float) -> None:
        """After an epoch's checkpoints are written: one metrics row (epoch, lr, losses, accuracies, times)."""
        row = {key: (round(value, 6) if isinstance(value, float) else value) for key, value in row.items()}
        if not self.fields:
            self.fields = list(row)
        else:
            self.fields += [key for key in row if key not in self.fields]
        self.rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _write_text(os.path.join(self.run_dir, METRICS_FILE), buffer.getvalue())
        speeds = [float(r["train_img_per_s"]) for r in self.rows if r.get("train_img_per_s") not in (None, "")]
        self.results.update(
            epoch=int(row["epoch"]), best_acc=best_acc, best_epoch=best_epoch, last_acc=last_acc,
            train_img_per_s=round(sum(speeds) / len(speeds), 2) if speeds else None,
        )
        self._write_results()

    def finish(self) -> None:
        self.results["finished"] = True
        self._write_results()

    def _write_results(self) -> None:
        self.results["wall_time_s"] = round(self.previous_wall_time + time.monotonic() - self.started, 3)
        _write_text(os.path.join(self.run_dir, RESULTS_FILE), json.dumps(self.results, indent=1) + "\n")
