"""KD and DKD against upstream mdistiller's golden values (recorded from upstream's code on fixed inputs)."""
import pytest
import torch
import torch.nn.functional as F

from mdistiller.distillers.DKD import dkd_loss, dkd_warmup_factor
from mdistiller.distillers.KD import kd_loss

STUDENT = torch.tensor([[1, 2, 3, 4, 5], [0.5, -1, 2, 0, 1]], dtype=torch.float64)
TEACHER = torch.tensor([[2, 1, 0, 3, 4], [1, 1, 3, -2, 0]], dtype=torch.float64)
TARGET = torch.tensor([4, 2])


def test_cross_entropy_reference():
    assert F.cross_entropy(STUDENT, TARGET).item() == pytest.approx(0.5131761677826947, abs=1e-12)


@pytest.mark.parametrize("temperature, expected", [(1, 0.2005217033421126), (4, 0.6964202160917308)])
def test_kd_loss_golden(temperature, expected):
    assert kd_loss(STUDENT, TEACHER, temperature).item() == pytest.approx(expected, abs=1e-12)


def test_kd_total_with_default_weights():
    total = 0.1 * F.cross_entropy(STUDENT, TARGET) + 0.9 * kd_loss(STUDENT, TEACHER, 4)
    assert total.item() == pytest.approx(0.6780958112608272, abs=1e-12)


@pytest.mark.parametrize(
    "alpha, beta, temperature, expected",
    [
        (1, 8, 4, 7.636171699640262),
        (1, 2, 4, 1.9513479820006885),
        (1, 0.5, 1, 0.31774199719716795),
        (1, 1, 1, 0.5962716832829086),
        (1, 0, 4, 0.056406742787497244),
        (0, 1, 4, 0.9474706196065956),
    ],
)
def test_dkd_loss_golden(alpha, beta, temperature, expected):
    value = dkd_loss(STUDENT, TEACHER, TARGET, alpha, beta, temperature).item()
    assert value == pytest.approx(expected, abs=1e-11)


def test_dkd_is_finite_when_the_target_probability_underflows():
    """Upstream takes log of a probability that can be exactly 0; ours stays finite."""
    student = torch.tensor([[-200.0, 0.0, 200.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 2.0]])
    loss = dkd_loss(student, teacher, torch.tensor([0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("epoch, factor", [(1, 0.05), (10, 0.5), (20, 1.0), (21, 1.0)])
def test_dkd_warmup(epoch, factor):
    assert dkd_warmup_factor(epoch, 20) == pytest.approx(factor)
