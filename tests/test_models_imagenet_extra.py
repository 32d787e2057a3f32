"""ImageNet ResNets against torchvision, local-only pretrained loading, and the contract details of the MobileNet and
ShuffleNet models (upstream key names, preact_feats, stage channels, no in-place edits of returned features)."""
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from mdistiller.models.imagenet import resnet as imagenet_resnet
from mdistiller.models.imagenet.mobilenetv1 import MobileNetV1

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _torchvision_trunk(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision's layer4 output, i.e. the map its avgpool averages."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@pytest.mark.parametrize("arch", RESNETS)
def test_resnet_equals_torchvision_after_loading_its_state_dict(arch):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    for m in reference.modules():  # non-trivial BN statistics, so a misplaced ReLU or BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ours = getattr(imagenet_resnet, arch)(num_classes=10).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = ours(image)
        torch.testing.assert_close(logits, reference(image))
        torch.testing.assert_close(feats["gap_feat"], _torchvision_trunk(reference, image))
    assert [f.shape[1] for f in feats["feats"][1:]] == ours.get_stage_channels()
    assert [bn.num_features for bn in ours.get_bn_before_relu()] == ours.get_stage_channels()[1:]
    for feat, preact in zip(feats["feats"], feats["preact_feats"]):
        torch.testing.assert_close(feat, F.relu(preact))


def test_weight_file_names_are_torchvisions_imagenet1k_v1():
    for arch in RESNETS:
        weights = getattr(torchvision.models, f"ResNet{arch[6:]}_Weights").IMAGENET1K_V1
        assert imagenet_resnet._WEIGHT_FILES[arch][0] == os.path.basename(weights.url)


def test_pretrained_without_cached_file_names_file_and_place(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        imagenet_model_dict["ResNet34"](pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet34-b627a593.pth" in message
    assert os.path.join(str(tmp_path), "checkpoints", "resnet34-b627a593.pth") in message
    assert not (tmp_path / "checkpoints").exists()  # nothing was downloaded or created


@pytest.mark.parametrize("file_name", ["resnet18-f37072fd.pth", "resnet18-5c106cde.pth"])
def test_pretrained_loads_from_the_hub_cache(monkeypatch, tmp_path, file_name):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / file_name)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    ours = imagenet_model_dict["ResNet18"](pretrained=True).eval()
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(image)[0], reference(image))


def test_mobilenetv1_refuses_pretrained_and_takes_num_classes():
    with pytest.raises(ValueError, match="MobileNetV1.*no public"):
        imagenet_model_dict["MobileNetV1"](pretrained=True)
    model = MobileNetV1(num_classes=7).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 7)
    assert [f.shape[1] for f in feats["feats"]] == model.get_stage_channels()
    assert [bn.num_features for bn in model.get_bn_before_relu()] == model.get_stage_channels()


def test_upstream_key_names_and_shapes():
    expected = {
        ("cifar", "MobileNetV2"): {"classifier.0.weight": (100, 1280), "conv2.0.weight": (1280, 160, 1, 1),
                                   "blocks.6.0.conv.7.running_var": (160,)},
        ("cifar", "ShuffleV1"): {"linear.weight": (100, 960), "layer1.0.conv1.weight": (54, 24, 1, 1),
                                 "layer3.3.conv3.weight": (960, 80, 1, 1)},
        ("cifar", "ShuffleV2"): {"linear.weight": (100, 1024), "bn2.weight": (1024,),
                                 "layer3.3.conv3.weight": (232, 232, 1, 1)},
        ("tiny", "MobileNetV2"): {"conv2.weight": (100, 1280, 1, 1), "pre.0.bias": (32,),
                                  "stage7.residual.6.weight": (320, 960, 1, 1)},
    }
    for (zoo, name), keys in expected.items():
        ctor = (cifar_model_dict if zoo == "cifar" else tiny_imagenet_model_dict)[name][0]
        state = ctor(num_classes=100).state_dict()
        assert {k: tuple(state[k].shape) for k in keys} == keys
    state = MobileNetV1().state_dict()
    assert tuple(state["model.13.3.weight"].shape) == (1024, 1024, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 1024)


MODELS = {
    "MobileNetV2": lambda: cifar_model_dict["MobileNetV2"][0](num_classes=10),
    "ShuffleV1": lambda: cifar_model_dict["ShuffleV1"][0](num_classes=10),
    "ShuffleV2": lambda: cifar_model_dict["ShuffleV2"][0](num_classes=10),
    "tiny_MobileNetV2": lambda: tiny_imagenet_model_dict["MobileNetV2"][0](num_classes=10),
    "MobileNetV1": lambda: MobileNetV1(num_classes=10),
    "ResNet18": lambda: imagenet_resnet.resnet18(num_classes=10),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_returned_features_are_never_modified_in_place(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    logits, feats = model(torch.randn(2, 3, 64, 64))
    tensors = feats["feats"] + feats["preact_feats"] + [feats["pooled_feat"], feats["gap_feat"]]
    assert all(t._version == 0 for t in tensors)
    (logits.sum() + sum(t.sum() for t in tensors)).backward()


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_cifar_models_run_at_64px_with_stage_channels(name):
    model = MODELS[name]().eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    assert [f.shape[1] for f in feats["feats"]] == list(model.get_stage_channels())
    assert feats["gap_feat"].shape[-2:] == feats["feats"][-1].shape[-2:]


def test_mobilenet_preact_feats_are_the_activation_inputs():
    torch.manual_seed(0)
    model = MODELS["MobileNetV2"]().eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(feats["feats"][0], F.relu(feats["preact_feats"][0]))
    assert (feats["preact_feats"][0] < 0).any()
    assert all(f is p for f, p in zip(feats["feats"][1:], feats["preact_feats"][1:]))
    assert [bn.num_features for bn in model.get_bn_before_relu()] == model.get_stage_channels()[1:]

    model = MODELS["tiny_MobileNetV2"]().eval()
    with torch.no_grad():
        _, feats = model(torch.randn(2, 3, 64, 64))
    for i in (0, 4):
        torch.testing.assert_close(feats["feats"][i], F.relu6(feats["preact_feats"][i]))
    assert feats["pooled_feat"].shape == (2, 1280)
