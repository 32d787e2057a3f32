"""Bad input and injected faults (fast cases): each bad input is one line naming the culprit with a non-zero exit
status; disk-full, unwritable output, SIGTERM/SIGINT, loader-worker crashes and a second run on the same directory
stop cleanly with the last good checkpoint intact. The SIGKILL campaign is in test_fault_injection.py."""
import errno
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine_train import ROOT, load_tool, one_thread, write_cfg  # noqa: F401  (autouse fixture)

from mdistiller.dataset import _common
from mdistiller.engine import checkpoint as checkpoint_module
from mdistiller.engine import trainer as trainer_module
from mdistiller.engine.lock import LOCK_NAME, RunLock
from mdistiller.models import cifar_model_dict

TRAIN = load_tool("train")
EVAL = load_tool("eval")


class CodePayload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint or data file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def model_file(path: Path, name: str = "resnet8", num_classes: int = 100, seed: int = 1) -> str:
    torch.manual_seed(seed)
    torch.save({"model": cifar_model_dict[name][0](num_classes=num_classes).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return model_file(tmp_path_factory.mktemp("teacher") / "resnet8.pth")


def train(tmp_path, data_root, teacher_path, kind="NONE", args=(), epochs=2, name="run"):
    """tools/train.py in-process on the 48-image, 3-step-per-epoch config of test_engine_train."""
    cfg = write_cfg(tmp_path, data_root, teacher_path, kind, tmp_path / name, epochs)
    opts = [arg for arg in args if not arg.startswith("--")]
    run = "run" + ",".join(f"{key}:{value}" for key, value in zip(opts[::2], opts[1::2]))  # upstream's run name
    return TRAIN.main(["--cfg", cfg] + list(args)), tmp_path / name / "p" / run


# ----------------------------------------------------------------------------------------------- bad input
def _truncated(tmp_path: Path, teacher: str) -> str:
    data = Path(teacher).read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _payload_ckpt(tmp_path: Path, teacher: str) -> str:
    path = tmp_path / "payload.pth"
    torch.save({"model": torch.load(teacher, weights_only=True)["model"], "x": CodePayload(tmp_path / "ran")}, path)
    return str(path)


CONFIG_CASES = {
    # name: (yaml text, overrides, exit status, expected text in the one line ({path}: the yaml file))
    "malformed yaml": ("SOLVER: [1, 2\n", [], 2, "{path}: malformed YAML at line"),
    "unknown key": ("SOLVER:\n  LRR: 0.1\n", [], 2,
                    "{path}: unknown key SOLVER.LRR (value 0.1); did you mean SOLVER.LR?"),
    "wrong type": ("SOLVER:\n  EPOCHS: ten\n", [], 2, "{path}: SOLVER.EPOCHS = 'ten' has type str; expected int"),
    "top level not a mapping": ("- a\n- b\n", [], 2, "{path}: top level is a list; expected a mapping"),
    "unknown model": ("", ["DISTILLER.STUDENT", "resnet9"], 2,
                      "DISTILLER.STUDENT = 'resnet9' is not in the cifar100 model registry"),
    "unknown distiller": ("", ["DISTILLER.TYPE", "KDD"], 2, "DISTILLER.TYPE = 'KDD' is not a registered distiller"),
    "unknown dataset": ("", ["DATASET.TYPE", "cifar1000"], 1, "DATASET.TYPE='cifar1000' is unknown"),
    "zero learning rate": ("", ["SOLVER.LR", "0.0"], 2, "SOLVER.LR = 0.0; expected a positive number"),
    "negative learning rate": ("", ["SOLVER.LR", "-0.1"], 2, "SOLVER.LR = -0.1; expected a positive number"),
    "zero epochs": ("", ["SOLVER.EPOCHS", "0"], 2, "SOLVER.EPOCHS = 0; expected a positive number"),
    "negative batch size": ("", ["SOLVER.BATCH_SIZE", "-4"], 2, "SOLVER.BATCH_SIZE = -4; expected a positive number"),
    "zero checkpoint frequency": ("", ["LOG.SAVE_CHECKPOINT_FREQ", "0"], 2,
                                  "LOG.SAVE_CHECKPOINT_FREQ = 0; expected a positive number"),
    "batch larger than the data": ("", ["SOLVER.BATCH_SIZE", "64"], 1,
                                   "SOLVER.BATCH_SIZE=64 is larger than the 48 training images"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_one_line_naming_the_culprit(case, tmp_path, cifar100_root, capsys):
    text, opts, status, expected = CONFIG_CASES[case]
    path = Path(write_cfg(tmp_path, cifar100_root, "", "NONE", tmp_path / "out"))  # a good config, plus overrides
    if text:  # or a broken file on its own
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    assert TRAIN.main(["--cfg", str(path)] + opts) == status
    err = one_line(capsys)
    assert err.startswith("train.py: error: ") and expected.format(path=path) in err
    assert not (tmp_path / "out" / "p" / "run" / "latest").exists()


CHECKPOINT_CASES = {
    # name: (teacher file maker, distiller, expected text ({ckpt}: the file))
    "missing teacher checkpoint": (lambda d, t: str(d / "nowhere.pth"), "KD",
                                   "teacher checkpoint not found: {ckpt} (DISTILLER.TEACHER = 'resnet8')"),
    "truncated checkpoint": (_truncated, "KD", "{ckpt}: not a readable PyTorch checkpoint (truncated or corrupt)"),
    "garbage checkpoint": (lambda d, t: (d / "garbage.pth").write_bytes(b"not a checkpoint" * 8) and
                           str(d / "garbage.pth"), "KD", "{ckpt}: not a readable PyTorch checkpoint"),
    "wrong-architecture checkpoint": (lambda d, t: model_file(d / "r20.pth", "resnet20"), "KD",
                                      "{ckpt}: does not match teacher resnet8 with 100 classes: "),
    "teacher/student class-count mismatch": (lambda d, t: model_file(d / "c10.pth", num_classes=10), "DKD",
                                             "{ckpt}: does not match teacher resnet8 with 100 classes: 2 shape "
                                             "mismatches (e.g. fc.weight [10, 64] vs [100, 64]"),
    "checkpoint with a pickled code payload": (_payload_ckpt, "KD", "{ckpt}: refused to load"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_teacher_checkpoint_is_one_line_naming_the_file(case, tmp_path, cifar100_root, teacher, capsys):
    make, kind, expected = CHECKPOINT_CASES[case]
    ckpt = make(tmp_path, teacher)
    status, run = train(tmp_path, cifar100_root, ckpt, kind)
    assert status == 1
    assert expected.format(ckpt=ckpt) in one_line(capsys)
    assert not (tmp_path / "ran").exists(), "the pickled payload was executed"
    assert not (run / "latest").exists()


def _cifar_copy(tmp_path: Path, cifar100_root: Path) -> Path:
    root = tmp_path / "data"
    (root / "cifar-100-python").mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (root / "cifar-100-python" / name).write_bytes((cifar100_root / "cifar-100-python" / name).read_bytes())
    return root


def test_missing_dataset_files(tmp_path, capsys):
    status, _ = train(tmp_path, tmp_path / "empty", "")
    assert status == 1
    err = one_line(capsys)
    assert f"CIFAR-100 folder {tmp_path / 'empty' / 'cifar-100-python'} does not exist" in err
    assert "set DATASET.DOWNLOAD True" in err


def test_malformed_dataset_file(tmp_path, cifar100_root, capsys):
    root = _cifar_copy(tmp_path, cifar100_root)
    train_file = root / "cifar-100-python" / "train"
    train_file.write_bytes(train_file.read_bytes()[:1000])
    assert train(tmp_path, root, "")[0] == 1
    assert f"{train_file} is not a valid CIFAR-100 pickle" in one_line(capsys)


def test_crafted_cifar_pickle_is_refused_without_running_code(tmp_path, cifar100_root, capsys):
    root = _cifar_copy(tmp_path, cifar100_root)
    meta = root / "cifar-100-python" / "meta"
    meta.write_bytes(pickle.dumps({"fine_label_names": [CodePayload(tmp_path / "ran")] * 100}, protocol=2))
    assert train(tmp_path, root, "")[0] == 1
    err = one_line(capsys)
    assert f"{meta} is not a valid CIFAR-100 pickle" in err and "refused, nothing was run" in err
    assert not (tmp_path / "ran").exists()


def test_expkd_topk_larger_than_the_classes(tmp_path, cifar100_root, teacher, capsys):
    status, _ = train(tmp_path, cifar100_root, teacher, "EXPKD", ["EXPKD.TOPK", "101"])
    assert status == 2  # a config error, like every other bad key or value
    assert "EXPKD.TOPK: 101, expected 0 (all classes) to 100" in one_line(capsys)


def test_resume_without_a_previous_run(tmp_path, cifar100_root, capsys):
    status, run = train(tmp_path, cifar100_root, "", args=["--resume"])
    assert status == 1
    assert f"--resume: no previous run to continue ({run / 'latest'} does not exist)" in one_line(capsys)


def test_missing_config_file(tmp_path, capsys):
    assert TRAIN.main(["--cfg", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read config file" in one_line(capsys)


def test_eval_checkpoint_of_a_different_model(tmp_path, cifar100_root, teacher, capsys):
    args = ["-m", "resnet20", "-c", teacher, "-bs", "50", "DATASET.ROOT", str(cifar100_root)]
    assert EVAL.main(args) == 1
    assert f"{teacher}: does not match model resnet20 with 100 classes" in one_line(capsys)


def test_debug_shows_the_traceback_instead(tmp_path, cifar100_root):
    command = [sys.executable, str(ROOT / "tools" / "train.py"), "--cfg",
               write_cfg(tmp_path, cifar100_root, "", "NONE", tmp_path / "o")]
    quiet = subprocess.run(command + ["SOLVER.LR", "0.0"], capture_output=True, text=True, timeout=300)
    loud = subprocess.run(command + ["--debug", "SOLVER.LR", "0.0"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == "train.py: error: SOLVER.LR = 0.0; expected a positive number"
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


# ----------------------------------------------------------------------------------------------- run lock
def test_second_run_on_the_same_directory_refuses(tmp_path, cifar100_root, capsys):
    run = tmp_path / "run" / "p" / "run"
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mdistiller.engine.lock import RunLock; "
         "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run / "config.yaml").write_text("first run's\n")
        status, _ = train(tmp_path, cifar100_root, "")
        err = one_line(capsys)
        assert status == 1
        assert f"output directory {run} is in use by another training run (PID {holder.pid} on " in err
        assert (run / "config.yaml").read_text() == "first run's\n", "the second run wrote into the first one's dir"
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file stays, but the kernel dropped the lock
    assert f"PID {holder.pid}" in (run / LOCK_NAME).read_text()
    assert train(tmp_path, cifar100_root, "")[0] == 0


def test_lock_is_released_after_a_run_and_blocks_while_held(tmp_path, cifar100_root, capsys):
    status, run = train(tmp_path, cifar100_root, "", epochs=1)
    assert status == 0
    lock = RunLock(str(run))  # the finished run released it
    try:
        assert train(tmp_path, cifar100_root, "", args=["--resume"], epochs=2)[0] == 1
        assert "is in use by another training run" in one_line(capsys)
    finally:
        lock.release()
    assert train(tmp_path, cifar100_root, "", args=["--resume"], epochs=2)[0] == 0


# ----------------------------------------------------------------------------------------------- write faults
class _Failing:
    """Stands in for a module inside `checkpoint.py` only (tensorboard's own fsync must keep working): `name`
    raises `error` once `armed()` is true; everything else is the real module's."""

    def __init__(self, module, name: str, error: OSError, armed):
        self.module, self.name, self.error, self.armed = module, name, error, armed

    def __getattr__(self, attr: str):
        real = getattr(self.module, attr)
        if attr != self.name:
            return real

        def failing(*args, **kwargs):
            if self.armed():
                raise self.error
            return real(*args, **kwargs)

        return failing


def _fail_at_epoch(monkeypatch, epoch: int, target: str, error: OSError):
    """Make `target` ("os.fsync" or "tempfile.mkstemp" as checkpoint.py calls it) raise from epoch `epoch` on."""
    module_name, attr = target.split(".")
    original_epoch = trainer_module.BaseTrainer.train_epoch
    state = {"epoch": 0}

    def train_epoch(self, current):
        state["epoch"] = current
        original_epoch(self, current)

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_epoch", train_epoch)
    stand_in = _Failing(getattr(checkpoint_module, module_name), attr, error, lambda: state["epoch"] >= epoch)
    monkeypatch.setattr(checkpoint_module, module_name, stand_in)


@pytest.mark.parametrize("target,error,reason", [
    ("os.fsync", OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ("tempfile.mkstemp", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
])
def test_disk_full_or_unwritable_keeps_the_previous_checkpoint(tmp_path, cifar100_root, monkeypatch, capsys,
                                                               target, error, reason):
    with monkeypatch.context() as patch:
        _fail_at_epoch(patch, 2, target, error)
        status, run = train(tmp_path, cifar100_root, "", args=["LOG.SAVE_CHECKPOINT_FREQ", "5"])
    assert status == 1
    latest = run / "latest"
    err = one_line(capsys)  # the first file of epoch 2 (best or student_latest) failed; `latest` is written last
    assert re.fullmatch(rf"train\.py: error: cannot write checkpoint {re.escape(str(run))}/(best|student_latest): "
                        rf"{reason} \(the previous file is unchanged\)", err), err
    assert torch.load(latest, weights_only=True)["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
    assert train(tmp_path, cifar100_root, "", args=["--resume", "LOG.SAVE_CHECKPOINT_FREQ", "5"])[0] == 0
    assert torch.load(latest, weights_only=True)["epoch"] == 2


def test_output_under_a_file_is_one_line(tmp_path, cifar100_root, capsys):
    (tmp_path / "blocker").write_text("")
    cfg = write_cfg(tmp_path, cifar100_root, "", "NONE", tmp_path / "blocker" / "out")
    assert TRAIN.main(["--cfg", cfg]) == 1
    assert str(tmp_path / "blocker") in one_line(capsys)


# ----------------------------------------------------------------------------------------------- signals
def _signal_at(monkeypatch, signum: int, epoch: int, step: int):
    """Deliver `signum` to this process during training step `step` of `epoch`."""
    original = trainer_module.BaseTrainer.train_iter

    def train_iter(self, data, current, meters):
        original(self, data, current, meters)
        if (current, meters.steps) == (epoch, step):
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_iter", train_iter)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_resume_matches_the_uninterrupted_run(tmp_path, cifar100_root, monkeypatch, capsys,
                                                                       signum):
    status, reference = train(tmp_path, cifar100_root, "", epochs=3, name="reference")
    assert status == 0
    capsys.readouterr()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with monkeypatch.context() as patch:
        _signal_at(patch, signum, epoch=2, step=2)
        status, run = train(tmp_path, cifar100_root, "", epochs=3)
    assert status == 128 + signum
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "the handlers were not restored"
    assert one_line(capsys) == (
        f"train.py: stopped by {signal.Signals(signum).name} at epoch 2 after 2 step(s); the partial epoch is "
        f"discarded; resume from {run / 'latest'} (epoch 1) with --resume")
    assert torch.load(run / "latest", weights_only=True)["epoch"] == 1
    assert train(tmp_path, cifar100_root, "", args=["--resume"], epochs=3)[0] == 0
    got, want = (torch.load(r / "latest", weights_only=True) for r in (run, reference))
    assert got["epoch"] == 3 and got["model"].keys() == want["model"].keys()
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def test_signal_before_the_first_checkpoint_says_there_is_none(tmp_path, cifar100_root, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signal_at(patch, signal.SIGTERM, epoch=1, step=1)
        status, run = train(tmp_path, cifar100_root, "")
    assert status == 143
    assert "no epoch had finished, so there is no checkpoint; start again without --resume" in one_line(capsys)
    assert not (run / "latest").exists()


# ----------------------------------------------------------------------------------------------- non-finite
def test_non_finite_gradient_at_the_last_step_stops_before_any_checkpoint(tmp_path, cifar100_root, monkeypatch,
                                                                          capsys):
    """The loss stays finite, only the gradient of one weight is NaN: the weights check at the epoch end stops."""
    original = trainer_module.BaseTrainer.train_iter

    def train_iter(self, data, epoch, meters):
        if (epoch, meters.steps) != (2, 2):
            return original(self, data, epoch, meters)
        weight = self.distiller.student.get_classifier().weight
        handle = weight.register_hook(lambda grad: grad * float("nan"))
        try:
            original(self, data, epoch, meters)
        finally:
            handle.remove()

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_iter", train_iter)
    status, run = train(tmp_path, cifar100_root, "")
    assert status == 1
    assert one_line(capsys) == (
        f"train.py: error: non-finite value at epoch 2, step 3: the gradient of 'student.fc.weight' was not finite; "
        f"stopping (last good checkpoint: {run / 'latest'} (epoch 1))")
    assert torch.load(run / "latest", weights_only=True)["epoch"] == 1
    assert not (run / "epoch_2").exists() and not (run / "student_2").exists()


def test_skip_nonfinite_skips_the_bad_step_and_finishes(tmp_path, cifar100_root, monkeypatch, capsys):
    """With SOLVER.SKIP_NONFINITE a NaN loss skips that step (weights untouched) instead of stopping the run."""
    original = trainer_module.BaseTrainer.train_iter
    seen = {}

    def train_iter(self, data, epoch, meters):
        if (epoch, meters.steps) != (2, 1) or seen:
            return original(self, data, epoch, meters)
        before = {k: v.detach().clone() for k, v in self.distiller.student.named_parameters()}
        real_forward = self.distiller.forward
        self.distiller.forward = lambda **kw: (lambda out: (out[0], {**out[1], "ce": out[1]["ce"] * float("nan")}))(
            real_forward(**kw))
        try:
            original(self, data, epoch, meters)
        finally:
            self.distiller.forward = real_forward
        after = dict(self.distiller.student.named_parameters())
        seen["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        seen["steps"] = meters.steps

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_iter", train_iter)
    status, run = train(tmp_path, cifar100_root, "", args=["SOLVER.SKIP_NONFINITE", "True"])
    assert status == 0
    assert seen == {"unchanged": True, "steps": 1}
    assert "skipped a step of epoch 2: non-finite loss (ce=nan)" in capsys.readouterr().out
    assert torch.load(run / "latest", weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------------------------- loader workers
def test_loader_worker_that_hangs_is_a_clear_error_not_a_stall(tmp_path, cifar100_root, monkeypatch, capsys):
    def getitem(self, index):
        if torch.utils.data.get_worker_info() is not None:
            time.sleep(3600)  # a read from a hung network file system looks like this
        raise AssertionError("items are read by the worker")

    monkeypatch.setattr(_common.ArrayImages, "__getitem__", getitem)
    monkeypatch.setattr(_common, "WORKER_TIMEOUT_S", 2)
    start = time.monotonic()
    status, run = train(tmp_path, cifar100_root, "", args=["DATASET.NUM_WORKERS", "1"])
    assert status == 1 and time.monotonic() - start < 60
    assert "DataLoader timed out after 2 seconds" in one_line(capsys)
    assert not (run / "latest").exists()


def test_loader_worker_crash_is_a_clear_error_not_a_hang(tmp_path, cifar100_root, monkeypatch, capsys):
    real = _common.ArrayImages.__getitem__

    def getitem(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(3)  # a worker killed by the OOM killer or a segfaulting decoder looks like this
        return real(self, index)

    monkeypatch.setattr(_common.ArrayImages, "__getitem__", getitem)
    start = time.monotonic()
    status, run = train(tmp_path, cifar100_root, "", args=["DATASET.NUM_WORKERS", "1"])
    assert status == 1 and time.monotonic() - start < 120
    err = one_line(capsys)
    assert "DataLoader worker (pid" in err and "exited unexpectedly" in err
    assert not (run / "latest").exists()


def test_loader_worker_exception_is_one_line_with_the_original_error(tmp_path, cifar100_root, monkeypatch, capsys):
    def getitem(self, index):
        raise _common.DatasetError(f"image {index}: cannot decode")

    monkeypatch.setattr(_common.ArrayImages, "__getitem__", getitem)
    assert train(tmp_path, cifar100_root, "", args=["DATASET.NUM_WORKERS", "1"])[0] == 1
    err = one_line(capsys)
    assert "Caught DatasetError in DataLoader worker process 0." in err and ": cannot decode" in err


def test_a_run_removes_temporaries_left_by_a_killed_writer(tmp_path, cifar100_root):
    status, run = train(tmp_path, cifar100_root, "", epochs=1)
    assert status == 0
    leftover = run / ".latest.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert train(tmp_path, cifar100_root, "", args=["--resume"], epochs=2)[0] == 0
    assert not leftover.exists()

