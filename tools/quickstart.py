"""The whole job on real images, in minutes on a CPU, with one command (README command 1):

    python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python tools/quickstart.py

1. trains a resnet20 teacher on the handwritten digits shipped inside scikit-learn (32x32 RGB, fixed 1,437/360 split);
2. distils resnet8 students from it on 200 training images, where distillation matters: vanilla (no teacher), KD, DKD,
   Exp-KD with CAM maps (and Exp-KD with LRP maps with --lrp: about 3x the cost of a CAM step), 3 seeds each;
3. evaluates every student: best and last test top-1 (mean ± std over seeds), agreement of its CAMs with the teacher's
   (cosine, IoU of the top 20 %), and the CAM perturbation AUC (positive test: lower = the map finds the pixels that
   matter);
4. writes results.md, results.json, curves.png and heatmaps.png (teacher | KD student | Exp-KD student) under --out and
   prints where they are.

Nothing is special-cased: each run is `tools/train.py --cfg <out>/configs/<run>.yaml`, the config of
configs/digits/quickstart/ with the run's seed, output folder and teacher written in; the evaluation is
`tools/explain_eval.py` and `tools/visualize.py`. Every command is logged under <out>/logs and listed in
<out>/commands.sh. A re-run skips finished work (the teacher and runs whose config is unchanged; interrupted runs
resume); --fresh starts over; --smoke is a one-seed, two-epoch version of the same pipeline (CI).
"""
import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import yaml

from mdistiller.distillers import distiller_class
from mdistiller.engine.config import cfg_to_yaml, load_cfg

COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python tools/quickstart.py"
CONFIG_DIR = os.path.join(REPO, "configs", "digits", "quickstart")
TEACHER = "teacher"
# method -> label in the table; the config is CONFIG_DIR/<method>.yaml
METHODS: Dict[str, str] = {
    "vanilla": "vanilla (no teacher)",
    "kd": "KD",
    "dkd": "DKD",
    "expkd_cam": "Exp-KD (CAM)",
    "expkd_lrp": "Exp-KD (LRP)",
}
OPTIONAL_METHODS = ("expkd_lrp",)
SMOKE = {"seeds": 1, "epochs": 2, "teacher_epochs": 1, "num_images": 40}
EPOCH_LINE = re.compile(r"Epoch:(\d+)/(\d+)\| lr:")
OUTPUT_NAMES = ("configs", "runs", "logs", "eval", "results.md", "results.json", "curves.png", "heatmaps.png",
                "commands.sh")


class StepError(RuntimeError):
    """A command of the pipeline failed; the message names it and its log."""


@dataclass
class Step:
    """One command of the pipeline: a training run (`cfg` set) or an evaluation (`outputs` set)."""

    name: str
    argv: List[str]
    log: str
    cfg: Optional[object] = None
    method: str = ""
    seed: int = 0
    outputs: Sequence[str] = ()
    inputs: Sequence[str] = ()
    config_path: str = ""
    config_text: str = ""
    after: List["Step"] = field(default_factory=list)
    resume: bool = False

    @property
    def run_dir(self) -> str:
        return os.path.join(self.cfg.LOG.PREFIX, self.cfg.EXPERIMENT.PROJECT, self.cfg.EXPERIMENT.NAME)

    def checkpoint(self, kind: str) -> str:
        return os.path.join(self.run_dir, f"student_{kind}")

    @property
    def epochs(self) -> int:
        return self.cfg.SOLVER.EPOCHS if self.cfg is not None else 0


# ---------------------------------------------------------------------------------------------------- planning


def schedule_overrides(cfg, epochs: int) -> Dict[str, object]:
    """SOLVER.EPOCHS = `epochs`, with the LR steps and the distiller's warm-up scaled by the same factor."""
    scale = epochs / cfg.SOLVER.EPOCHS
    overrides = {"SOLVER.EPOCHS": epochs,
                 "SOLVER.LR_DECAY_STAGES": [max(1, round(s * scale)) for s in cfg.SOLVER.LR_DECAY_STAGES]}
    method = distiller_class(cfg.DISTILLER.TYPE)
    if method.warmup_key:
        node = method.config_node
        overrides[f"{node}.{method.warmup_key}"] = max(1, round(cfg[node][method.warmup_key] * scale))
    return overrides


