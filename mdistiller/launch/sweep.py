"""Many training runs from configs × grid values × seeds (docs/studies.md): each run is a `tools/train.py`
subprocess with a fixed run directory, so a rerun of the same sweep skips what is finished (same config_sha),
resumes what was interrupted (from `latest`) and refuses to mix a different experiment into a directory.

Runs go N at a time on this machine (`run_sweep`, one per GPU with devices) or through submitit to Slurm
(`submit_sweep`; the `cluster` extra). Either way the sweep ends with the summary table of its runs (summary.py).
"""
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from ..engine.config import load_cfg, safe_component
from ..engine.records import REPO, RESULTS_FILE, config_sha, read_results
from ..errors import ConfigError
from .build import check_names
from .summary import GROUP_KEYS, load_runs, render, summarize

TRAIN_SCRIPT = os.path.join(REPO, "tools", "train.py")
TRAIN_LOG = "train.log"
LATEST = "latest"
SEED_KEY = "EXPERIMENT.SEED"
DONE, RESUME, NEW = "done", "resume", "new"
POLL_S = 0.2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class PlannedRun:
    """One `tools/train.py` launch: a config, its overrides (KEY VALUE ..., the seed's included) and its directory."""

    cfg: str
    overrides: Tuple[str, ...]
    run_dir: str

    @property
    def log(self) -> str:
        return os.path.join(self.run_dir, TRAIN_LOG)

    def command(self, resume: bool) -> List[str]:
        return [sys.executable, TRAIN_SCRIPT, "--cfg", self.cfg, "--run-dir", self.run_dir] + \
            (["--resume"] if resume else []) + list(self.overrides)


# ------------------------------------------------------------------------------------------------------- planning


def split_values(text: str) -> List[str]:
    """"1,2" -> ["1", "2"]; commas inside brackets or quotes stay ("[30,35],[20]" -> ["[30,35]", "[20]"])."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """`KEY=v1,v2` items -> [(KEY, [v1, v2])], in the order given."""
    grid: List[Tuple[str, List[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        values = split_values(text)
        if not sep or not key or any(not value for value in values):
            raise ConfigError(f"--grid {item!r}: expected KEY=VALUE1,VALUE2,...")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice; list all its values in one KEY=v1,v2,...")
        grid.append((key, values))
    return grid


def plan_runs(cfgs: Sequence[str], seeds: Sequence[int], grid: Sequence[Tuple[str, List[str]]] = (),
              overrides: Sequence[str] = (), out: str = os.path.join("output", "sweep")) -> List[PlannedRun]:
    """Configs × grid (cartesian product) × seeds, in that nesting order. The run directory is
    <out>/<config stem>/<KEY=value,... of the grid, or "base">/seed<s>, each part one safe path component."""
    overrides = [str(item) for item in overrides]
    if len(overrides) % 2:
        raise ConfigError(f"command line: overrides must be KEY VALUE pairs; {overrides[-1]!r} has no value")
    keys = [key for key, _ in grid] + overrides[0::2]
    for key in set(keys):
        if key == SEED_KEY:
            raise ConfigError(f"{SEED_KEY} is set by --seeds, not by --grid or an override")
        if keys.count(key) > 1:
            raise ConfigError(f"{key} is both in --grid and in the overrides")
    runs: List[PlannedRun] = []
    where: Dict[str, str] = {}
    for cfg in cfgs:
        stem = safe_component(os.path.splitext(os.path.basename(cfg))[0])
        for combo in itertools.product(*[[(key, value) for value in values] for key, values in grid]):
            label = safe_component(",".join(f"{key}={value}" for key, value in combo)) if combo else "base"
            for seed in seeds:
                run_dir = os.path.join(out, stem, label, f"seed{seed}")
                if run_dir in where:
                    raise ConfigError(f"{cfg} and {where[run_dir]} give the same run directory {run_dir}; rename one "
                                      "config or list each seed once")
                where[run_dir] = cfg
                extra = [item for pair in combo for item in pair] + [SEED_KEY, str(seed)]
                runs.append(PlannedRun(cfg, tuple(overrides + extra), run_dir))
    return runs


def planned_sha(run: PlannedRun) -> str:
    """config_sha of the config the run will train, checked as tools/train.py checks it (ConfigError naming the
    config otherwise)."""
    try:
        cfg = load_cfg(run.cfg, run.overrides)
        check_names(cfg)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(run.cfg) else f"{run.cfg}: {message}") from None
    return config_sha(cfg)


def run_state(run: PlannedRun, sha: str) -> str:
    """DONE (finished, same config_sha), RESUME (`latest` exists) or NEW; a ConfigError when the directory holds a
    run of another config (finished or not): it is neither skipped nor overwritten."""
    results = read_results(run.run_dir)
    if results is not None and results.get("config_sha") != sha:
        what = "finished" if results.get("finished") else "started"
        raise ConfigError(f"{run.run_dir} holds a {what} run of another config (config_sha {results.get('config_sha')}"
                          f", planned {sha}); delete that directory or choose another --out")
    if results is not None and results.get("finished") is True:
        return DONE
    return RESUME if os.path.isfile(os.path.join(run.run_dir, LATEST)) else NEW


def plan_states(runs: Sequence[PlannedRun]) -> Dict[PlannedRun, str]:
    """Every run's state; validates every config and override first, so a bad one fails before anything runs."""
    shas: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], str] = {}
    states: Dict[PlannedRun, str] = {}
    for run in runs:
        pairs = tuple(pair for pair in zip(run.overrides[0::2], run.overrides[1::2]) if pair[0] != SEED_KEY)
        if (run.cfg, pairs) not in shas:  # config_sha does not depend on the seed
            shas[run.cfg, pairs] = planned_sha(run)
        states[run] = run_state(run, shas[run.cfg, pairs])
    return states


