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

Nothing is special-cased: the runs go through the sweep of tools/sweep.py (docs/studies.md), each a
`tools/train.py --cfg configs/digits/quickstart/<method>.yaml --run-dir <out>/runs/<run>` with its seed, teacher and
schedule as overrides; the evaluation is `tools/explain_eval.py` and `tools/visualize.py`. Every command is listed in
<out>/commands.sh; each run's output is its train.log, each evaluation's is under <out>/logs. A re-run skips finished
work (runs whose config and teacher file are unchanged; interrupted runs resume); --fresh starts over; --smoke is a
one-seed, two-epoch version of the same pipeline (CI).
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mdistiller.distillers import distiller_class
from mdistiller.engine.config import load_cfg
from mdistiller.engine.records import file_sha256, read_results
from mdistiller.errors import ConfigError
from mdistiller.launch.sweep import DONE, NEW, PlannedRun, planned_sha, run_state, run_sweep

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
OUTPUT_NAMES = ("runs", "logs", "eval", "results.md", "results.json", "curves.png", "heatmaps.png", "commands.sh")


class StepError(RuntimeError):
    """A command of the pipeline failed; the message names it and its log."""


@dataclass
class Run:
    """A training run of the pipeline: its method and seed, and the sweep's launch of it."""

    method: str
    seed: int
    planned: PlannedRun

    @property
    def name(self) -> str:
        return TEACHER if self.method == TEACHER else f"{self.method}_seed{self.seed}"

    @property
    def run_dir(self) -> str:
        return self.planned.run_dir

    @property
    def student(self) -> str:
        return self.cfg.DISTILLER.STUDENT

    @property
    def cfg(self):
        return load_cfg(self.planned.cfg, self.planned.overrides)

    def checkpoint(self, kind: str) -> str:
        return os.path.join(self.run_dir, f"student_{kind}")


@dataclass
class EvalStep:
    """An evaluation command: done when its outputs are newer than the runs it reads and were made by this very
    command (a stamp file beside its log)."""

    name: str
    argv: List[str]
    log: str
    outputs: Sequence[str]
    inputs: Sequence[str]


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


def plan_run(method: str, seed: int, out: str, epochs: int, teacher_ckpt: str) -> Run:
    """configs/digits/quickstart/<method>.yaml with the run's seed, teacher and schedule as overrides, trained in
    <out>/runs/<name>."""
    source = os.path.join(CONFIG_DIR, f"{method}.yaml")
    base = load_cfg(source)
    overrides: Dict[str, object] = {"EXPERIMENT.SEED": seed}
    if distiller_class(base.DISTILLER.TYPE).needs_teacher:
        overrides["DISTILLER.TEACHER_CKPT"] = teacher_ckpt
    if epochs and epochs != base.SOLVER.EPOCHS:
        overrides.update(schedule_overrides(base, epochs))
    name = TEACHER if method == TEACHER else f"{method}_seed{seed}"
    flat = tuple(str(item) for pair in overrides.items() for item in pair)
    return Run(method, seed, PlannedRun(source, flat, os.path.join(out, "runs", name)))


def train_states(teacher: Run, students: List[Run]) -> Dict[str, str]:
    """The sweep's state of every run (done, resume, new). A directory holding a run of another config, or a student
    distilled from another teacher file than the current one, is deleted and trained again."""
    states = {}
    for run in [teacher, *students]:
        try:
            states[run.name] = run_state(run.planned, planned_sha(run.planned))
        except ConfigError:
            shutil.rmtree(run.run_dir)
            states[run.name] = NEW
    teacher_sha = file_sha256(teacher.checkpoint("best")) if states[TEACHER] == DONE else None
    for run in students:
        results = read_results(run.run_dir)
        if results is not None and results.get("teacher_ckpt") and \
                (teacher_sha is None or results.get("teacher_ckpt_sha256") != teacher_sha):
            shutil.rmtree(run.run_dir)
            states[run.name] = NEW
    return states


def train(runs: List[Run], states: Dict[str, str], jobs: int) -> None:
    """The runs through the sweep (`jobs` at a time); a StepError naming the first failed run's log."""
    outcome = run_sweep([run.planned for run in runs], jobs=jobs,
                        states={run.planned: states[run.name] for run in runs}, stream=sys.stdout)
    if outcome.signum:
        raise KeyboardInterrupt
    if outcome.failed:
        planned, code, line = outcome.failed[0]
        raise StepError(f"{planned.run_dir} failed (exit status {code}); log: {planned.log}\n    {line}")


