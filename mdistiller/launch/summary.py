"""One table row per experiment from the runs' results.json (docs/studies.md): runs that differ only in their seed
form a group, summarised as mean ± sample std over its finished runs. Unfinished runs and groups with fewer seeds
than the largest group are flagged, never averaged in silently, and the same folders always give the same bytes."""
import csv
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ..engine.records import EXPLAIN_FILE, RESULTS_FILE, flatten, read_json, read_results
from ..errors import ConfigError

GROUP_KEYS = ("dataset", "teacher", "student", "distiller", "config_sha")
ACCURACY_LABELS = {"best_acc": "best top-1 (%)", "last_acc": "last top-1 (%)"}
EXPLAIN_LABELS = {"agreement_cosine": ("agreement cosine", 3), "agreement_iou": ("agreement IoU", 3),
                  "perturbation_auc": ("perturbation AUC", 2)}  # explain.json metrics: column, decimals
METRIC_CHOICES = {"best": ("best_acc",), "last": ("last_acc",), "both": ("best_acc", "last_acc")}
FORMATS = ("md", "csv", "json")
NONE_CELL = "—"


@dataclass
class Run:
    """A run directory and its results.json."""

    path: str
    results: Dict[str, Any]
    explain: Dict[str, Any] = field(default_factory=dict)  # its explain.json, where the run has one

    def value(self, metric: str) -> Optional[float]:
        value = self.explain.get(metric) if metric in EXPLAIN_LABELS else self.results.get(metric)
        return None if value is None else float(value)

    @property
    def finished(self) -> bool:
        return self.results.get("finished") is True


@dataclass
class Group:
    """Runs that share every grouping key; only finished ones enter the statistics."""

    keys: Dict[str, Any]
    finished: List[Run] = field(default_factory=list)
    unfinished: List[Run] = field(default_factory=list)
    of: int = 0  # finished runs of the largest group: fewer than that is flagged
    baseline: Optional["Group"] = None  # the group it is paired with, seed by seed (`--baseline`)

    def stats(self, metric: str) -> Dict[str, Optional[float]]:
        return _mean_std([run.value(metric) for run in self.finished if run.value(metric) is not None])

    def paired(self, metric: str) -> Dict[str, Any]:
        """Its metric minus the baseline's, over the seeds both have finished: mean, std, n and wins (> 0)."""
        if self.baseline is None or self.baseline is self:
            return {"mean": None, "std": None, "n": 0, "wins": 0}
        base = {run.results.get("seed"): run.value(metric) for run in self.baseline.finished}
        diffs = [run.value(metric) - base[run.results.get("seed")] for run in self.finished
                 if base.get(run.results.get("seed")) is not None and run.value(metric) is not None]
        return {**_mean_std(diffs), "n": len(diffs), "wins": sum(d > 0 for d in diffs)}

    def flags(self) -> List[str]:
        flags = []
        if len(self.finished) < self.of:
            flags.append(f"n={len(self.finished)} of {self.of}")
        if self.unfinished:
            epochs = ", ".join(f"seed {run.results.get('seed')} at epoch {run.results.get('epoch')}/"
                               f"{run.results.get('epochs')}" for run in self.unfinished)
            flags.append(f"{len(self.unfinished)} unfinished ({epochs})")
        return flags


def _mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    return {"mean": statistics.mean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None}


def find_runs(folders: Sequence[str]) -> List[str]:
    """Every directory holding a results.json below `folders` (walked in sorted order, each directory once); a folder
    that holds none is a ConfigError."""
    found: List[str] = []
    seen = set()
    for folder in folders:
        if not os.path.isdir(folder):
            raise ConfigError(f"{folder}: no such folder")
        below = 0
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            if RESULTS_FILE in files:
                below += 1
                if os.path.realpath(root) not in seen:
                    seen.add(os.path.realpath(root))
                    found.append(root)
        if not below:
            raise ConfigError(f"{folder}: no {RESULTS_FILE} below this folder")
    return found


