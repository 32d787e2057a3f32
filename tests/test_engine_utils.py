"""LR schedule (upstream values), accuracy, validation, device-side meters with NaN detection, RNG capture."""
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from mdistiller.distillers import Vanilla
from mdistiller.engine.checkpoint import load_checkpoint, save_checkpoint
from mdistiller.engine.config import load_cfg
from mdistiller.engine.rng import capture_rng_state, restore_rng_state, seed_everything
from mdistiller.engine.trainer import NonFiniteLossError, TrainMeters
from mdistiller.engine.utils import AverageMeter, accuracy, adjust_learning_rate, validate


def _sgd(lr=0.05):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(
    "epoch,expected", [(1, 0.05), (150, 0.05), (151, 0.005), (180, 0.005), (181, 5e-4), (211, 5e-5), (240, 5e-5)]
)
def test_lr_schedule_matches_upstream(epoch, expected):
    cfg = load_cfg(None)
    optimizer = _sgd(lr=0.123)
    lr = adjust_learning_rate(epoch, cfg, optimizer)
    assert lr == pytest.approx(expected, rel=1e-12)
    # upstream leaves the groups untouched before the first decay
    assert optimizer.param_groups[0]["lr"] == (0.123 if epoch <= 150 else pytest.approx(expected, rel=1e-12))


def test_accuracy_top1_top5():
    output = torch.tensor(
        [[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]]
    )
    target = torch.tensor([1, 1, 1])  # row 2: target outside its top-5; row 3: inside top-5 only
    top1, top5 = accuracy(output, target, topk=(1, 5))
    assert top1.item() == pytest.approx(100 / 3) and top5.item() == pytest.approx(200 / 3)


def test_average_meter_weights_by_count():
    meter = AverageMeter()
    meter.update(1.0, 3)
    meter.update(3.0, 1)
    assert meter.avg == pytest.approx(1.5) and meter.count == 4


def test_validate_matches_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = model

        def forward(self, x):
            return self.fc(x), {}

    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    top1, top5, loss = validate(loader, Vanilla(Model()))
    logits = model(x)
    assert top1 == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert top5 == pytest.approx(100.0)
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)


def test_meters_average_and_report_first_non_finite_term():
    meters = TrainMeters(torch.device("cpu"))
    preds, target = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    meters.update(preds, target, torch.tensor(1.0), {"loss_ce": torch.tensor(0.5), "loss_kd": torch.tensor(0.5)})
    meters.update(preds, target, torch.tensor(3.0), {"loss_ce": torch.tensor(1.0), "loss_kd": torch.tensor(2.0)})
    stats = meters.summary()
    assert stats["loss"] == pytest.approx(2.0) and stats["top1"] == pytest.approx(50.0)
    inf, nan, one = torch.tensor(float("inf")), torch.tensor(float("nan")), torch.tensor(1.0)
    meters.update(preds, target, inf, {"loss_ce": one, "loss_kd": inf})
    meters.update(preds, target, nan, {"loss_ce": nan, "loss_kd": one})
    with pytest.raises(NonFiniteLossError, match="step 3: loss term 'loss_kd' is inf"):
        meters.summary()


def _draws(loader):
    return (random.random(), np.random.rand(), torch.rand(1).item(), [b[0].tolist() for b in loader])


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    seed_everything(7)
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=4, shuffle=True, generator=generator)
    _draws(loader)
    save_checkpoint({"rng_state": capture_rng_state(loader)}, str(tmp_path / "s"))
    expected = _draws(loader)
    assert _draws(loader) != expected  # the generators moved on
    warning = restore_rng_state(load_checkpoint(str(tmp_path / "s"))["rng_state"], loader)
    assert warning is None
    assert _draws(loader) == expected


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), {}


class _FakeWandb:
    """Stands in for the wandb package: the online start fails (no network), the offline one works."""

    def __init__(self):
        self.modes, self.logged, self.summary, self.finished = [], [], {}, False

    def init(self, mode=None, **kwargs):
        self.modes.append(mode)
        if mode != "offline":
            raise RuntimeError("network unreachable\nmore details")
        return self

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_falls_back_to_offline_and_logs_every_epoch(tmp_path, monkeypatch, capsys):
    from mdistiller.engine.trainer import BaseTrainer

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_cfg(None, ["LOG.WANDB", "True", "LOG.PREFIX", str(tmp_path), "SOLVER.EPOCHS", "2"])
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    loader = DataLoader(data, batch_size=4)
    trainer = BaseTrainer("p/run", Vanilla(_TinyNet()), loader, loader, cfg, tags=["a"])
    best, last = trainer.train()
    assert fake.modes == [None, "offline"] and fake.finished
    assert [step for step, _ in fake.logged] == [1, 2]
    assert {"current lr", "train_acc", "train_loss", "test_acc", "test_acc_top5", "test_loss"} == set(fake.logged[0][1])
    assert fake.summary["best_acc"] == best and fake.summary["last_acc"] == last
    assert cfg.LOG.WANDB is True  # the frozen config is not touched (upstream crashed here)
    assert "wandb failed to start (network unreachable); logging offline" in capsys.readouterr().out


def test_wandb_not_installed_continues_without_it(tmp_path, monkeypatch, capsys):
    from mdistiller.engine.trainer import start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    cfg = load_cfg(None, ["LOG.WANDB", "True"])
    assert start_wandb(cfg, "p/run", [], str(tmp_path)) is None
    assert "wandb is not installed" in capsys.readouterr().out