# ------------------------------------------------------------------------------------------------------- running


@dataclass
class SweepOutcome:
    """What happened to the runs of one sweep."""

    skipped: List[PlannedRun] = field(default_factory=list)
    finished: List[PlannedRun] = field(default_factory=list)
    failed: List[Tuple[PlannedRun, int, str]] = field(default_factory=list)  # (run, exit status, last log line)
    interrupted: List[PlannedRun] = field(default_factory=list)
    signum: Optional[int] = None

    @property
    def exit_code(self) -> int:
        """128 + N when stopped by signal N, 1 when a run failed, else 0."""
        return 128 + self.signum if self.signum else (1 if self.failed else 0)


def last_line(path: str) -> str:
    """The last non-empty line of a log (what a failed tools/train.py printed last: its one-line error)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 8192))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def child_env(threads: int, device: Optional[str] = None) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def spawn(run: PlannedRun, env: Dict[str, str]) -> subprocess.Popen:
    """Start tools/train.py for `run` (with --resume when `latest` exists) in its own process group, its output
    appended to <run dir>/train.log after a `$ command` line."""
    os.makedirs(run.run_dir, exist_ok=True)
    argv = run.command(resume=os.path.isfile(os.path.join(run.run_dir, LATEST)))
    with open(run.log, "a") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """One status line: rewritten in place on a terminal, printed again whenever it changes in a pipe."""

    def __init__(self, stream: IO[str], total: int, slots: int):
        self.stream, self.total, self.slots = stream, total, slots
        self.tty = stream.isatty()
        self.shown = ""
        self.durations: List[float] = []

    def update(self, done: int, running: int, failed: int, left: int) -> None:
        eta = clock(sum(self.durations) / len(self.durations) * (running + left) / self.slots) \
            if self.durations else "?"
        line = f"sweep: {done}/{self.total} done, {running} running, {failed} failed, {left} left, ETA {eta}"
        if line == self.shown:
            return
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, len(self.shown) - len(line)))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = line

    def message(self, text: str) -> None:
        """A line of its own, above the status line."""
        if self.tty and self.shown:
            self.stream.write("\r" + " " * len(self.shown) + "\r")
            self.shown = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


class StopSignals:
    """Counts SIGINT/SIGTERM instead of dying and calls `forward` at once: the sweep passes each signal on to its
    children (a second one makes tools/train.py stop at once instead of at the next step boundary)."""

    def __init__(self, forward: Callable[[], None] = lambda: None):
        self.signum: Optional[int] = None
        self.count = 0
        self.forward = forward
        self.previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        self.count += 1
        self.forward()

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_sweep(runs: Sequence[PlannedRun], jobs: int = 1, devices: Optional[Sequence[str]] = None,
              states: Optional[Dict[PlannedRun, str]] = None, stream: IO[str] = sys.stderr) -> SweepOutcome:
    """Train every run that is not finished, `jobs` at a time (with `devices`: one at a time per listed GPU, through
    CUDA_VISIBLE_DEVICES), sharing the CPU cores out (OMP_NUM_THREADS). A failed run does not stop the others;
    SIGINT/SIGTERM is forwarded to every child, which keeps its `latest`, and the sweep returns once they ended."""
    states = plan_states(runs) if states is None else states
    slots: List[Optional[str]] = list(devices) if devices else [None] * max(1, jobs)
    threads = max(1, cores() // len(slots))
    outcome = SweepOutcome(skipped=[run for run in runs if states[run] == DONE])
    pending: Deque[PlannedRun] = deque(run for run in runs if states[run] != DONE)
    running: Dict[subprocess.Popen, Tuple[PlannedRun, Optional[str], float]] = {}
    sent: Dict[subprocess.Popen, int] = {}
    progress = Progress(stream, len(runs), len(slots))

    def forward() -> None:  # from the signal handler, and in the loop for a child started just before the signal
        for proc in list(running):
            while sent.get(proc, 0) < stop.count:
                sent[proc] = sent.get(proc, 0) + 1
                _signal_group(proc, signal.SIGTERM)

    def forward_unsignalled() -> None:  # the handler must not interrupt the loop's count and send one twice
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            forward()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    with StopSignals(forward) as stop:
        try:
            while running or (pending and stop.signum is None):
                while pending and slots and stop.signum is None:
                    run, slot = pending.popleft(), slots.pop(0)
                    running[spawn(run, child_env(threads, slot))] = (run, slot, time.monotonic())
                forward_unsignalled()
                progress.update(len(outcome.skipped) + len(outcome.finished), len(running), len(outcome.failed),
                                len(pending) + len(outcome.interrupted))
                time.sleep(POLL_S)
                for proc in [proc for proc in running if proc.poll() is not None]:
                    run, slot, started = running.pop(proc)
                    slots.append(slot)
                    code = proc.returncode
                    if code == 0 or (read_results(run.run_dir) or {}).get("finished") is True:  # signalled at exit
                        outcome.finished.append(run)
                        progress.durations.append(time.monotonic() - started)
                    elif stop.signum is not None:
                        outcome.interrupted.append(run)
                    else:
                        outcome.failed.append((run, code, last_line(run.log)))
                        progress.message(f"failed: {run.run_dir} (exit status {code}): {last_line(run.log)}")
        finally:
            for proc in running:  # only on an error of the sweep itself: leave no child behind
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            progress.update(len(outcome.skipped) + len(outcome.finished), 0, len(outcome.failed),
                            len(pending) + len(outcome.interrupted))
            progress.close()
    outcome.signum = stop.signum
    return outcome


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------------- slurm


def _train_job(run: PlannedRun) -> Any:
    """A submitit Checkpointable that trains `run`; requeued after a preemption or time-out, it resumes from
    `latest` (the child is asked to stop at a step boundary first)."""
    import submitit

    class TrainJob(submitit.helpers.Checkpointable):
        def __init__(self, run: PlannedRun):
            self.run = run
            self.proc: Optional[subprocess.Popen] = None

        def __getstate__(self) -> Dict[str, Any]:
            return {"run": self.run, "proc": None}

        def __call__(self) -> int:
            self.proc = spawn(self.run, child_env(cores()))
            return self.proc.wait()

        def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
            if self.proc is not None and self.proc.poll() is None:
                _signal_group(self.proc, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            return submitit.helpers.DelayedSubmission(TrainJob(self.run))

    return TrainJob(run)


def submit_sweep(runs: Sequence[PlannedRun], folder: str, parameters: Dict[str, Any], cluster: Optional[str] = None,
                 states: Optional[Dict[PlannedRun, str]] = None, stream: IO[str] = sys.stderr) -> SweepOutcome:
    """Submit every unfinished run as one job of a submitit job array (AutoExecutor, logs under `folder`/%j) and
    wait for them. `cluster` None: detected (Slurm); "local": local processes (tests). Ctrl-C stops the waiting
    only: submitted jobs go on, and a rerun collects them."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install 'mdistiller[cluster]'") from None
    states = plan_states(runs) if states is None else states
    outcome = SweepOutcome(skipped=[run for run in runs if states[run] == DONE])
    todo = [run for run in runs if states[run] != DONE]
    if not todo:
        return outcome
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster)
    executor.update_parameters(name="mdistiller-sweep", **{k: v for k, v in parameters.items() if v is not None})
    with executor.batch():
        jobs = [executor.submit(_train_job(run)) for run in todo]
    progress = Progress(stream, len(runs), len(todo))
    waiting = dict(zip(jobs, todo))
    with StopSignals() as stop:
        while waiting and stop.signum is None:
            for job in [job for job in waiting if job.done()]:
                run = waiting.pop(job)
                try:
                    code = job.result()
                except Exception as error:  # the job itself failed (node failure, cancelled): submitit's message
                    code, line = 1, " ".join(str(error).split())[-300:]
                else:
                    line = last_line(run.log)
                if code == 0:
                    outcome.finished.append(run)
                else:
                    outcome.failed.append((run, code, line))
                    progress.message(f"failed: {run.run_dir} (job {job.job_id}, exit status {code}): {line}")
            progress.update(len(outcome.skipped) + len(outcome.finished), len(waiting), len(outcome.failed), 0)
            if waiting:
                time.sleep(1.0)
    progress.close()
    outcome.interrupted = list(waiting.values())
    outcome.signum = stop.signum
    if waiting:
        progress.message("jobs still submitted: " + " ".join(str(job.job_id) for job in waiting))
    return outcome


