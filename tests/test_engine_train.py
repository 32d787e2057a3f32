"""End-to-end CPU runs of tools/train.py on generated CIFAR-100 data: files, formats, resume, NaN stop, eval."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from mdistiller.engine import trainer as trainer_module
from mdistiller.engine.config import load_cfg
from mdistiller.launch.build import load_teacher
from mdistiller.models import cifar_model_dict

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = load_tool("train")
EVAL = load_tool("eval")
FILES = {"latest", "best", "epoch_2", "student_latest", "student_best", "student_2"} | {
    "worklog.txt", "config.yaml", "train.events"
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> str:
    """A resnet8 teacher file in the {"model": state_dict} format of the released teachers."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "ckpt_epoch_240.pth"
    torch.save({"model": cifar_model_dict["resnet8"][0](num_classes=100).state_dict()}, path)
    return str(path)


def write_cfg(directory: Path, data_root, teacher: str, kind: str, prefix: Path, epochs: int = 2) -> str:
    """48 training images in 3 steps of 16, 100 validation images; LR decays after epoch 1; DKD ramps over 2 epochs."""
    path = directory / f"{kind}_{prefix.name}_{epochs}.yaml"
    path.write_text(
        f"""EXPERIMENT: {{NAME: run, PROJECT: p, SEED: 0}}
DATASET: {{ROOT: '{data_root}', NUM_WORKERS: 0, TRAIN_SUBSET: 48, TEST: {{BATCH_SIZE: 50}}}}
DISTILLER: {{TYPE: {kind}, TEACHER: resnet8, STUDENT: resnet8, TEACHER_CKPT: '{teacher}'}}
SOLVER: {{BATCH_SIZE: 16, EPOCHS: {epochs}, LR: 0.05, LR_DECAY_STAGES: [1], WEIGHT_DECAY: 0.0005}}
LOG: {{PREFIX: '{prefix}', SAVE_CHECKPOINT_FREQ: 2}}
DKD: {{WARMUP: 2}}
"""
    )
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar100_root, teacher_file):
    """One finished 2-epoch run per method: {kind: run directory}."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("NONE", "KD", "DKD"):
        prefix = base / kind
        assert TRAIN.main(["--cfg", write_cfg(base, cifar100_root, teacher_file, kind, prefix)]) == 0
        out[kind] = prefix / "p" / "run"
    return out


def read_worklog(path: Path):
    blocks, tail = [], []
    for line in path.read_text().splitlines():
        if line.startswith("epoch: "):
            blocks.append({})
        elif line.startswith(("best_acc", "last_acc")):
            tail.append(line)
        elif ": " in line:
            key, value = line.split(": ")
            blocks[-1][key] = float(value)
    return blocks, tail


@pytest.mark.parametrize("kind", ["NONE", "KD", "DKD"])
def test_two_epoch_run_writes_every_file_in_upstream_formats(runs, kind):
    run = runs[kind]
    assert FILES <= set(os.listdir(run))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "train.events"))
    full = torch.load(run / "latest", weights_only=True)
    assert {"epoch", "model", "optimizer", "best_acc", "rng_state"} <= set(full) and full["epoch"] == 2
    assert all(key.startswith("module.") for key in full["model"])
    assert ("module.teacher.conv1.weight" in full["model"]) == (kind != "NONE")
    student = torch.load(run / "student_latest", weights_only=True)
    assert set(student) == {"model"}
    for name in ("student_latest", "student_best", "student_2"):  # strict: bare keys of a registry model
        model = cifar_model_dict["resnet8"][0](num_classes=100)
        model.load_state_dict(torch.load(run / name, weights_only=True)["model"])
    for key, value in student["model"].items():
        assert torch.equal(value, full["model"]["module.student." + key])
    blocks, tail = read_worklog(run / "worklog.txt")
    assert [block["epoch"] if "epoch" in block else None for block in blocks] == [None, None]  # epoch lines are headers
    assert [block["lr"] for block in blocks] == [0.05, 0.01]  # 0.005 printed with 2 decimals, as upstream
    assert set(blocks[0]) == {"lr", "train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss"}
    best = max(block["test_acc"] for block in blocks)
    assert tail == [f"last_acc\t{blocks[-1]['test_acc']:.2f}", f"best_acc\t{best:.2f}"]
    assert abs(full["best_acc"] - best) < 0.006
    assert load_cfg(str(run / "config.yaml")).DISTILLER.TYPE == kind


def test_student_best_is_a_teacher_and_evaluates_to_the_logged_accuracy(runs, cifar100_root, capsys):
    run = runs["KD"]
    best = torch.load(run / "best", weights_only=True)
    cfg = load_cfg(None, ["DISTILLER.TEACHER", "resnet8", "DISTILLER.TEACHER_CKPT", str(run / "student_best")])
    teacher = load_teacher(cfg, num_classes=100)
    assert torch.equal(teacher.fc.weight, best["model"]["module.student.fc.weight"])
    for ckpt in ("best", "student_best"):
        top1, _, _ = EVAL.evaluate("resnet8", str(run / ckpt), "cifar100", 50, ["DATASET.ROOT", str(cifar100_root)])
        assert top1 == pytest.approx(best["best_acc"], abs=1e-6)
    assert "Top-1:" in capsys.readouterr().out


def _interrupt_at(epoch_to_stop, monkeypatch):
    original = trainer_module.BaseTrainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(trainer_module.BaseTrainer, "train_epoch", train_epoch)


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_kill_gives_the_uninterrupted_weights(runs, tmp_path, cifar100_root, teacher_file, monkeypatch):
    reference = torch.load(runs["DKD"] / "latest", weights_only=True)

    def interrupted_then_resumed(prefix: Path):
        cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "DKD", prefix)
        with monkeypatch.context() as patch:
            _interrupt_at(2, patch)
            assert TRAIN.main(["--cfg", cfg]) == 130
        assert torch.load(prefix / "p" / "run" / "latest", weights_only=True)["epoch"] == 1
        assert TRAIN.main(["--cfg", cfg, "--resume"]) == 0
        return torch.load(prefix / "p" / "run" / "latest", weights_only=True)

    resumed = interrupted_then_resumed(tmp_path / "resumed")
    assert resumed["epoch"] == 2
    assert _same_state(resumed["model"], reference["model"])
    assert resumed["best_acc"] == reference["best_acc"]
    momentum = [s["momentum_buffer"] for s in resumed["optimizer"]["state"].values()]
    expected = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected))
    blocks, _ = read_worklog(tmp_path / "resumed" / "p" / "run" / "worklog.txt")
    reference_blocks, _ = read_worklog(runs["DKD"] / "worklog.txt")
    assert blocks == reference_blocks

    # control: the same resume without restoring the RNG states draws other batches and ends elsewhere
    monkeypatch.setattr(trainer_module, "restore_rng_state", lambda state, loader=None: None)
    unrestored = interrupted_then_resumed(tmp_path / "unrestored")
    assert not _same_state(unrestored["model"], reference["model"])


def test_non_finite_loss_stops_with_epoch_step_and_term(tmp_path, cifar100_root, teacher_file, monkeypatch, capsys):
    dkd_module = importlib.import_module("mdistiller.distillers.DKD")  # the module, not the class it exports
    calls = {"n": 0}
    real = dkd_module.dkd_loss

    def dkd_loss(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value  # epoch 2, step 2

    monkeypatch.setattr(dkd_module, "dkd_loss", dkd_loss)
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "DKD", tmp_path / "nan")
    assert TRAIN.main(["--cfg", cfg]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "epoch 2, step 2: loss term 'loss_kd' is nan" in err
    run = tmp_path / "nan" / "p" / "run"
    assert f"last good checkpoint: {run / 'latest'} (epoch 1)" in err
    assert torch.load(run / "latest", weights_only=True)["epoch"] == 1
    assert not (run / "epoch_2").exists()
    assert len(read_worklog(run / "worklog.txt")[0]) == 1


def test_missing_teacher_checkpoint_is_one_line_with_expected_path(tmp_path, cifar100_root, capsys):
    cfg = write_cfg(tmp_path, cifar100_root, "", "KD", tmp_path / "noteacher")
    assert TRAIN.main(["--cfg", cfg, "DISTILLER.TEACHER", "resnet56"]) == 1
    err = capsys.readouterr().err.strip()
    expected = cifar_model_dict["resnet56"][1]
    assert len(err.splitlines()) == 1
    assert f"teacher checkpoint not found: {expected}" in err and "download_ckpts/README.md" in err


def test_teacher_checkpoint_of_the_wrong_model_is_a_clear_mismatch(tmp_path, cifar100_root, teacher_file, capsys):
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "wrong")
    assert TRAIN.main(["--cfg", cfg, "DISTILLER.TEACHER", "resnet20"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train.py: error: {teacher_file}: does not match teacher resnet20 with 100 classes")
    assert "missing keys" in err


@pytest.fixture
def tensorboard_scalars(monkeypatch) -> list:
    """(tag, step, value) of every scalar the trainer sends to TensorBoard."""
    scalars = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step, value))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "SummaryWriter", Recorder)
    return scalars


def test_tensorboard_gets_each_loss_term_and_the_lr_every_freq_steps(tmp_path, cifar100_root, teacher_file,
                                                                     tensorboard_scalars):
    scalars = tensorboard_scalars
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "tb")
    assert TRAIN.main(["--cfg", cfg, "LOG.TENSORBOARD_FREQ", "2"]) == 0
    per_step = [(tag, step) for tag, step, _ in scalars if tag.startswith("train_step/")]
    assert per_step == [(f"train_step/{name}", step) for step in (2, 4, 6) for name in ("loss_ce", "loss_kd", "lr")]
    lrs = {step: value for tag, step, value in scalars if tag == "train_step/lr"}
    assert lrs == {2: 0.05, 4: pytest.approx(0.005), 6: pytest.approx(0.005)}  # LR_DECAY_STAGES [1]
    assert all(value > 0 for tag, _, value in scalars if tag == "train_step/loss_kd")
    scalars.clear()
    assert TRAIN.main(["--cfg", cfg, "LOG.TENSORBOARD_FREQ", "0", "LOG.PREFIX", str(tmp_path / "off")]) == 0
    assert not [tag for tag, _, _ in scalars if tag.startswith("train_step/")]
