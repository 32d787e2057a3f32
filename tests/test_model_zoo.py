"""The model zoo against upstream mdistiller's reference numbers (recorded from its code)."""
import pytest
import torch
import torch.nn as nn

from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict

# name: (params, buffer numel, state_dict entries), 100 classes
CIFAR_COUNTS = {
    "resnet8": (83_892, 681, 56),
    "resnet14": (181_108, 1_135, 92),
    "resnet20": (278_324, 1_589, 128),
    "resnet32": (472_756, 2_497, 200),
    "resnet44": (667_188, 3_405, 272),
    "resnet56": (861_620, 4_313, 344),
    "resnet110": (1_736_564, 8_399, 668),
    "resnet8x4": (1_233_540, 2_762, 62),
    "resnet32x4": (7_433_860, 9_954, 206),
    "ResNet18": (11_220_132, 9_620, 122),
    "ResNet50": (23_705_252, 53_173, 320),
    "wrn_16_1": (180_916, 941, 82),
    "wrn_16_2": (703_284, 1_837, 83),
    "wrn_40_1": (569_780, 2_757, 226),
    "wrn_40_2": (2_255_156, 5_445, 227),
    "vgg8": (3_965_028, 2_949, 37),
    "vgg11": (9_277_284, 5_512, 58),
    "vgg13": (9_462_180, 5_898, 72),
    "vgg16": (14_774_436, 8_461, 93),
    "vgg19": (20_086_692, 11_024, 114),
    "MobileNetV2": (812_836, 18_421, 320),
    "ShuffleV1": (949_258, 23_785, 296),
    "ShuffleV2": (1_355_528, 16_236, 338),
}

TINY_PARAMS = {"ResNet18": 11_271_432, "MobileNetV2": 2_497_480, "ShuffleV2": 1_458_028}
IMAGENET_PARAMS = {
    "ResNet18": 11_689_512,
    "ResNet34": 21_797_672,
    "ResNet50": 25_557_032,
    "ResNet101": 44_549_160,
    "ResNet152": 60_192_808,
    "MobileNetV1": 4_231_976,
}

# name: (feats C×H×W list, pooled_feat dim, stage channels or None), input 2×3×32×32
CIFAR_SHAPES = {
    "resnet8x4": ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256, [32, 64, 128, 256]),
    "resnet32x4": ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256, [32, 64, 128, 256]),
    "wrn_40_2": ([(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 128, [16, 32, 64, 128]),
    "wrn_16_2": ([(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 128, [16, 32, 64, 128]),
    "vgg13": ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512, [64, 128, 256, 512, 512]),
    "vgg8": ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512, [64, 128, 256, 512, 512]),
    "MobileNetV2": ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280, [16, 12, 16, 48, 160]),
    "ShuffleV1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960, None),
    "ShuffleV2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024, [24, 116, 232, 464]),
    "resnet56": ([(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 64, [16, 16, 32, 64]),
    "resnet20": ([(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 64, [16, 16, 32, 64]),
    "ResNet50": (
        [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
        2048,
        [256, 512, 1024, 2048],
    ),
}


def _counts(model: nn.Module):
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return params, buffers, len(model.state_dict())


def _head(model: nn.Module):
    """(W[K, C], b[K]) of the uniform classifier accessor."""
    head = model.get_classifier()
    weight = head.weight.reshape(head.weight.shape[0], -1)
    bias = head.bias if head.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    return weight, bias


def _check_gap_identity(model: nn.Module, image: torch.Tensor):
    model = model.double().eval()
    with torch.no_grad():
        logits, feats = model(image.double())
    weight, bias = _head(model)
    reconstructed = feats["gap_feat"].mean(dim=(2, 3)) @ weight.T + bias
    torch.testing.assert_close(reconstructed, logits, rtol=1e-9, atol=1e-9)
    assert feats["pooled_feat"].dim() == 2
    torch.testing.assert_close(feats["pooled_feat"], feats["gap_feat"].mean(dim=(2, 3)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS))
def test_cifar_counts(name):
    model = cifar_model_dict[name][0](num_classes=100)
    assert _counts(model) == CIFAR_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS))
def test_cifar_gap_feat_identity_and_feature_keys(name):
    torch.manual_seed(0)
    model = cifar_model_dict[name][0](num_classes=100)
    _check_gap_identity(model, torch.randn(2, 3, 32, 32))
    _, feats = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert {"feats", "preact_feats", "pooled_feat", "gap_feat"} <= set(feats)
    assert len(feats["preact_feats"]) == len(feats["feats"])
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        assert feat.shape == preact.shape


@pytest.mark.parametrize("name", sorted(CIFAR_SHAPES))
def test_cifar_feature_shapes(name):
    expected_feats, pooled_dim, stage_channels = CIFAR_SHAPES[name]
    model = cifar_model_dict[name][0](num_classes=100).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == expected_feats
    assert tuple(feats["pooled_feat"].shape) == (2, pooled_dim)
    if stage_channels is not None:
        assert list(model.get_stage_channels()) == stage_channels


@pytest.mark.parametrize("name", sorted(TINY_PARAMS))
def test_tiny_imagenet_models_at_64px(name):
    torch.manual_seed(0)
    model = tiny_imagenet_model_dict[name][0](num_classes=200)
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS[name]
    _check_gap_identity(model, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_models(name):
    torch.manual_seed(0)
    model = imagenet_model_dict[name](pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == IMAGENET_PARAMS[name]
    _check_gap_identity(model, torch.randn(1, 3, 64, 64))


def test_imagenet_feature_shapes_at_224():
    expected = {
        "ResNet18": ([(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)], 512),
        "MobileNetV1": ([(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)], 1024),
    }
    for name, (expected_feats, pooled_dim) in expected.items():
        model = imagenet_model_dict[name](pretrained=False).eval()
        with torch.no_grad():
            logits, feats = model(torch.randn(1, 3, 224, 224))
        assert logits.shape == (1, 1000)
        assert [tuple(f.shape[1:]) for f in feats["feats"]] == expected_feats
        assert tuple(feats["pooled_feat"].shape) == (1, pooled_dim)


def test_resnet18_matches_torchvision():
    """Our ImageNet ResNet uses torchvision's key names and computes the same function."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    ours = imagenet_model_dict["ResNet18"](pretrained=False).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(image)[0], reference(image))


def test_building_a_model_prints_nothing(capsys):
    for name in ("MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet8"):
        cifar_model_dict[name][0](num_classes=100)
    imagenet_model_dict["MobileNetV1"](pretrained=False)
    assert capsys.readouterr().out == ""


def test_state_dict_round_trip_strict():
    """A student file saved as {"model": state_dict} loads back strictly into a freshly built model."""
    for name in ("resnet8x4", "wrn_16_2", "ShuffleV1", "MobileNetV2", "vgg8"):
        source = cifar_model_dict[name][0](num_classes=100)
        target = cifar_model_dict[name][0](num_classes=100)
        target.load_state_dict({"model": source.state_dict()}["model"], strict=True)
