"""Checkpoint files: atomic writes, weights-only loads, one-line errors naming the file and the problem."""
import os
import pickle

import pytest
import torch
import torch.nn as nn

from mdistiller.engine import checkpoint as ckpt
from mdistiller.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    model_state_dict,
    save_checkpoint,
)


def test_round_trip(tmp_path):
    path = str(tmp_path / "latest")
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "best_acc": 12.5, "rng": (3, (1, 2), None)}
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["best_acc"] == 12.5 and loaded["rng"] == (3, (1, 2), None)
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["latest"]  # no temporary file left behind


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "latest")
    save_checkpoint({"epoch": 1}, path)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["latest"]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {path}"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "student_best"
    save_checkpoint({"model": {"w": torch.randn(64, 64)}}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    assert str(path) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert "\n" not in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil"
    with open(path, "wb") as f:
        torch.save({"model": {}, "payload": _Evil()}, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    assert "refused" in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_garbage_file(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(pickle.dumps([1, 2, 3])[:5] + b"\x00garbage")
    with pytest.raises(CheckpointError, match="garbage: not a readable PyTorch checkpoint"):
        load_checkpoint(str(path))


def test_model_state_dict_accepts_every_format():
    net = nn.Linear(3, 2)
    bare = net.state_dict()
    distiller_state = {"module.student." + k: v for k, v in bare.items()} | {"module.teacher.weight": torch.zeros(1)}
    full = {"epoch": 1, "model": distiller_state}
    for obj in ({"model": bare}, bare, full, {"model": {"module." + k: v for k, v in bare.items()}}):
        state = model_state_dict(obj, "f")
        assert set(state) == {"weight", "bias"}
    with pytest.raises(CheckpointError, match="f: expected a state dict"):
        model_state_dict({"epoch": 3}, "f")


def test_load_weights_names_file_and_mismatches():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 4))
    state = {"0.weight": torch.zeros(2, 3), "1.weight": torch.zeros(5, 2), "1.bias": torch.zeros(4)}
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights(net, state, "ckpt/teacher.pth", "teacher resnet8")
    message = str(info.value)
    assert message.startswith("ckpt/teacher.pth: does not match teacher resnet8")
    assert "1 missing keys (e.g. 0.bias)" in message
    assert "1 unexpected keys (e.g. extra)" in message
    assert "1.weight [5, 2] vs [4, 2]" in message
    good = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    load_weights(net, good, "x", "net")
    assert torch.all(net[1].weight == 0.5)


def test_legacy_format_teacher_files_load(tmp_path):
    """The released CIFAR teachers (RepDistiller, 2019) use torch's pre-zip format and carry optimizer state."""
    net = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    obj = {"epoch": 240, "model": net.state_dict(), "accuracy": torch.tensor(79.42)}
    obj["optimizer"] = optimizer.state_dict()
    path = tmp_path / "ckpt_epoch_240.pth"
    with open(path, "wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=False)
    state = model_state_dict(load_checkpoint(str(path)), str(path))
    fresh = nn.Linear(3, 2)
    load_weights(fresh, state, str(path), "teacher")
    assert torch.equal(fresh.weight, net.weight)


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    ckpt.atomic_write(str(tmp_path / "atomic"), lambda f: f.write(b"x"))
    (tmp_path / "plain").write_bytes(b"x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode
