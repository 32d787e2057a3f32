"""SIGKILL campaign: a short seeded CPU run of tools/train.py is killed over and over, at random times and in the
middle of checkpoint writes; after every kill no checkpoint is truncated, `--resume` continues, and the final
weights equal those of an uninterrupted run. A SIGTERM stop is part of the chain.

Each process runs tools/train.py through a small launcher that (1) touches a "ready" file once the imports are
done, so that random kill times fall into the training itself rather than Python's start-up, and (2) makes
`torch.save` write half a file, fsync it, pause, then write the rest, so that checkpoint writes have a window a
random kill can hit; with FAULT_KILL_AT_WRITE=n the process SIGKILLs itself inside its n-th write.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine_train import ROOT

EPOCHS = 10
KILLS = 20
LAUNCHER = """
import io, os, runpy, signal, sys, time
import torch
import mdistiller.engine.trainer  # the expensive imports, before "ready"

real_save, writes = torch.save, [0]
kill_at = int(os.environ.get("FAULT_KILL_AT_WRITE", "0"))

def slow_save(obj, f, *args, **kwargs):
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    writes[0] += 1
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    if writes[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.03)
    f.write(data[len(data) // 2:])

torch.save = slow_save
open(os.environ["FAULT_READY_FILE"], "w").close()
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
CHECKPOINTS = ("latest", "best", "student_latest", "student_best") + tuple(
    f"{kind}_{epoch}" for kind in ("epoch", "student") for epoch in range(2, EPOCHS + 1, 2)
)


def write_config(directory: Path, data_root: Path, prefix: Path) -> Path:
    """Vanilla resnet8, 32 images in 2 steps of 16 per epoch, LR decay after epoch 5, epoch_N files every 2."""
    path = directory / f"{prefix.name}.yaml"
    path.write_text(
        f"""EXPERIMENT: {{NAME: run, PROJECT: p, SEED: 0}}
DATASET: {{ROOT: '{data_root}', NUM_WORKERS: 0, TRAIN_SUBSET: 32, TEST: {{BATCH_SIZE: 50}}}}
DISTILLER: {{TYPE: NONE, STUDENT: resnet8}}
SOLVER: {{BATCH_SIZE: 16, EPOCHS: {EPOCHS}, LR: 0.05, LR_DECAY_STAGES: [5], WEIGHT_DECAY: 0.0005}}
LOG: {{PREFIX: '{prefix}', SAVE_CHECKPOINT_FREQ: 2}}
"""
    )
    return path


class Runner:
    """Starts tools/train.py via the launcher; one thread per process so that runs are bit-reproducible."""

    def __init__(self, tmp_path: Path, config: Path, run_dir: Path):
        self.launcher = tmp_path / "launcher.py"
        self.launcher.write_text(LAUNCHER)
        self.ready = tmp_path / "ready"
        self.config, self.run_dir = config, run_dir

    def start(self, kill_at_write: int = 0) -> subprocess.Popen:
        self.ready.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", FAULT_READY_FILE=str(self.ready),
                   FAULT_KILL_AT_WRITE=str(kill_at_write), PYTHONPATH=str(ROOT))
        resume = ["--resume"] if (self.run_dir / "latest").exists() else []
        command = [sys.executable, str(self.launcher), str(ROOT / "tools" / "train.py"), "--cfg", str(self.config)]
        return subprocess.Popen(command + resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def wait_ready(self, process: subprocess.Popen, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert process.poll() is None, f"the launcher ended before training: {process.communicate()[1]}"
            assert time.monotonic() < deadline, "the launcher did not get ready"
            time.sleep(0.01)


def assert_no_truncated_checkpoint(run_dir: Path) -> None:
    for name in CHECKPOINTS:
        path = run_dir / name
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)  # raises on a truncated file
            assert "model" in state, f"{path} is not a checkpoint"


def resumable(runner: Runner) -> bool:
    return (runner.run_dir / "latest").exists()


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(tmp_path, cifar100_root):
    reference = Runner(tmp_path, write_config(tmp_path, cifar100_root, tmp_path / "reference"),
                       tmp_path / "reference" / "p" / "run")
    process = reference.start()
    reference.wait_ready(process)
    start = time.monotonic()
    assert process.wait(timeout=300) == 0, process.stderr.read()
    epoch_seconds = (time.monotonic() - start) / EPOCHS

    chain = tmp_path / "chain"
    runner = Runner(tmp_path, write_config(tmp_path, cifar100_root, chain), chain / "p" / "run")
    rng = random.Random(0)
    kills = mid_write = launches = 0
    while kills < KILLS:
        launches += 1
        assert launches <= 3 * KILLS, f"no progress after {launches} launches ({kills} kills)"
        done = torch.load(runner.run_dir / "latest", weights_only=True)["epoch"] if resumable(runner) else 0
        if kills % 2 == 0 or done >= EPOCHS - 2:  # it kills itself inside one of its first checkpoint writes
            # (near the end only inside the first write, which never completes an epoch: the run must not finish)
            process = runner.start(kill_at_write=rng.randint(1, 5) if done < EPOCHS - 2 else 1)
            runner.wait_ready(process)
            status = process.wait(timeout=300)
        else:  # killed from outside at a random time of its training
            process = runner.start()
            runner.wait_ready(process)
            try:
                status = process.wait(timeout=rng.uniform(0.0, 1.2 * epoch_seconds))
            except subprocess.TimeoutExpired:
                process.kill()
                status = process.wait()
        stderr = process.stderr.read()
        assert status in (-signal.SIGKILL, 0), f"status {status}: {stderr}"
        assert status != 0, "the run finished before all kills happened: raise EPOCHS"
        kills += 1
        mid_write += bool(list(runner.run_dir.glob(".*.tmp")))
        assert_no_truncated_checkpoint(runner.run_dir)

    # a SIGTERM once an epoch is done: clean stop, exit status 143, resumable
    process = runner.start()
    runner.wait_ready(process)
    done = torch.load(runner.run_dir / "latest", weights_only=True)["epoch"] if resumable(runner) else 0
    assert done < EPOCHS - 1, "too little left to interrupt: raise EPOCHS"
    while not (runner.run_dir / "latest").exists() or torch.load(
            runner.run_dir / "latest", weights_only=True)["epoch"] == done:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at epoch" in process.stderr.read()
    assert_no_truncated_checkpoint(runner.run_dir)

    process = runner.start()
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert mid_write >= KILLS // 2, f"only {mid_write} kills hit a checkpoint write"
    assert not list(runner.run_dir.glob(".*.tmp")), "temporaries of killed writers were left behind"
    for name in ("latest", "student_latest", "best", "student_best", f"epoch_{EPOCHS}"):
        got = torch.load(runner.run_dir / name, weights_only=True)
        want = torch.load(reference.run_dir / name, weights_only=True)
        assert same_tensors(got["model"], want["model"]), f"{name}: weights differ from the uninterrupted run"
        if "optimizer" in want:
            assert same_tensors(got["optimizer"], want["optimizer"]), f"{name}: optimizer state differs"
            assert (got["epoch"], got["best_acc"]) == (want["epoch"], want["best_acc"])
    assert torch.load(runner.run_dir / "latest", weights_only=True)["epoch"] == EPOCHS
