"""Exact speed-ups: BatchNorm folding of the teacher, the device-resident CIFAR loader, AMP on CPU, channels_last."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import chi2_contingency
from torchvision import transforms

from mdistiller.dataset import cifar100
from mdistiller.dataset.device_loader import DeviceLoader, random_crop_flip
from mdistiller.distillers import distiller_dict
from mdistiller.engine.config import load_cfg
from mdistiller.engine.speed import StepPrecision, prepare_model
from mdistiller.engine.trainer import BaseTrainer, TrainMeters
from mdistiller.errors import ConfigError
from mdistiller.models import build_model
from mdistiller.models.fold import FoldedConv2d, fold_batchnorm


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def _kd(teacher: str = "resnet8x4", seed: int = 0):
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD"])
    torch.manual_seed(seed)
    teacher_model = _randomise_batchnorm(build_model(teacher, 100, dataset="cifar100"), seed)
    return distiller_dict["KD"](build_model("resnet8", 100, dataset="cifar100"), teacher_model, cfg), cfg


# WRN is pre-activation: the BatchNorms after a stage's shortcut sum cannot be folded, those inside blocks can
@pytest.mark.parametrize("teacher,all_folded", [("resnet8x4", True), ("vgg8", True), ("wrn_16_2", False)])
def test_teacher_batchnorm_is_folded_on_first_call_with_equal_outputs_and_state_dict(teacher, all_folded):
    distiller, _ = _kd(teacher)
    reference = build_model(teacher, 100, dataset="cifar100").eval()
    reference.load_state_dict(distiller.teacher.state_dict())
    state_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    distiller.train()
    image = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        logits, feats = distiller.teacher(image)
        expected_logits, expected_feats = reference(image)
    assert any(isinstance(m, FoldedConv2d) for m in distiller.teacher.modules())
    assert any(type(m) is nn.BatchNorm2d for m in distiller.teacher.modules()) != all_folded
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(feats["pooled_feat"], expected_feats["pooled_feat"], rtol=1e-4, atol=1e-4)
    state_after = distiller.teacher.state_dict()
    assert list(state_after) == list(state_before)  # saved checkpoints keep the teacher's keys
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key


def test_folded_teacher_refolds_after_load_state_dict():
    distiller, _ = _kd()
    distiller.train()
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        distiller.teacher(image)  # folds
    other = _randomise_batchnorm(build_model("resnet8x4", 100, dataset="cifar100"), seed=5).eval()
    distiller.teacher.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(distiller.teacher(image)[0], other(image)[0], rtol=1e-4, atol=1e-4)


class _LeakyConv(nn.Module):
    """The conv's raw output is returned too: folding its BatchNorm would change that output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


def test_fold_is_refused_when_it_would_change_an_output():
    model = _randomise_batchnorm(_LeakyConv(), seed=1).eval()
    assert fold_batchnorm(model, torch.randn(2, 3, 8, 8)) == 0
    assert type(model.bn) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="train mode"):
        fold_batchnorm(model.train(), torch.randn(2, 3, 8, 8))