def run_config(method: str, seed: int, out: str, epochs: int, teacher_ckpt: str) -> Tuple[str, object]:
    """One run's yaml (configs/digits/quickstart/<method>.yaml with its name, seed, output folder, teacher and
    schedule set) and the config tools/train.py builds from it."""
    source = os.path.join(CONFIG_DIR, f"{method}.yaml")
    base = load_cfg(source)
    overrides = {"EXPERIMENT.NAME": method if method == TEACHER else f"{method}_seed{seed}",
                 "EXPERIMENT.SEED": seed, "LOG.PREFIX": out}
    if distiller_class(base.DISTILLER.TYPE).needs_teacher:
        overrides["DISTILLER.TEACHER_CKPT"] = teacher_ckpt
    if epochs and epochs != base.SOLVER.EPOCHS:
        overrides.update(schedule_overrides(base, epochs))
    data = yaml.safe_load(read_text(source))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    text = f"# {os.path.relpath(source, REPO)} for one run of tools/quickstart.py\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False)
    return text, load_cfg(source, [item for pair in overrides.items() for item in pair])


def train_step(method: str, seed: int, out: str, epochs: int, teacher_ckpt: str) -> Step:
    text, cfg = run_config(method, seed, out, epochs, teacher_ckpt)
    name = cfg.EXPERIMENT.NAME
    config_path = os.path.join(out, "configs", f"{name}.yaml")
    argv = [os.path.join(REPO, "tools", "train.py"), "--cfg", config_path]
    return Step(name, argv, os.path.join(out, "logs", f"{name}.log"), cfg=cfg, method=method, seed=seed,
                config_path=config_path, config_text=text)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def flat(node: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    items: Dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(flat(value, f"{prefix}{key}."))
        else:
            items[prefix + key] = value
    return items


def train_state(step: Step) -> str:
    """"done", "partial" (resumable), "stale" (another config, or killed before its first checkpoint) or "new".

    The run's config.yaml (the trainer's dump) must agree with this config on every key both have: a key added to
    or removed from cfg.py since does not invalidate finished work, a changed value does."""
    if not os.path.isdir(step.run_dir):
        return "new"
    config = os.path.join(step.run_dir, "config.yaml")
    if not os.path.isfile(config):
        return "stale"
    old, new = flat(yaml.safe_load(read_text(config)) or {}), flat(yaml.safe_load(cfg_to_yaml(step.cfg)))
    if any(old[key] != new[key] for key in old.keys() & new.keys()):
        return "stale"
    worklog = os.path.join(step.run_dir, "worklog.txt")
    if os.path.isfile(worklog) and os.path.isfile(step.checkpoint("latest")) and \
            read_text(worklog).rstrip().splitlines()[-1].startswith("best_acc"):
        return "done"
    return "partial" if os.path.isfile(os.path.join(step.run_dir, "latest")) else "stale"


def eval_steps(out: str, teacher: Step, students: List[Step], num_images: int) -> List[Step]:
    """Agreement, perturbation, heatmaps and curves: the evaluation tools' own command lines."""
    tools, eval_dir = os.path.join(REPO, "tools"), os.path.join(out, "eval")
    teacher_model, teacher_ckpt = teacher.cfg.DISTILLER.STUDENT, teacher.checkpoint("best")
    data = ["-d", "digits", "--method", "cam", "-bs", str(min(num_images, 120)), "--num-images", str(num_images)]
    models = [arg for s in students for arg in ("-m", s.cfg.DISTILLER.STUDENT, "-c", s.checkpoint("latest"))]
    labels = [s.name for s in students]

    def step(name: str, argv: List[str], outputs: List[str], after: List[Step]) -> Step:
        inputs = [path for s in after for path in (s.checkpoint("latest"), os.path.join(s.run_dir, "worklog.txt"))]
        return Step(name, argv, os.path.join(out, "logs", f"{name}.log"), outputs=outputs, inputs=inputs, after=after)

    first = {}
    for s in students:
        first.setdefault(s.method, s)
    grid = [teacher] + [first[m] for m in ("kd", "expkd_cam") if m in first]
    steps = [
        step("agreement",
             [os.path.join(tools, "explain_eval.py"), "agreement", "-t", teacher_model, "-tc", teacher_ckpt, *models,
              "--labels", *labels, *data, "--out", eval_dir],
             [os.path.join(eval_dir, f"agreement_digits_{teacher_model}.json")], [teacher, *students]),
        step("perturbation",
             [os.path.join(tools, "explain_eval.py"), "perturbation", "-m", teacher_model, "-c", teacher_ckpt, *models,
              "--labels", TEACHER, *labels, *data, "--out", eval_dir],
             [os.path.join(eval_dir, "perturbation_digits_cam_positive.json")], [teacher, *students]),
        step("heatmaps",
             [os.path.join(tools, "visualize.py"), "heatmaps",
              *[arg for s in grid for arg in ("-m", s.cfg.DISTILLER.STUDENT, "-c",
                                              s.checkpoint("best" if s is teacher else "latest"))],
              "--labels", *[grid_label(s) for s in grid], "-d", "digits", "--method", "cam", "--num-images", "8",
              "--out", os.path.join(out, "heatmaps.png")],
             [os.path.join(out, "heatmaps.png")], grid),
    ]
    curves = [teacher] + list(first.values())
    steps.append(step(
        "curves",
        [os.path.join(tools, "visualize.py"), "curves", *[os.path.join(s.run_dir, "worklog.txt") for s in curves],
         "--labels", *[s.name for s in curves], "--metrics", "test_acc", "train_loss", "--out",
         os.path.join(out, "curves.png")],
        [os.path.join(out, "curves.png")], curves))
    return steps


def grid_label(step: Step) -> str:
    name = step.cfg.DISTILLER.STUDENT
    return f"teacher {name}" if step.method == TEACHER else f"{METHODS[step.method]} {name}"


def eval_done(step: Step) -> bool:
    """Outputs exist, are newer than the runs it reads, and were made by this very command."""
    stamp = step.log + ".cmd"
    if not all(os.path.isfile(p) for p in [stamp, *step.outputs]) or read_text(stamp) != " ".join(step.argv):
        return False
    oldest = min(os.path.getmtime(p) for p in step.outputs)
    return all(os.path.isfile(p) and os.path.getmtime(p) < oldest for p in step.inputs)


# ---------------------------------------------------------------------------------------------------- running


class Progress:
    """Epochs of the runs to train: a live bar on a terminal, one line per finished step otherwise."""

    def __init__(self, total_epochs: int):
        from tqdm import tqdm

        self.lock = threading.Lock()
        self.current: Dict[str, str] = {}
        self.seen: Dict[str, int] = {}
        self.start = time.monotonic()
        self.bar = tqdm(total=total_epochs, unit="epoch", dynamic_ncols=True, disable=not sys.stderr.isatty(),
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}]")

    def started(self, step: Step, note: str) -> None:
        with self.lock:
            self.current[step.name] = f"{step.name} 0/{step.epochs}" if step.epochs else step.name
            self._message(f"  start  {step.name}{note}")

    def epoch(self, step: Step, epoch: int) -> None:
        with self.lock:
            self.current[step.name] = f"{step.name} {epoch}/{step.epochs}"
            self.bar.update(epoch - self.seen.get(step.name, 0))
            self.seen[step.name] = epoch
            self.bar.set_description(", ".join(self.current.values()), refresh=True)

    def finished(self, step: Step, seconds: float, summary: str) -> None:
        with self.lock:
            self.current.pop(step.name, None)
            self._message(f"  done   {step.name} in {seconds:.0f} s{summary}")

    def _message(self, text: str) -> None:
        elapsed = time.monotonic() - self.start
        self.bar.write(f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}]{text}")

    def close(self) -> None:
        self.bar.close()


