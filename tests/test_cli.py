"""tools/train.py and tools/eval.py: one-line errors (no traceback unless --debug) and checkpoint formats."""
import os
import subprocess
import sys

import pytest
import torch
from test_engine_train import ROOT, load_tool, one_thread  # noqa: F401  (autouse fixture)

from mdistiller.dataset import get_val_loader
from mdistiller.distillers import Vanilla
from mdistiller.engine.utils import validate
from mdistiller.errors import ConfigError
from mdistiller.models import cifar_model_dict

TRAIN = load_tool("train")
EVAL = load_tool("eval")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "text,opts,expected",
    [
        ("SOLVER:\n  LRR: 0.1\n", [], "unknown key SOLVER.LRR (value 0.1); did you mean SOLVER.LR?"),
        ("SOLVER:\n  EPOCHS: ten\n", [], "SOLVER.EPOCHS = 'ten' has type str; expected int (default 240)"),
        ("SOLVER: [1, 2\n", [], "malformed YAML at line"),
        ("", ["SOLVER.LR", "fast"], "command line: SOLVER.LR = 'fast' has type str; expected float (default 0.05)"),
        ("", ["DISTILLER.TYPE", "NOPE"], "DISTILLER.TYPE = 'NOPE' is not a registered distiller"),
        ("", ["SOLVER.TRAINER", "nope"], "SOLVER.TRAINER = 'nope' is not a registered trainer"),
        ("", ["DATASET.TYPE", "nope"], "DATASET.TYPE='nope' is unknown"),
    ],
)
def test_train_bad_input_is_one_line_with_status_2(tmp_path, capsys, text, opts, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    status = TRAIN.main(["--cfg", str(path), "LOG.PREFIX", str(tmp_path / "out")] + opts)
    err = _one_line_error(capsys)
    assert err.startswith("train.py: error: ") and expected in err
    assert status == (1 if "DATASET.TYPE" in expected else 2)
    if text:
        assert str(path) in err


def test_train_debug_shows_the_exception(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("SOLVER:\n  LRR: 0.1\n")
    with pytest.raises(ConfigError, match="SOLVER.LRR"):
        TRAIN.main(["--cfg", str(path), "--debug"])


def test_train_script_exits_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("DISTILLER:\n  TYPE: KD: x\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "tools" / "train.py"), "--cfg", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
    assert f"{path}: malformed YAML at line 2, column 11: mapping values are not allowed here" in result.stderr


@pytest.fixture(scope="module")
def student_model():
    torch.manual_seed(0)
    return cifar_model_dict["resnet8"][0](num_classes=100)


@pytest.mark.parametrize("fmt", ["bare", "student", "full"])
def test_eval_accepts_every_checkpoint_format(tmp_path, cifar100_root, student_model, capsys, fmt):
    state = student_model.state_dict()
    obj = {
        "bare": state,
        "student": {"model": state},
        "full": {"epoch": 1, "best_acc": 0.0, "model": {"module.student." + k: v for k, v in state.items()}},
    }[fmt]
    path = tmp_path / fmt
    torch.save(obj, path)
    status = EVAL.main(["-m", "resnet8", "-c", str(path), "-bs", "50", "DATASET.ROOT", str(cifar100_root)])
    assert status == 0
    loader, _ = get_val_loader("cifar100", str(cifar100_root), 50)
    top1, top5, loss = validate(loader, Vanilla(student_model))
    assert f"Top-1: {top1:.2f}| Top-5: {top5:.2f}| Loss: {loss:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,status,expected",
    [
        (["-m", "resnet8"], 2, "-m/--model 'resnet8' has no pretrained checkpoint in the cifar100 registry; pass -c"),
        (["-m", "resnet9", "-c", "x"], 2, "-m/--model = 'resnet9' is not in the cifar100 model registry"),
        (["-m", "resnet8", "-c", "/nowhere/student_best"], 1, "checkpoint not found: /nowhere/student_best"),
        (["-m", "resnet20", "-c", "{ckpt}"], 1, "{ckpt}: does not match model resnet20 with 100 classes"),
    ],
)
def test_eval_errors(tmp_path, cifar100_root, student_model, capsys, args, status, expected):
    ckpt = tmp_path / "student_best"
    torch.save({"model": student_model.state_dict()}, ckpt)
    args = [a.format(ckpt=ckpt) for a in args]
    assert EVAL.main(args + ["DATASET.ROOT", str(cifar100_root)]) == status
    err = _one_line_error(capsys)
    assert err.startswith("eval.py: error: ") and expected.format(ckpt=ckpt) in err