# ------------------------------------------------------------------------------------------------------- the tool


def summary_table(runs: Sequence[PlannedRun], grid_keys: Sequence[str] = ()) -> str:
    """summary.py's markdown table of the runs that have a results.json ("" when none has), grouped by the default
    keys and the grid's (so each grid value has a labelled row)."""
    dirs = [run.run_dir for run in runs if os.path.isfile(os.path.join(run.run_dir, RESULTS_FILE))]
    return render(summarize(load_runs(dirs), (*GROUP_KEYS, *grid_keys))) if dirs else ""


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def state_counts(states: Dict[PlannedRun, str]) -> str:
    counts = {state: sum(value == state for value in states.values()) for state in (DONE, RESUME, NEW)}
    return f"{counts[DONE]} done, {counts[RESUME]} to resume, {counts[NEW]} new"


def describe(runs: Sequence[PlannedRun], states: Dict[PlannedRun, str]) -> str:
    """--dry-run: one line per run with its state, directory and overrides."""
    lines = [f"{plural(len(runs), 'run')}: {state_counts(states)}"]
    for run in runs:
        lines.append(f"{states[run]:<7}{run.run_dir}  <- {run.cfg} {shlex.join(run.overrides)}")
    return "\n".join(lines) + "\n"


OVERRIDE_KEY = re.compile(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+")


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(options, overrides): the overrides start at `--` or at the first all-caps dotted KEY (SOLVER.LR)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return list(argv[:i]), list(argv[i + 1:])
        if OVERRIDE_KEY.fullmatch(arg):
            return list(argv[:i]), list(argv[i:])
    return list(argv), []


def sweep(cfgs: Sequence[str], seeds: Sequence[int], grid: Sequence[str], overrides: Sequence[str], out: str,
          jobs: int = 1, devices: Optional[Sequence[str]] = None, dry_run: bool = False, launcher: str = "local",
          slurm: Optional[Dict[str, Any]] = None, cluster: Optional[str] = None) -> int:
    """What tools/sweep.py does; returns its exit status (0, 1 when a run failed, 128 + N when stopped by signal
    N). Bad configs, overrides or run directories raise ConfigError before anything runs."""
    if jobs < 1 and not devices:
        raise ConfigError(f"--jobs {jobs}: expected at least 1")
    grid_values = parse_grid(grid)
    runs = plan_runs(cfgs, seeds, grid_values, overrides, out)
    states = plan_states(runs)
    if dry_run:
        sys.stdout.write(describe(runs, states))
        return 0
    print(f"sweep: {plural(len(runs), 'run')} under {out}: {state_counts(states)}", file=sys.stderr, flush=True)
    if launcher == "slurm":
        outcome = submit_sweep(runs, os.path.join(out, ".submitit"), slurm or {}, cluster, states)
    else:
        outcome = run_sweep(runs, jobs, devices, states)
    if outcome.signum:
        print(f"sweep: stopped by {signal.Signals(outcome.signum).name}; {len(outcome.interrupted)} interrupted "
              "run(s) keep their `latest`: run the same command again to continue", file=sys.stderr)
        return outcome.exit_code
    for run, code, line in outcome.failed:
        print(f"sweep: failed: {run.run_dir} (exit status {code}; log {run.log}): {line}", file=sys.stderr)
    sys.stdout.write(summary_table(runs, [key for key, _ in grid_values]))
    return outcome.exit_code