class Runner:
    """Runs steps as subprocesses, `jobs` at a time, each after the steps it depends on; stops all on a failure."""

    def __init__(self, jobs: int, threads: int, progress: Progress):
        self.jobs = jobs
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.progress = progress
        self.procs: Dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()

    def execute(self, step: Step) -> None:
        argv = [sys.executable, *step.argv] + (["--resume"] if step.resume else [])
        note = " (resuming)" if step.resume else ""
        self.progress.started(step, note)
        start = time.monotonic()
        last_lines: List[str] = []
        stamp = step.log + ".cmd"
        if os.path.exists(stamp):
            os.remove(stamp)  # an interrupted evaluation must not look finished next time
        with open(step.log, "a") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
            self.procs[step.name] = proc
            for line in proc.stdout:
                log.write(line)
                last_lines = (last_lines + [line.rstrip()])[-3:]
                match = EPOCH_LINE.search(line)
                if match:
                    self.progress.epoch(step, int(match.group(1)))
            code = proc.wait()
        if code != 0:
            if self.stopping.is_set():
                raise StepError(f"{step.name}: stopped")
            raise StepError(f"{step.name} failed (exit status {code}); log: {step.log}\n    "
                            + "\n    ".join(last_lines))
        if step.cfg is None:
            with open(stamp, "w") as f:
                f.write(" ".join(step.argv))
        summary = ""
        if step.cfg is not None:
            acc = read_accuracies(step)
            summary = f": best {acc['best']:.2f}, last {acc['last']:.2f} % top-1"
        self.progress.finished(step, time.monotonic() - start, summary)

    def run(self, steps: List[Step], skip: Callable[[Step], bool]) -> None:
        """Run `steps`; `skip(step)` is asked when the step's dependencies are done (so it sees their results)."""
        pending, done = list(steps), set()
        running: Dict[Future, Step] = {}
        with ThreadPoolExecutor(self.jobs) as pool:
            try:
                while pending or running:
                    changed = True
                    while changed:
                        changed = False
                        for step in [s for s in pending if all(d.name in done for d in s.after)]:
                            if skip(step):
                                done.add(step.name)
                            elif len(running) < self.jobs:
                                running[pool.submit(self.execute, step)] = step
                            else:
                                continue
                            pending.remove(step)
                            changed = True
                    if not running:
                        if pending:
                            raise StepError(f"{pending[0].name}: waits for a step that is not in the pipeline")
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        step = running.pop(future)
                        future.result()
                        done.add(step.name)
            except BaseException:
                self.stopping.set()
                for proc in self.procs.values():
                    if proc.poll() is None:
                        proc.terminate()
                raise