def _position_image() -> np.ndarray:
    """32x32 RGB: red = 8·row, green = 8·column, blue = 255 (padding is black), so a crop reveals its offsets."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([rows * 8, cols * 8, np.full((32, 32), 255)], axis=-1).astype(np.uint8)


def _decode(crop: torch.Tensor):
    """(top, left, flipped) of an unnormalised uint8 crop [3,32,32] of `_position_image()` padded by 4."""
    row, col, next_col = int(crop[0, 16, 16]) // 8, int(crop[1, 16, 16]) // 8, int(crop[1, 16, 17]) // 8
    flipped = next_col < col
    return row - 12, (col - 11 if flipped else col - 12), flipped


def test_device_crop_flip_matches_torchvision_distribution_and_pixels():
    image = _position_image()
    draws = 4000
    images = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).expand(draws, -1, -1, -1)
    generator = torch.Generator().manual_seed(0)
    top, left = torch.randint(0, 9, (2, draws), generator=generator)
    flip = torch.rand(draws, generator=generator) < 0.5
    ours = random_crop_flip(images, top, left, flip, padding=4)
    decoded_ours = [_decode(crop) for crop in ours]
    assert decoded_ours == list(zip(top.tolist(), left.tolist(), flip.tolist()))
    torch.manual_seed(0)
    pil_aug = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.PILToTensor()])
    from PIL import Image

    pil = Image.fromarray(image)
    reference = [pil_aug(pil) for _ in range(draws)]
    decoded_ref = [_decode(crop) for crop in reference]
    # same pixels for the same (top, left, flip): every torchvision view is reproduced exactly
    for params, crop in zip(decoded_ref[:200], reference[:200]):
        t, l_, f = (torch.tensor([v]) for v in params)
        assert torch.equal(random_crop_flip(images[:1], t, l_, f.bool(), 4)[0], crop)
    # same distribution over the 162 views (two-sample chi-square on the view counts)
    views = sorted(set(decoded_ours) | set(decoded_ref))
    table = np.array([[decoded_ours.count(v) for v in views], [decoded_ref.count(v) for v in views]])
    assert len(views) == 9 * 9 * 2
    assert chi2_contingency(table)[1] > 1e-3
    skewed = table.copy()
    skewed[0, : len(views) // 4] += 15  # the test can tell a biased sampler apart
    assert chi2_contingency(skewed)[1] < 1e-3


def test_device_loader_epoch_is_normalised_shuffled_and_sharded():
    images = np.random.RandomState(0).randint(0, 256, (10, 32, 32, 3)).astype(np.uint8)
    targets = list(range(10))
    shards = [DeviceLoader(images, targets, 2, torch.device("cpu"), cifar100.MEAN, cifar100.STD, seed=3, rank=r,
                           num_replicas=2) for r in range(2)]
    seen = []
    for loader in shards:
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        for image, target, index in batches:
            assert image.shape[1:] == (3, 32, 32) and image.dtype == torch.float32
            assert torch.equal(target, torch.as_tensor(targets)[index])
            seen += index.tolist()
    assert sorted(seen) == targets
    whole = DeviceLoader(images, targets, 10, torch.device("cpu"), cifar100.MEAN, cifar100.STD, padding=0)
    image, _, index = next(iter(whole))
    expected = transforms.Normalize(cifar100.MEAN, cifar100.STD)(
        torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2).float() / 255)
    flipped = expected.flip(-1)
    assert all(torch.allclose(a, b, atol=1e-5) or torch.allclose(a, c, atol=1e-5)
               for a, b, c in zip(image, expected, flipped))


def test_amp_is_off_on_cpu_and_rejects_unknown_values():
    cfg = load_cfg(None, ["SOLVER.AMP", "bf16"])
    precision = StepPrecision(cfg, torch.device("cpu"))
    assert not precision.enabled and precision.scaler is None
    with precision.autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="SOLVER.AMP"):
        StepPrecision(load_cfg(None, ["SOLVER.AMP", "fp8"]), torch.device("cpu"))


def _step_losses(channels_last: bool):
    distiller, cfg = _kd(seed=2)
    cfg.defrost()
    cfg.SOLVER.CHANNELS_LAST = channels_last
    trainer = BaseTrainer.__new__(BaseTrainer)
    trainer.cfg, trainer.device = cfg, torch.device("cpu")
    trainer.distiller = prepare_model(distiller, cfg)
    trainer.precision = StepPrecision(cfg, trainer.device)
    trainer.optimizer = trainer.init_optimizer(cfg)
    trainer.distiller.train()
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 100, (8,), generator=generator))
    losses = []
    for _ in range(2):
        meters = TrainMeters(trainer.device)
        trainer.train_iter(batch, 1, meters)
        losses.append(meters.summary()["loss"])
    return losses, distiller


def test_channels_last_gives_the_same_steps():
    reference, _ = _step_losses(False)
    nhwc, distiller = _step_losses(True)
    assert distiller.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc == pytest.approx(reference, rel=1e-4)