def load_runs(run_dirs: Sequence[str]) -> List[Run]:
    runs = []
    for path in run_dirs:
        results = read_results(path)
        if results is None:
            raise ConfigError(f"{os.path.join(path, RESULTS_FILE)}: cannot be read as a JSON object")
        runs.append(Run(path, results, read_json(os.path.join(path, EXPLAIN_FILE)) or {}))
    return runs


def group_value(run: Run, key: str, configs: Dict[str, Dict[str, Any]]) -> Any:
    """A results.json field (`distiller`), or, for a config key (`KD.TEMPERATURE`: has a dot), the value the run
    trained with: its merged config.yaml (the overrides when that file is missing); None when neither has it."""
    if "." not in key:
        return run.results.get(key)
    if run.path not in configs:
        try:
            with open(os.path.join(run.path, "config.yaml")) as f:
                configs[run.path] = flatten(yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError):
            configs[run.path] = {}
    if key in configs[run.path]:
        return configs[run.path][key]
    return (run.results.get("overrides") or {}).get(key)


def _order(value: Any) -> Tuple[bool, bool, float, str]:
    """None last, numbers by value (2 before 10) before other values by their JSON text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value is None, not number, float(value) if number else 0.0, json.dumps(value, sort_keys=True, default=str)


def parse_baseline(text: str, group_by: Sequence[str]) -> Tuple[str, str]:
    """`--baseline KEY=VALUE` (VALUE as the table prints it), KEY one of the grouping keys."""
    key, sep, value = text.partition("=")
    if not sep or key not in group_by:
        raise ConfigError(f"--baseline {text!r}: expected KEY=VALUE with KEY one of the grouping keys "
                          f"{' '.join(group_by)}")
    return key, value


def pair_with_baseline(groups: Sequence[Group], key: str, value: str) -> None:
    """Each group's baseline: the group whose `key` prints as `value` and that shares every other grouping key
    except config_sha (methods differ in their config); none where there is no such group, or several."""
    def rest(group: Group) -> str:
        return json.dumps({k: v for k, v in group.keys.items() if k not in (key, "config_sha")}, sort_keys=True,
                          default=str)

    candidates: Dict[str, List[Group]] = {}
    for group in groups:
        if _cell(group.keys[key]) == value:
            candidates.setdefault(rest(group), []).append(group)
    if not candidates:
        raise ConfigError(f"--baseline {key}={value}: no group has {key} {value!r}")
    for group in groups:
        found = candidates.get(rest(group), [])
        group.baseline = found[0] if len(found) == 1 else None


def summarize(runs: Sequence[Run], group_by: Sequence[str] = GROUP_KEYS) -> List[Group]:
    """Groups sorted by their key values (None last), runs in each by seed then path."""
    configs: Dict[str, Dict[str, Any]] = {}
    groups: Dict[str, Group] = {}
    for run in runs:
        keys = {key: group_value(run, key, configs) for key in group_by}
        ident = json.dumps(keys, sort_keys=True, default=str)
        group = groups.setdefault(ident, Group(keys))
        (group.finished if run.finished else group.unfinished).append(run)
    ordered = sorted(groups.values(), key=lambda g: [_order(g.keys[key]) for key in group_by])
    largest = max((len(group.finished) for group in ordered), default=0)
    for group in ordered:
        group.of = largest
        for members in (group.finished, group.unfinished):
            members.sort(key=lambda run: (_order(run.results.get("seed")), run.path))
    return ordered


def _cell(value: Any) -> str:
    if value is None:
        return NONE_CELL
    return json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value)


def _number(value: Optional[float], digits: int) -> str:
    return NONE_CELL if value is None else f"{value:.{digits}f}"


def _seeds(group: Group) -> str:
    return ",".join(_cell(run.results.get("seed")) for run in group.finished) or NONE_CELL


def _explain_metrics(groups: Sequence[Group]) -> List[str]:
    """The explain.json metrics that some finished run has (no columns for studies without them)."""
    return [m for m in EXPLAIN_LABELS if any(run.value(m) is not None for g in groups for run in g.finished)]


def _paired_cell(paired: Dict[str, Any]) -> str:
    if not paired["n"]:
        return NONE_CELL
    std = "" if paired["std"] is None else f" ± {paired['std']:.2f}"
    return f"{paired['mean']:+.2f}{std} ({paired['wins']}/{paired['n']} seeds)"


def table_rows(groups: Sequence[Group], metrics: Sequence[str], split: bool,
               baseline: Optional[str] = None) -> List[List[str]]:
    """Header and one row per group; `split` gives each mean and std a column of its own (csv); `baseline` (the
    VALUE of --baseline) adds the paired differences."""
    keys = list(groups[0].keys) if groups else list(GROUP_KEYS)
    explained = _explain_metrics(groups)
    labels = {**ACCURACY_LABELS, **{m: label for m, (label, _) in EXPLAIN_LABELS.items()}}
    digits = {**{m: 2 for m in ACCURACY_LABELS}, **{m: d for m, (_, d) in EXPLAIN_LABELS.items()}}
    header = keys + ["n", "seeds"]
    for metric in metrics:
        header += [f"{labels[metric]} mean", f"{labels[metric]} std"] if split else [labels[metric]]
        if baseline is not None and metric in ACCURACY_LABELS:
            header += [f"{labels[metric]} - {baseline}, paired" + (" (wins/n)" if not split else ""),
                       *(["wins", "paired n"] if split else [])]
    for metric in explained:
        header += [f"{labels[metric]} mean", f"{labels[metric]} std"] if split else [labels[metric]]
    header += ["wall time (s)", "flags"]
    rows = [header]
    for group in groups:
        row = [_cell(group.keys[key]) for key in keys] + [str(len(group.finished)), _seeds(group)]
        for metric in (*metrics, *explained):
            stats = group.stats(metric)
            mean, std = _number(stats["mean"], digits[metric]), _number(stats["std"], digits[metric])
            if split:
                row += [mean, std]
            else:
                row.append(mean if stats["std"] is None else f"{mean} ± {std}")
            if baseline is not None and metric in ACCURACY_LABELS:
                paired = group.paired(metric)
                row += ([_number(paired["mean"], 2), str(paired["wins"]), str(paired["n"])] if split
                        else [_paired_cell(paired)])
        row += [_number(group.stats("wall_time_s")["mean"], 1), "; ".join(group.flags())]
        rows.append(row)
    return rows


def as_json(groups: Sequence[Group], metrics: Sequence[str], baseline: Optional[str] = None) -> List[Dict[str, Any]]:
    return [{
        "keys": group.keys,
        "n": len(group.finished),
        "of": group.of,
        "seeds": [run.results.get("seed") for run in group.finished],
        "runs": [run.path for run in group.finished],
        "unfinished": [{"run": run.path, "seed": run.results.get("seed"), "epoch": run.results.get("epoch"),
                        "epochs": run.results.get("epochs")} for run in group.unfinished],
        **{metric: group.stats(metric) for metric in (*metrics, *_explain_metrics(groups), "wall_time_s")},
        **({"baseline": None if group.baseline is None else group.baseline.keys,
            **{f"{metric}_paired": group.paired(metric) for metric in metrics}} if baseline is not None else {}),
        "flags": group.flags(),
    } for group in groups]


def render(groups: Sequence[Group], fmt: str = "md", metric: str = "both", baseline: Optional[str] = None) -> str:
    """The table as markdown, csv or json text (ending with a newline); `baseline`: the VALUE of --baseline, after
    `pair_with_baseline`."""
    metrics = METRIC_CHOICES[metric]
    if fmt == "json":
        return json.dumps(as_json(groups, metrics, baseline), indent=1, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(table_rows(groups, metrics, True, baseline))
        return buffer.getvalue()
    rows = table_rows(groups, metrics, False, baseline)
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines) + "\n"


def summary_text(folders: Sequence[str], fmt: str = "md", group_by: Sequence[str] = GROUP_KEYS,
                 metric: str = "both", baseline: Optional[str] = None) -> str:
    """What tools/summarize.py prints for `folders`; `baseline` "KEY=VALUE" adds the paired differences to it."""
    groups = summarize(load_runs(find_runs(folders)), group_by)
    value = None
    if baseline is not None:
        key, value = parse_baseline(baseline, group_by)
        pair_with_baseline(groups, key, value)
    return render(groups, fmt, metric, value)