# ---------------------------------------------------------------------------------------------------- results


def read_accuracies(step: Step) -> Dict[str, float]:
    """Best and last test top-1 of a finished run, from its worklog.txt (the trainer's per-epoch log)."""
    best, last = None, None
    with open(os.path.join(step.run_dir, "worklog.txt")) as f:
        for line in f:
            if line.startswith("test_acc:"):
                last = float(line.split(":")[1])
            elif line.startswith("best_acc"):
                best = float(line.split()[-1])
    if best is None or last is None:
        raise StepError(f"{step.run_dir}/worklog.txt: no test_acc/best_acc lines (unfinished run?)")
    return {"best": best, "last": last}


def mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def collect(out: str, teacher: Step, students: List[Step], evals: Dict[str, Step]) -> Dict[str, object]:
    with open(evals["agreement"].outputs[0]) as f:
        agreement = {r["label"]: r for r in json.load(f)["results"]}
    with open(evals["perturbation"].outputs[0]) as f:
        perturbation = {r["label"]: r for r in json.load(f)["results"]}
    methods: Dict[str, Dict[str, object]] = {}
    for s in students:
        row = {"seed": s.seed, "run_dir": s.run_dir, **{f"{k}_top1": v for k, v in read_accuracies(s).items()},
               "cam_cosine": agreement[s.name]["cosine"], "cam_iou": agreement[s.name]["iou"],
               "perturbation_auc": perturbation[s.name]["auc"]}
        entry = methods.setdefault(s.method, {"label": METHODS[s.method], "config": config_name(s.method), "runs": []})
        entry["runs"].append(row)
    for entry in methods.values():
        for key in ("best_top1", "last_top1", "cam_cosine", "cam_iou", "perturbation_auc"):
            entry[key] = mean_std([r[key] for r in entry["runs"]])
    s0 = students[0].cfg
    return {
        "command": COMMAND,
        "setup": {
            "data": "scikit-learn digits, 32x32 RGB; test split 360 images",
            "teacher": f"{teacher.cfg.DISTILLER.STUDENT}, all training images, {teacher.cfg.SOLVER.EPOCHS} epochs",
            "student": s0.DISTILLER.STUDENT,
            "train_subset": s0.DATASET.TRAIN_SUBSET,
            "epochs": s0.SOLVER.EPOCHS,
            "steps": s0.SOLVER.EPOCHS * -(-s0.DATASET.TRAIN_SUBSET // s0.SOLVER.BATCH_SIZE),
            "seeds": sorted({s.seed for s in students}),
            "explanation_metrics": "CAM of the final (last-epoch) students; agreement: both models explain the "
                                   "teacher's predicted class; perturbation: positive test, the model's own top class",
        },
        "teacher": {"config": config_name(TEACHER), "run_dir": teacher.run_dir, **read_accuracies(teacher),
                    "perturbation_auc": perturbation[TEACHER]["auc"]},
        "methods": methods,
        "files": {name: os.path.join(out, name) for name in ("results.md", "results.json", "curves.png",
                                                               "heatmaps.png", "commands.sh")},
    }


def config_name(method: str) -> str:
    return os.path.relpath(os.path.join(CONFIG_DIR, f"{method}.yaml"), REPO)


def markdown(results: Dict[str, object]) -> str:
    setup, teacher = results["setup"], results["teacher"]

    def cell(stats: Dict[str, float], digits: int) -> str:
        text = f"{stats['mean']:.{digits}f}"
        return text + f" ± {stats['std']:.{digits}f}" if stats["n"] > 1 else text

    seeds = len(setup["seeds"])
    lines = [
        f"{setup['student']} students trained on {setup['train_subset']} digits images for {setup['epochs']} epochs "
        f"({setup['steps']} steps); teacher {setup['teacher']}. Top-1 on the 360-image test split, mean ± std over "
        f"{seeds} seed(s); explanation metrics on the last-epoch students.",
        "",
        "| method | config | best top-1 (%) | last top-1 (%) | CAM agreement with teacher: cosine | "
        "IoU of top 20 % | CAM perturbation AUC (lower: better maps) |",
        "|---|---|---|---|---|---|---|",
        f"| teacher {setup['teacher'].split(',')[0]} | `{teacher['config']}` | {teacher['best']:.2f} | "
        f"{teacher['last']:.2f} | 1 | 1 | {teacher['perturbation_auc']:.2f} |",
    ]
    for entry in results["methods"].values():
        lines.append(
            f"| {entry['label']} | `{entry['config']}` | {cell(entry['best_top1'], 2)} | {cell(entry['last_top1'], 2)} "
            f"| {cell(entry['cam_cosine'], 3)} | {cell(entry['cam_iou'], 3)} | {cell(entry['perturbation_auc'], 2)} |")
    lines += ["", f"Produced by `{COMMAND}` (tools/quickstart.py); every command it ran is in `commands.sh`.", ""]
    return "\n".join(lines)


def write_commands(path: str, steps: List[Step]) -> None:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# The commands tools/quickstart.py runs, in order (training runs of one line are "
                "independent once the teacher exists).\nset -e\n")
        for step in steps:
            f.write(shlex.join(["python3"] + [os.path.relpath(a, REPO) if a.startswith(REPO) else a
                                               for a in step.argv]) + "\n")


