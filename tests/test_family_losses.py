"""Each feature-distillation loss against a straightforward re-computation of its formula on fixed inputs
(loops and explicit sums in float64, written independently of the vectorised implementation)."""
import itertools
import math

import pytest
import torch
import torch.nn as nn

from mdistiller.distillers._common import ConvReg
from mdistiller.distillers.AT import at_loss
from mdistiller.distillers.CRD import ContrastMemory, Embed, contrast_loss
from mdistiller.distillers.KDSVD import kdsvd_loss
from mdistiller.distillers.NST import nst_loss
from mdistiller.distillers.OFD import ofd_feat_loss, ofd_margin
from mdistiller.distillers.PKT import pkt_loss
from mdistiller.distillers.ReviewKD import hcl_loss
from mdistiller.distillers.RKD import rkd_loss
from mdistiller.distillers.SP import sp_loss
from mdistiller.distillers.VID import vid_loss


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block_mean(f, size):
    """Average of non-overlapping blocks down to size × size (== adaptive pooling for integer ratios)."""
    b, c, h, w = f.shape
    return f.reshape(b, c, size, h // size, size, w // size).mean(dim=(3, 5))


def test_at_loss_formula():
    g_s = [_randn(2, 3, 8, 8, seed=1), _randn(2, 5, 4, 4, seed=2)]
    g_t = [_randn(2, 6, 4, 4, seed=3), _randn(2, 2, 4, 4, seed=4)]
    expected = 0.0
    for f_s, f_t in zip(g_s, g_t):
        if f_s.shape[2] > f_t.shape[2]:
            f_s = _block_mean(f_s, f_t.shape[2])
        maps = []
        for f in (f_s, f_t):
            a = (f**2).mean(dim=1).flatten(1)
            maps.append(a / a.norm(dim=1, keepdim=True))
        expected += ((maps[0] - maps[1]) ** 2).sum().item() / maps[0].numel()
    assert at_loss(g_s, g_t, 2).item() == pytest.approx(expected, rel=1e-12)


def _smooth_l1(a, b):
    total = 0.0
    for x, y in zip(a, b):
        d = abs(x - y)
        total += 0.5 * d * d if d < 1 else d - 0.5
    return total / len(a)


def _rkd_reference(stu, tea, distance_weight, angle_weight):
    def distances(e):
        n = len(e)
        d = [[math.dist(e[i], e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        positive = [v for row in d for v in row if v > 0]
        mean = sum(positive) / len(positive)
        return [v / mean for row in d for v in row]

    def angles(e):
        n = len(e)
        out = []
        for a, b, c in itertools.product(range(n), repeat=3):
            u = [x - y for x, y in zip(e[b], e[a])]
            v = [x - y for x, y in zip(e[c], e[a])]
            nu, nv = math.hypot(*u), math.hypot(*v)
            out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out

    s, t = stu.tolist(), tea.tolist()
    return distance_weight * _smooth_l1(distances(s), distances(t)) + angle_weight * _smooth_l1(angles(s), angles(t))


def test_rkd_loss_formula():
    stu, tea = _randn(4, 5, seed=5), _randn(4, 7, seed=6) * 3
    expected = _rkd_reference(stu, tea, 25, 50)
    assert rkd_loss(stu, tea, False, 1e-12, 25, 50).item() == pytest.approx(expected, rel=1e-9)


def test_pkt_loss_formula():
    f_s, f_t = _randn(3, 4, seed=7), _randn(3, 6, seed=8)
    eps = 1e-7

    def distribution(f):
        rows = f.tolist()
        normed = [[x / (math.sqrt(sum(v * v for v in r)) + eps) for x in r] for r in rows]
        sim = [[(sum(a * b for a, b in zip(ri, rj)) + 1) / 2 for rj in normed] for ri in normed]
        return [[v / sum(row) for v in row] for row in sim]

    p_s, p_t = distribution(f_s), distribution(f_t)
    terms = [t * math.log((t + eps) / (s + eps)) for rs, rt in zip(p_s, p_t) for s, t in zip(rs, rt)]
    assert pkt_loss(f_s, f_t).item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_sp_loss_formula():
    f_s, f_t = _randn(3, 2, 2, 2, seed=9), _randn(3, 5, 1, 1, seed=10)

    def gram(f):
        rows = f.flatten(1).tolist()
        g = [[sum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in g]

    gs, gt = gram(f_s), gram(f_t)
    expected = sum((a - b) ** 2 for ra, rb in zip(gt, gs) for a, b in zip(ra, rb)) / 9
    assert sp_loss([f_s], [f_t]).item() == pytest.approx(expected, rel=1e-12)


def test_nst_loss_formula():
    f_s, f_t = _randn(2, 3, 4, 4, seed=11), _randn(2, 5, 2, 2, seed=12)
    expected = 0.0
    pooled = _block_mean(f_s, 2)
    for b in range(2):
        s = [v / v.norm() for v in pooled[b].flatten(1)]
        t = [v / v.norm() for v in f_t[b].flatten(1)]

        def mean_kernel(x, y):
            return sum(float(xi @ yj) ** 2 for xi in x for yj in y) / (len(x) * len(y))

        expected += (mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)) / 2
    assert nst_loss([f_s], [f_t]).item() == pytest.approx(expected, rel=1e-12)


def test_vid_loss_formula():
    f_s, f_t = _randn(2, 3, 4, 4, seed=13), _randn(2, 2, 2, 2, seed=14)
    regressor = nn.Conv2d(3, 2, kernel_size=1, bias=False).double()
    with torch.no_grad():
        regressor.weight.copy_(_randn(2, 3, 1, 1, seed=15))
    log_scale = torch.tensor([0.3, -1.2], dtype=torch.float64)
    eps = 1e-5
    mean = torch.einsum("oc,bchw->bohw", regressor.weight[:, :, 0, 0], _block_mean(f_s, 2))
    total, count = 0.0, 0
    for b, c, h, w in itertools.product(range(2), range(2), range(2), range(2)):
        var = math.log(1 + math.exp(log_scale[c].item())) + eps
        total += 0.5 * ((mean[b, c, h, w].item() - f_t[b, c, h, w].item()) ** 2 / var + math.log(var))
        count += 1
    assert vid_loss(regressor, log_scale, f_s, f_t, eps).item() == pytest.approx(total / count, rel=1e-12)


def test_ofd_margin_is_the_negative_tail_mean():
    scipy_stats = pytest.importorskip("scipy.stats")
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.5, 0.1]))  # sign of gamma is irrelevant: |gamma| is the std
        bn.bias.copy_(torch.tensor([0.2, -0.3, 1.0]))  # channel 3: P(x<0) = Φ(-10) < 0.001 → -3σ
    margin = ofd_margin(bn).flatten().tolist()
    for idx, (std, mean) in enumerate([(1.0, 0.2), (0.5, -0.3)]):
        tail_mean = scipy_stats.truncnorm(-math.inf, (0 - mean) / std, loc=mean, scale=std).mean()
        assert margin[idx] == pytest.approx(tail_mean, rel=1e-5)
    assert margin[2] == pytest.approx(-0.3, rel=1e-6)


def test_ofd_feat_loss_formula():
    source, target = _randn(2, 3, 2, 2, seed=16), _randn(2, 3, 2, 2, seed=17)
    margin = torch.tensor([-0.5, -0.1, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    total = 0.0
    for b, c, h, w in itertools.product(range(2), range(3), range(2), range(2)):
        s, t, m = source[b, c, h, w].item(), target[b, c, h, w].item(), margin[0, c, 0, 0].item()
        if t > 0:
            total += (s - t) ** 2  # teacher active: plain L2
        elif t > m:
            total += (s - t) ** 2 if s > t else 0.0  # teacher inactive but above the margin
        else:
            total += (s - m) ** 2 if s > m else 0.0  # teacher below the margin: only pull the student down to it
    assert ofd_feat_loss(source, target, margin).item() == pytest.approx(total / 2, rel=1e-12)


def test_hcl_loss_formula():
    fs = [_randn(2, 3, 8, 8, seed=18), _randn(2, 4, 2, 2, seed=19), _randn(2, 4, 1, 1, seed=20)]
    ft = [_randn(2, 3, 8, 8, seed=21), _randn(2, 4, 2, 2, seed=22), _randn(2, 4, 1, 1, seed=23)]

    def mse(a, b):
        return ((a - b) ** 2).mean().item()

    expected = (
        (mse(fs[0], ft[0]) + mse(_block_mean(fs[0], 4), _block_mean(ft[0], 4)) / 2
         + mse(_block_mean(fs[0], 2), _block_mean(ft[0], 2)) / 4
         + mse(_block_mean(fs[0], 1), _block_mean(ft[0], 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
        + (mse(fs[1], ft[1]) + mse(_block_mean(fs[1], 1), _block_mean(ft[1], 1)) / 2) / 1.5
        + mse(fs[2], ft[2])
    )
    assert hcl_loss(fs, ft).item() == pytest.approx(expected, rel=1e-12)


def test_kdsvd_loss_is_zero_for_identical_features_and_positive_otherwise():
    g = [_randn(2, 4, 4, 4, seed=24), _randn(2, 8, 4, 4, seed=25), _randn(2, 8, 2, 2, seed=26)]
    assert kdsvd_loss(g, g, 1).item() == pytest.approx(0.0, abs=1e-10)
    other = [_randn(2, 4, 4, 4, seed=27), _randn(2, 8, 4, 4, seed=28), _randn(2, 8, 2, 2, seed=29)]
    assert kdsvd_loss(other, g, 1).item() > 1e-4


def test_kdsvd_loss_formula():
    """k = 1: v = leading right-singular vector of each (C·H)×W map, scaled by its normalised singular value
    (= 1 for k = 1); the student's best-matching (|cos|) of its 4 leading vectors, sign-aligned."""
    g_s = [_randn(2, 3, 4, 4, seed=30), _randn(2, 2, 4, 4, seed=31)]
    g_t = [_randn(2, 5, 4, 4, seed=32), _randn(2, 3, 4, 4, seed=33)]

    def leading(f, count):
        _, _, vh = torch.linalg.svd(f.flatten(0, 1).float(), full_matrices=False)
        return vh[:count].double()  # rows are right-singular vectors

    expected = 0.0
    for b in range(2):
        prev_s = prev_t = None
        for f_s, f_t in zip(g_s, g_t):
            v_t = leading(f_t[b], 1)[0]
            candidates = leading(f_s[b], 4)
            cosines = [float(c @ v_t) for c in candidates]
            best = max(range(4), key=lambda i: abs(cosines[i]))
            v_s = candidates[best] * math.copysign(1.0, cosines[best])
            if prev_s is not None:
                for i, j in itertools.product(range(4), range(4)):
                    s_rbf = math.exp(-((v_s[i] - prev_s[j]).item() ** 2) / 8)
                    t_rbf = math.exp(-((v_t[i] - prev_t[j]).item() ** 2) / 8)
                    expected += (s_rbf - t_rbf) ** 2
            prev_s, prev_t = v_s, v_t
    assert kdsvd_loss(g_s, g_t, 1).item() == pytest.approx(expected / 2, rel=1e-5)


def test_contrast_loss_formula():
    scores = torch.rand(3, 5, generator=torch.Generator().manual_seed(34), dtype=torch.float64) + 0.1
    num_data, eps = 50, 1e-7
    noise = 4 / num_data
    expected = 0.0
    for row in scores.tolist():
        expected -= math.log(row[0] / (row[0] + noise + eps))
        expected -= sum(math.log(noise / (x + noise + eps)) for x in row[1:])
    assert contrast_loss(scores, num_data).item() == pytest.approx(expected / 3, rel=1e-12)


def test_contrast_memory_scores_normalisation_and_momentum_update():
    torch.manual_seed(0)
    memory = ContrastMemory(input_size=4, output_size=10, k=3, temperature=0.5, momentum=0.25).double()
    v1 = Embed(6, 4).double()(_randn(2, 6, seed=35))
    v2 = Embed(5, 4).double()(_randn(2, 5, seed=36))
    index = torch.tensor([7, 2])
    contrast_idx = torch.tensor([[7, 0, 1, 9], [2, 3, 3, 8]])
    bank_s, bank_t = memory.memory_v1.clone(), memory.memory_v2.clone()
    out_v1, out_v2 = memory(v1, v2, index, contrast_idx)

    def raw(bank, v):
        rows = [[math.exp(float(bank[j] @ v[b].detach()) / 0.5) for j in contrast_idx[b]] for b in range(2)]
        return torch.tensor(rows, dtype=torch.float64)

    raw_v1, raw_v2 = raw(bank_t, v1), raw(bank_s, v2)
    z_v1, z_v2 = raw_v1.mean().item() * 10, raw_v2.mean().item() * 10
    torch.testing.assert_close(out_v1.detach(), raw_v1 / z_v1, rtol=1e-9, atol=0)
    torch.testing.assert_close(out_v2.detach(), raw_v2 / z_v2, rtol=1e-9, atol=0)

    memory.update(v1, v2, index)
    for bank_before, bank_after, v in ((bank_s, memory.memory_v1, v1), (bank_t, memory.memory_v2, v2)):
        for b, row in enumerate(index.tolist()):
            mixed = 0.25 * bank_before[row] + 0.75 * v[b].detach()
            torch.testing.assert_close(bank_after[row], mixed / mixed.norm())
        untouched = [r for r in range(10) if r not in index.tolist()]
        torch.testing.assert_close(bank_after[untouched], bank_before[untouched])


def test_contrast_memory_samples_on_cpu_with_the_positive_first():
    memory = ContrastMemory(input_size=4, output_size=20, k=6)
    idx = memory.sample(torch.tensor([3, 11]))
    assert idx.shape == (2, 7) and idx.device.type == "cpu"
    assert idx[:, 0].tolist() == [3, 11] and int(idx.min()) >= 0 and int(idx.max()) < 20


@pytest.mark.parametrize(
    "s_shape, t_shape, layer",
    [
        ((1, 8, 16, 16), (1, 4, 8, 8), nn.Conv2d),
        ((1, 8, 4, 4), (1, 4, 8, 8), nn.ConvTranspose2d),
        ((1, 8, 6, 6), (1, 4, 4, 4), nn.Conv2d),
        ((1, 8, 4, 4), (1, 4, 4, 4), nn.Conv2d),
    ],
)
def test_conv_reg_maps_student_shape_to_teacher_shape(s_shape, t_shape, layer):
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is layer
    assert reg(torch.randn(2, *s_shape[1:])).shape == (2, *t_shape[1:])


def test_conv_reg_refuses_a_much_smaller_student():
    with pytest.raises(ValueError, match="student map 2x2 cannot be regressed onto teacher map 8x8"):
        ConvReg((1, 8, 2, 2), (1, 4, 8, 8))
