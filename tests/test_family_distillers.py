"""Distiller behaviour on a tiny model that follows the model contract (fast; the zoo pairs are in
test_family_pairs.py): the upstream fixes of docs/upstream_fixes.md and one optimisation step per method."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdistiller.distillers.CRD import CRD
from mdistiller.distillers.FitNet import FitNet
from mdistiller.distillers.OFD import OFD
from mdistiller.distillers.ReviewKD import ReviewKD, reviewkd_layout
from mdistiller.distillers.VID import VID
from mdistiller.engine.cfg import CFG
from mdistiller.engine.dot import DistillationOrientedTrainer


class TinyNet(nn.Module):
    """Stem + three stages (strides 1, 2, 2) with the feature dict of the model contract."""

    def __init__(self, width: int = 4, num_classes: int = 5):
        super().__init__()
        channels = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels[0])
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            for i in range(3)
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels[1:])
        self.fc = nn.Linear(channels[-1], num_classes)
        self.channels = channels

    def get_stage_channels(self):
        return self.channels

    def get_bn_before_relu(self):
        return list(self.bns)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        pre = self.stem_bn(self.stem(x))
        x = F.relu(pre)
        feats, preacts = [x], [x]
        for conv, bn in zip(self.convs, self.bns):
            pre = bn(conv(x))
            x = F.relu(pre)
            feats.append(x)
            preacts.append(pre)
        pooled = x.mean(dim=(2, 3))
        return self.fc(pooled), {"feats": feats, "preact_feats": preacts, "pooled_feat": pooled, "gap_feat": x}


def _pair(seed=0):
    torch.manual_seed(seed)
    return TinyNet(width=4), TinyNet(width=6)


def _cfg(**overrides):
    cfg = CFG.clone()
    cfg.merge_from_list([item for kv in overrides.items() for item in kv])
    return cfg


def _batch(seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 5, (batch,), generator=g)


def test_vid_log_scales_are_registered_and_trained():
    student, teacher = _pair()
    distiller = VID(student, teacher, _cfg(**{"VID.INPUT_SIZE": (16, 16)}))
    assert [k for k in distiller.state_dict() if k.startswith("log_scales.")] == [f"log_scales.{i}" for i in range(3)]
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert all(id(p) in learnable for p in distiller.log_scales)
    before = [p.detach().clone() for p in distiller.log_scales]
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.1)
    image, target = _batch()
    _, losses = distiller.train()(image=image, target=target, epoch=1)
    sum(losses.values()).backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, distiller.log_scales))
    regressors = sum(p.numel() for p in distiller.regressors.parameters())
    assert distiller.get_extra_parameters() == regressors + sum(teacher.channels[1:])
    assert distiller.double().log_scales[0].dtype == torch.float64


def test_shape_probe_leaves_teacher_statistics_untouched():
    student, teacher = _pair()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    FitNet(student, teacher, _cfg(**{"FITNET.INPUT_SIZE": (16, 16)}))
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert teacher.training and student.training


@pytest.mark.parametrize("teacher_train_mode", [False, True])
def test_ofd_teacher_mode_is_an_explicit_option(teacher_train_mode):
    student, teacher = _pair()
    distiller = OFD(student, teacher, _cfg(**{"OFD.TEACHER_TRAIN_MODE": teacher_train_mode})).train()
    assert distiller.student.training
    assert distiller.teacher.training is teacher_train_mode
    stats_before = teacher.bns[0].running_mean.clone()
    image, target = _batch()
    distiller(image=image, target=target, epoch=1)
    assert torch.equal(stats_before, teacher.bns[0].running_mean) is not teacher_train_mode
    assert distiller.eval().teacher.training is False


def test_ofd_state_dict_keys_match_upstream():
    student, teacher = _pair()
    distiller = OFD(student, teacher, CFG.clone())
    extra = sorted(k for k in distiller.state_dict() if not k.startswith(("student.", "teacher.")))
    assert extra[:2] == ["connectors.connectors.0.0.weight", "connectors.connectors.0.1.bias"]
    assert not any("margin" in k for k in extra)
    assert distiller.margin_0.shape == (1, teacher.channels[1], 1, 1)


def _reviewkd_cfg(student, teacher, **overrides):
    with torch.no_grad():
        image = torch.randn(1, 3, 16, 16)
        layout = reviewkd_layout(student.eval()(image)[1], teacher.eval()(image)[1])
    student.train(), teacher.train()
    return _cfg(**{f"REVIEWKD.{k}": v for k, v in layout.items()}, **overrides), layout


def test_reviewkd_honours_max_mid_channel():
    student, teacher = _pair()
    cfg, layout = _reviewkd_cfg(student, teacher, **{"REVIEWKD.MAX_MID_CHANNEL": 8})
    distiller = ReviewKD(student, teacher, cfg)
    assert layout["IN_CHANNELS"][-1] == 32
    assert {abf.conv1[0].out_channels for abf in distiller.abfs} == {8}
    image, target = _batch()
    _, losses = distiller.train()(image=image, target=target, epoch=1)
    assert torch.isfinite(losses["loss_kd"])


def test_reviewkd_wrong_layout_is_one_clear_error():
    student, teacher = _pair()
    distiller = ReviewKD(student, teacher, CFG.clone())  # defaults describe resnet32x4 -> resnet8x4
    image, target = _batch()
    expected = r"REVIEWKD.IN_CHANNELS=\[64, 128, 256, 256\] does not match .* expected \[8, 16, 32, 32\]"
    with pytest.raises(ValueError, match=expected):
        distiller.train()(image=image, target=target, epoch=1)


def _crd(num_data=12, k=4):
    student, teacher = _pair()
    cfg = _cfg(**{"CRD.FEAT.STUDENT_DIM": 32, "CRD.FEAT.TEACHER_DIM": 48, "CRD.FEAT.DIM": 8, "CRD.NCE.K": k})
    return CRD(student, teacher, cfg, num_data=num_data)


def test_crd_builds_and_trains_on_cpu_and_updates_its_memory():
    distiller = _crd().train()
    image, target = _batch()
    index = torch.tensor([0, 3, 5, 11])
    bank_before = distiller.contrast.memory_v1.clone()
    _, losses = distiller(image=image, target=target, index=index, contrastive_index=None, epoch=1)
    sum(losses.values()).backward()
    changed = (distiller.contrast.memory_v1 != bank_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == index.tolist()
    embeds = (32 * 8 + 8) + (48 * 8 + 8)
    assert distiller.get_extra_parameters() == embeds + 5 + 2 * 12 * 8  # + params buffer + two banks


def test_crd_wrong_feature_dim_is_one_clear_error():
    student, teacher = _pair()
    distiller = CRD(student, teacher, CFG.clone(), num_data=10)
    image, target = _batch()
    with pytest.raises(ValueError, match="CRD.FEAT.STUDENT_DIM=256 but the student's pooled_feat has 32 features"):
        distiller.train()(image=image, target=target, index=torch.arange(4), contrastive_index=None, epoch=1)


def test_dot_optimizer_refuses_several_parameter_groups():
    a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="one parameter group, got 2"):
        DistillationOrientedTrainer([{"params": [a]}, {"params": [b]}], lr=0.1)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same initial banks and weights on every rank
        distiller = _crd(num_data=16).train()
        image, target = _batch(seed=10 + rank)
        index = torch.tensor([0, 1, 2, 3]) + 4 * rank
        distiller(image=image, target=target, index=index, contrastive_index=None, epoch=1)
        contrast = distiller.contrast
        state = {"v1": contrast.memory_v1, "v2": contrast.memory_v2, "params": contrast.params}
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_memory_update_under_ddp_keeps_every_rank(tmp_path):
    """Two gloo ranks, disjoint indices: afterwards both ranks hold the same banks, with both ranks' rows updated."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    initial = _crd(num_data=16).contrast
    for key in ("v1", "v2", "params"):
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    changed = (states[0]["v1"] != initial.memory_v1).any(dim=1).nonzero().flatten().tolist()
    assert changed == list(range(8))
