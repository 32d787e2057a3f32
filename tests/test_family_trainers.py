"""The `crd`, `dot` and `crd_dot` trainers: one epoch each on generated batches with a tiny contract model."""
import pytest
import torch
from test_family_distillers import TinyNet
from torch.utils.data import DataLoader, TensorDataset

from mdistiller.distillers import distiller_dict
from mdistiller.engine import trainer_dict
from mdistiller.engine.cfg import CFG
from mdistiller.engine.dot import DistillationOrientedTrainer

NUM_DATA = 12


def _cfg(tmp_path, trainer, distiller, delta=0.075):
    cfg = CFG.clone()
    cfg.LOG.PREFIX = str(tmp_path)
    cfg.SOLVER.TRAINER, cfg.DISTILLER.TYPE = trainer, distiller
    cfg.SOLVER.EPOCHS, cfg.SOLVER.LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.DOT.DELTA = 1, 0.1, 5e-4, delta
    cfg.CRD.FEAT.STUDENT_DIM, cfg.CRD.FEAT.TEACHER_DIM, cfg.CRD.FEAT.DIM, cfg.CRD.NCE.K = 32, 48, 8, 4
    return cfg


def _loaders(crd: bool):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_DATA, 3, 16, 16, generator=g)
    targets = torch.randint(0, 5, (NUM_DATA,), generator=g)
    index = torch.arange(NUM_DATA)
    tensors = [images, targets, index]
    if crd:
        contrast = torch.randint(0, NUM_DATA, (NUM_DATA, 5), generator=g)
        contrast[:, 0] = index
        tensors.append(contrast)
    train = DataLoader(TensorDataset(*tensors), batch_size=4, shuffle=False)
    return train, DataLoader(TensorDataset(images, targets), batch_size=6)


def _run(tmp_path, trainer, distiller_type, delta=0.075):
    torch.manual_seed(0)
    student, teacher = TinyNet(width=4), TinyNet(width=6)
    cfg = _cfg(tmp_path, trainer, distiller_type, delta)
    args = (NUM_DATA,) if distiller_type == "CRD" else ()
    distiller = distiller_dict[distiller_type](student, teacher, cfg, *args)
    train_loader, val_loader = _loaders(crd=trainer in ("crd", "crd_dot"))
    runner = trainer_dict[trainer](f"{trainer}_{delta}", distiller, train_loader, val_loader, cfg)
    runner.train()
    return distiller, runner


def test_dot_with_zero_delta_is_plain_sgd_on_the_summed_loss(tmp_path):
    """With δ = 0 both momenta equal SOLVER.MOMENTUM: the two buffers add up to SGD's buffer of the total gradient."""
    dot, runner = _run(tmp_path, "dot", "KD", delta=0.0)
    assert isinstance(runner.optimizer, DistillationOrientedTrainer)
    base, _ = _run(tmp_path, "base", "KD")
    for (name, p_dot), p_base in zip(dot.student.named_parameters(), base.student.parameters()):
        torch.testing.assert_close(p_dot, p_base, rtol=1e-5, atol=1e-6, msg=name)
    moved, _ = _run(tmp_path, "dot", "KD", delta=0.075)
    assert any(not torch.allclose(a, b) for a, b in zip(moved.student.parameters(), base.student.parameters()))


def test_dot_momenta_come_from_the_config(tmp_path):
    _, runner = _run(tmp_path, "dot", "KD", delta=0.075)
    group = runner.optimizer.param_groups[0]
    assert group["momentum"] == pytest.approx(0.825) and group["momentum_kd"] == pytest.approx(0.975)


@pytest.mark.parametrize("trainer", ["crd", "crd_dot"])
def test_crd_trainers_feed_indices_and_fill_the_memory(tmp_path, trainer):
    torch.manual_seed(0)
    initial = distiller_dict["CRD"](TinyNet(width=4), TinyNet(width=6), _cfg(tmp_path, trainer, "CRD"), NUM_DATA)
    distiller, runner = _run(tmp_path, trainer, "CRD")
    changed = (distiller.contrast.memory_v1 != initial.contrast.memory_v1).any(dim=1)
    assert changed.all()  # every training index was written once during the epoch
    assert distiller.contrast.params[2] > 0  # normalisation constant set
    assert (tmp_path / f"{trainer}_0.075" / "student_latest").exists()


def test_crd_trainer_refuses_plain_batches_with_a_clear_error(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, "crd", "CRD")
    distiller = distiller_dict["CRD"](TinyNet(width=4), TinyNet(width=6), cfg, NUM_DATA)
    train_loader, val_loader = _loaders(crd=False)
    runner = trainer_dict["crd"]("bad", distiller, train_loader, val_loader, cfg)
    with pytest.raises(ValueError, match=r"expects batches \(image, target, index, contrastive_index\), got 3 items"):
        runner.train()


def test_dot_trainer_refuses_extra_loss_terms(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path, "dot", "NONE")
    distiller = distiller_dict["NONE"](TinyNet(width=4))
    train_loader, val_loader = _loaders(crd=False)
    runner = trainer_dict["dot"]("bad", distiller, train_loader, val_loader, cfg)
    with pytest.raises(ValueError, match=r"exactly loss_ce and loss_kd, got \['ce'\]"):
        runner.train()
