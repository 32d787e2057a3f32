"""CIFAR resnet / resnetv2 / wrn / vgg: upstream checkpoint compatibility and what the explanation code relies on."""
import pytest
import torch
import torch.nn as nn

from mdistiller.models.cifar.resnet import ResNet, resnet8, resnet8x4, resnet20
from mdistiller.models.cifar.resnetv2 import ResNet18, ResNet50
from mdistiller.models.cifar.vgg import vgg8_bn, vgg13_bn
from mdistiller.models.cifar.wrn import WideResNet, wrn_16_1, wrn_16_2, wrn_40_2

SMALL = {
    "resnet8": resnet8,
    "resnet8x4": resnet8x4,
    "ResNet18": ResNet18,
    "wrn_16_1": wrn_16_1,
    "wrn_16_2": wrn_16_2,
    "vgg8": vgg8_bn,
}

# Key names and shapes as they appear in upstream mdistiller's checkpoints (100 classes).
UPSTREAM_KEYS = {
    resnet8x4: {
        "conv1.weight": (32, 3, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer1.0.downsample.1.running_var": (64,),
        "layer3.0.conv2.weight": (256, 256, 3, 3),
        "fc.weight": (100, 256),
    },
    resnet20: {"layer2.2.bn2.weight": (32,), "layer3.0.downsample.0.weight": (64, 32, 1, 1), "fc.bias": (100,)},
    ResNet50: {
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
    wrn_40_2: {
        "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.5.bn2.running_mean": (128,),
        "bn1.weight": (128,),
        "fc.weight": (100, 128),
    },
    vgg13_bn: {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.1.running_mean": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.weight": (512,),
        "classifier.weight": (100, 512),
    },
}


@pytest.mark.parametrize("ctor", list(UPSTREAM_KEYS), ids=lambda c: c.__name__)
def test_upstream_key_names_and_shapes(ctor):
    state = ctor(num_classes=100).state_dict()
    for key, shape in UPSTREAM_KEYS[ctor].items():
        assert tuple(state[key].shape) == shape, key


def test_wrn_without_width_change_has_no_first_shortcut():
    assert "block1.layer.0.convShortcut.weight" not in wrn_16_1(num_classes=10).state_dict()
    assert "block2.layer.0.convShortcut.weight" in wrn_16_1(num_classes=10).state_dict()


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a checkpoint carries more than the init."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model


@pytest.mark.parametrize("name", sorted(SMALL))
def test_checkpoint_file_loads_strict_and_reproduces_logits(name, tmp_path):
    torch.manual_seed(0)
    source = _randomise_bn(SMALL[name](num_classes=100)).eval()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(1)
    target = SMALL[name](num_classes=100)
    target.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    target.eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(image)[0], source(image)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_64px_input_and_gap_identity(name):
    torch.manual_seed(0)
    model = SMALL[name](num_classes=200).double().eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64, dtype=torch.float64))
    head = model.get_classifier()
    assert logits.shape == (2, 200)
    torch.testing.assert_close(feats["gap_feat"].mean((2, 3)) @ head.weight.T + head.bias, logits)
    assert feats["gap_feat"].shape[-1] >= 2


def test_vgg_pools_once_more_at_64px():
    """Upstream's rule: pool3 only for 64-px inputs, so the last two maps are both 4x4 at 64 and at 32 px."""
    model = vgg8_bn(num_classes=10).eval()
    with torch.no_grad():
        shapes_64 = [tuple(f.shape[2:]) for f in model(torch.randn(1, 3, 64, 64))[1]["feats"]]
        shapes_32 = [tuple(f.shape[2:]) for f in model(torch.randn(1, 3, 32, 32))[1]["feats"]]
    assert shapes_64 == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert shapes_32 == [(32, 32), (16, 16), (8, 8), (4, 4), (4, 4)]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_returned_features_are_never_modified_in_place(name):
    """The explanation module backpropagates through these tensors; an in-place op would bump their version."""
    torch.manual_seed(0)
    model = SMALL[name](num_classes=10).train()
    image = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits, feats = model(image)
    tensors = feats["feats"] + feats["preact_feats"] + [feats["pooled_feat"], feats["gap_feat"]]
    assert all(t._version == 0 for t in tensors)
    loss = logits.sum() + sum(t.square().mean() for t in tensors)
    loss.backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_wrn_gap_feat_is_the_activated_map_not_feats_last():
    torch.manual_seed(0)
    model = _randomise_bn(wrn_16_2(num_classes=10)).eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(feats["gap_feat"], torch.relu(model.bn1(feats["feats"][-1])))
    torch.testing.assert_close(feats["preact_feats"][1], model.block2.layer[0].bn1(feats["feats"][1]))
    assert not torch.equal(feats["gap_feat"], feats["feats"][-1])


def test_wrn_runs_each_batchnorm_once_per_training_step():
    model = wrn_16_2(num_classes=10).train()
    model(torch.randn(4, 3, 32, 32))
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}


@pytest.mark.parametrize(
    "ctor, expected",
    [(ResNet18, [64, 128, 256, 512]), (ResNet50, [256, 512, 1024, 2048])],
    ids=["ResNet18", "ResNet50"],
)
def test_resnetv2_stage_channels_match_bn_before_relu(ctor, expected):
    model = ctor(num_classes=10)
    assert model.get_stage_channels() == expected
    assert [bn.num_features for bn in model.get_bn_before_relu()] == expected


@pytest.mark.parametrize("ctor", [resnet8x4, wrn_16_2, vgg8_bn], ids=lambda c: c.__name__)
def test_bn_before_relu_matches_later_stage_channels(ctor):
    model = ctor(num_classes=10)
    channels = [bn.num_features for bn in model.get_bn_before_relu()]
    assert channels == list(model.get_stage_channels()[1:])


def test_bad_depth_names_the_value():
    with pytest.raises(ValueError, match="depth=10"):
        ResNet(10, [16, 16, 32, 64])
    with pytest.raises(ValueError, match="depth=18"):
        WideResNet(18, num_classes=10)
