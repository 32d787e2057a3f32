"""DistillationOrientedTrainer: upstream's reference trajectory (recorded from upstream's code) and the
per-parameter momentum rules written out by hand."""
import pytest
import torch
import torch.nn as nn

from mdistiller.engine.dot import DistillationOrientedTrainer


def _dot_step(optimizer, loss_kd, loss_task):
    optimizer.zero_grad(set_to_none=True)
    loss_kd.backward(retain_graph=True)
    optimizer.step_kd()
    optimizer.zero_grad(set_to_none=True)
    loss_task.backward()
    optimizer.step()


def test_reference_trajectory():
    p = nn.Parameter(torch.ones(3))
    optimizer = DistillationOrientedTrainer([p], lr=0.1, momentum=0.825, momentum_kd=0.975, weight_decay=5e-4)
    expected = [0.5999500155448914, -0.08011123538017273, -0.8843855261802673]
    for value in expected:
        _dot_step(optimizer, 2 * p.sum(), (p**2).sum())
        torch.testing.assert_close(p.detach(), torch.full((3,), value), rtol=1e-6, atol=1e-7)


def test_shared_kd_only_and_task_only_parameters():
    """shared: task buffer (m_task, +wd) and kd buffer (m_kd, no wd); kd-only and task-only: mean momentum, +wd."""
    lr, m_task, m_kd, wd = 0.1, 0.8, 0.95, 0.01
    shared, kd_only, task_only = (nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in (1.0, 2.0, -1.0))
    optimizer = DistillationOrientedTrainer(
        [shared, kd_only, task_only], lr=lr, momentum=m_task, momentum_kd=m_kd, weight_decay=wd
    )
    s, k, t = 1.0, 2.0, -1.0
    buf_s_task = buf_s_kd = buf_k = buf_t = None
    m_mean = (m_task + m_kd) / 2
    for _ in range(3):
        _dot_step(optimizer, 3 * shared.sum() + (kd_only**2).sum(), (shared**2).sum() + 5 * task_only.sum())
        g_s_task, g_s_kd, g_k, g_t = 2 * s + wd * s, 3.0, 2 * k, 5.0 + wd * t
        buf_s_task = g_s_task if buf_s_task is None else m_task * buf_s_task + g_s_task
        buf_s_kd = g_s_kd if buf_s_kd is None else m_kd * buf_s_kd + g_s_kd
        buf_t = g_t if buf_t is None else m_mean * buf_t + g_t
        buf_k = g_k if buf_k is None else m_mean * buf_k + g_k + wd * k  # no decay on the very first kd buffer
        s, k, t = s - lr * buf_s_task - lr * buf_s_kd, k - lr * buf_k, t - lr * buf_t
        assert shared.item() == pytest.approx(s, rel=1e-12)
        assert kd_only.item() == pytest.approx(k, rel=1e-12)
        assert task_only.item() == pytest.approx(t, rel=1e-12)


def test_state_dict_round_trip_continues_identically():
    def run(steps_before, reload):
        p = nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))
        opt = DistillationOrientedTrainer([p], lr=0.05, momentum=0.825, momentum_kd=0.975, weight_decay=5e-4)
        for _ in range(steps_before):
            _dot_step(opt, (p**3).sum(), (p - 0.3).pow(2).sum())
        if reload:
            fresh = DistillationOrientedTrainer([p], lr=0.05, momentum=0.825, momentum_kd=0.975, weight_decay=5e-4)
            fresh.load_state_dict(opt.state_dict())
            opt = fresh
        for _ in range(2):
            _dot_step(opt, (p**3).sum(), (p - 0.3).pow(2).sum())
        return p.detach()

    torch.testing.assert_close(run(2, reload=True), run(2, reload=False), rtol=0, atol=0)