def eval_steps(out: str, teacher: Run, students: List[Run], num_images: int) -> List[EvalStep]:
    """Agreement, perturbation, heatmaps and curves: the evaluation tools' own command lines."""
    tools, eval_dir = os.path.join(REPO, "tools"), os.path.join(out, "eval")
    teacher_model, teacher_ckpt = teacher.student, teacher.checkpoint("best")
    data = ["-d", "digits", "--method", "cam", "-bs", str(min(num_images, 120)), "--num-images", str(num_images)]
    models = [arg for s in students for arg in ("-m", s.student, "-c", s.checkpoint("latest"))]
    labels = [s.name for s in students]

    def step(name: str, argv: List[str], outputs: List[str], reads: List[Run]) -> EvalStep:
        inputs = [path for s in reads for path in (s.checkpoint("latest"), os.path.join(s.run_dir, "worklog.txt"))]
        return EvalStep(name, argv, os.path.join(out, "logs", f"{name}.log"), outputs, inputs)

    first: Dict[str, Run] = {}
    for s in students:
        first.setdefault(s.method, s)
    grid = [teacher] + [first[m] for m in ("kd", "expkd_cam") if m in first]
    curves = [teacher] + list(first.values())
    return [
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
              *[arg for s in grid
                for arg in ("-m", s.student, "-c", s.checkpoint("best" if s is teacher else "latest"))],
              "--labels", *[grid_label(s) for s in grid], "-d", "digits", "--method", "cam", "--num-images", "8",
              "--out", os.path.join(out, "heatmaps.png")],
             [os.path.join(out, "heatmaps.png")], grid),
        step("curves",
             [os.path.join(tools, "visualize.py"), "curves", *[os.path.join(s.run_dir, "worklog.txt") for s in curves],
              "--labels", *[s.name for s in curves], "--metrics", "test_acc", "train_loss", "--out",
              os.path.join(out, "curves.png")],
             [os.path.join(out, "curves.png")], curves),
    ]


def grid_label(run: Run) -> str:
    return f"teacher {run.student}" if run.method == TEACHER else f"{METHODS[run.method]} {run.student}"


def eval_done(step: EvalStep) -> bool:
    """Outputs exist, are newer than the runs it reads, and were made by this very command."""
    stamp = step.log + ".cmd"
    if not all(os.path.isfile(p) for p in [stamp, *step.outputs]) or read_text(stamp) != " ".join(step.argv):
        return False
    oldest = min(os.path.getmtime(p) for p in step.outputs)
    return all(os.path.isfile(p) and os.path.getmtime(p) < oldest for p in step.inputs)


def run_eval(step: EvalStep) -> None:
    """The command with its output in its log; the stamp is written only after it succeeded."""
    stamp = step.log + ".cmd"
    if os.path.exists(stamp):
        os.remove(stamp)  # an interrupted evaluation must not look finished next time
    start = time.monotonic()
    with open(step.log, "a") as log:
        log.write("$ " + " ".join(step.argv) + "\n")
        log.flush()
        code = subprocess.run([sys.executable, *step.argv], stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        with open(step.log) as log:
            tail = [line.rstrip() for line in log if line.strip()][-3:]
        raise StepError(f"{step.name} failed (exit status {code}); log: {step.log}\n    " + "\n    ".join(tail))
    with open(stamp, "w") as f:
        f.write(" ".join(step.argv))
    print(f"  done   {step.name} in {time.monotonic() - start:.0f} s", flush=True)


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------- results


def read_accuracies(run: Run) -> Dict[str, float]:
    """Best and last test top-1 of a finished run, from its results.json."""
    results = read_results(run.run_dir) or {}
    if results.get("finished") is not True:
        raise StepError(f"{run.run_dir}/results.json: the run is not finished")
    return {"best": results["best_acc"], "last": results["last_acc"]}


def mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def collect(out: str, teacher: Run, students: List[Run], evals: Dict[str, EvalStep]) -> Dict[str, object]:
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
    t0 = teacher.cfg
    return {
        "command": COMMAND,
        "setup": {
            "data": "scikit-learn digits, 32x32 RGB; test split 360 images",
            "teacher": f"{t0.DISTILLER.STUDENT}, all training images, {t0.SOLVER.EPOCHS} epochs",
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


def write_commands(path: str, runs: List[Run], evals: List[EvalStep]) -> None:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# The commands tools/quickstart.py runs, in order (the students are independent once "
                "the teacher exists).\nset -e\n")
        for argv in [run.planned.command(resume=False)[1:] for run in runs] + [step.argv for step in evals]:
            f.write(shlex.join(["python3"] + [os.path.relpath(a, REPO) if a.startswith(REPO) else a
                                               for a in argv]) + "\n")


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
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    teacher = plan_run(TEACHER, 0, out, args.teacher_epochs, "")
    methods = [m for m in METHODS if args.lrp or m not in OPTIONAL_METHODS]
    students = [plan_run(m, seed, out, args.epochs, teacher.checkpoint("best"))
                for seed in range(args.seeds) for m in methods]
    runs = [teacher] + students
    states = train_states(teacher, students)
    evals = {step.name: step for step in eval_steps(out, teacher, students, args.num_images)}
    write_commands(os.path.join(out, "commands.sh"), runs, list(evals.values()))

    to_train = [run for run in runs if states[run.name] != DONE]
    jobs = args.jobs or max(1, min(os.cpu_count() or 1, 4))
    print(f"quickstart: {len(runs)} training runs ({len(runs) - len(to_train)} already done), then the evaluation; "
          f"{jobs} in parallel; output in {out}", flush=True)
    try:
        train([teacher], states, 1)
        train(students, states, jobs)
        for step in evals.values():
            if not eval_done(step):
                run_eval(step)
    except StepError as error:
        print(f"quickstart.py: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quickstart.py: interrupted; run it again to continue where it stopped", file=sys.stderr)
        return 130

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