# ---------------------------------------------------------------------------------------------------- main


def clean(out: str) -> None:
    """Remove what this tool writes under `out` (and nothing else there)."""
    for name in OUTPUT_NAMES:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("output", "quickstart"), help="folder for runs and results")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=0, help="student epochs (0: the configs' 40); LR steps and "
                        "warm-ups scale with it")
    parser.add_argument("--teacher-epochs", type=int, default=0, help="teacher epochs (0: the config's 12)")
    parser.add_argument("--num-images", type=int, default=360, help="test images for the explanation metrics")
    parser.add_argument("--lrp", action="store_true", help="also Exp-KD with LRP maps (about 3x a CAM run)")
    parser.add_argument("--jobs", type=int, default=0, help="runs in parallel (0: one per CPU core, at most 4)")
    parser.add_argument("--fresh", action="store_true", help="delete previous runs and results under --out first")
    parser.add_argument("--smoke", action="store_true",
                        help=f"CI version: {SMOKE['seeds']} seed, {SMOKE['epochs']} student epochs, "
                             f"{SMOKE['teacher_epochs']} teacher epoch, {SMOKE['num_images']} evaluation images")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs = SMOKE["seeds"], SMOKE["epochs"]
        args.teacher_epochs, args.num_images = SMOKE["teacher_epochs"], SMOKE["num_images"]
    for key in ("seeds", "num_images"):
        if getattr(args, key) < 1:
            print(f"quickstart.py: error: --{key.replace('_', '-')} {getattr(args, key)}: expected at least 1",
                  file=sys.stderr)
            return 2
    start = time.monotonic()
    out = args.out
    if args.fresh:
        clean(out)
    for sub in ("configs", "logs"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)

    teacher = train_step(TEACHER, 0, out, args.teacher_epochs, "")
    methods = [m for m in METHODS if args.lrp or m not in OPTIONAL_METHODS]
    students = [train_step(m, seed, out, args.epochs, teacher.checkpoint("best"))
                for seed in range(args.seeds) for m in methods]
    runs = [teacher] + students
    for step in runs:
        with open(step.config_path, "w") as f:
            f.write(step.config_text)
    states = {step.name: train_state(step) for step in runs}
    for step in students:
        if distiller_class(step.cfg.DISTILLER.TYPE).needs_teacher:
            step.after = [teacher]
            if states[TEACHER] != "done" and states[step.name] != "new":
                states[step.name] = "stale"  # a new teacher: its students are retrained
    for step in runs:
        if states[step.name] == "stale":
            shutil.rmtree(step.run_dir)
        step.resume = states[step.name] == "partial"
    evals = {step.name: step for step in eval_steps(out, teacher, students, args.num_images)}
    write_commands(os.path.join(out, "commands.sh"), runs + list(evals.values()))

    to_train = [s for s in runs if states[s.name] != "done"]
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, 4))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"quickstart: {len(runs)} training runs ({len(runs) - len(to_train)} already done), then the evaluation; "
          f"{jobs} in parallel, {threads} thread(s) each; output in {out}", flush=True)
    progress = Progress(sum(s.epochs for s in to_train))
    runner = Runner(jobs, threads, progress)
    try:
        runner.run(runs + list(evals.values()),
                   skip=lambda s: states[s.name] == "done" if s.cfg is not None else eval_done(s))
    except StepError as error:
        progress.close()
        print(f"quickstart.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.close()
        print("quickstart.py: interrupted; run it again to continue where it stopped", file=sys.stderr)
        return 130
    progress.close()

    results = collect(out, teacher, students, evals)
    results["wall_seconds_this_invocation"] = round(time.monotonic() - start, 1)
    results["trained_this_invocation"] = [s.name for s in to_train]
    table = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n" + table)
    for name, path in results["files"].items():
        print(f"{name:>13}: {path}")
    print(f"{'eval details':>13}: {os.path.join(out, 'eval')} (JSON + PNG of tools/explain_eval.py)")
    print(f"done in {results['wall_seconds_this_invocation']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
