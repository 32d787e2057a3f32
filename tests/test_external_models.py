"""Open models (timm:, torchvision:) and users' registered models under the zoo's contract (docs/models.md): outputs,
tracing, weight files, distillation with zoo models, the tools, and one-line errors."""
import argparse
import copy
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torchvision
from test_engine_train import load_tool, one_thread, write_cfg  # noqa: F401  (autouse fixture)

from mdistiller.engine.config import load_cfg
from mdistiller.engine.records import read_results
from mdistiller.errors import ConfigError
from mdistiller.launch.build import build_distiller, check_names, load_model
from mdistiller.models import build_model, check_model_name, register_model

timm = pytest.importorskip("timm")  # the timm extra (in dev)
ROOT = Path(__file__).resolve().parent.parent
TRAIN = load_tool("train")
EVAL = load_tool("eval")

# name: whether the head is GAP + linear (logits = classifier(pooled_feat)); each has a stem and four stages
MODELS = {
    "timm:resnet18": True,
    "timm:efficientnet_b0": True,
    "timm:mobilenetv3_small_100": False,  # pool -> conv_head -> Hardswish -> classifier
    "timm:regnetx_002": True,
    "timm:convnext_atto": False,  # pool -> LayerNorm -> classifier; feats[0] is the stem timm does not list
    "torchvision:resnet18": True,
    "torchvision:mobilenet_v3_small": False,  # pool -> Linear -> Hardswish -> Dropout -> classifier
}


def original(name: str, num_classes: int) -> torch.nn.Module:
    family, _, arch = name.partition(":")
    if family == "timm":
        return timm.create_model(arch, num_classes=num_classes)
    return torchvision.models.get_model(arch, num_classes=num_classes)


def example_file() -> str:
    """The model file of docs/extending.md, as a user copies it."""
    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(r"<!-- example: my_net.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/extending.md lost its model example"
    return match.group(1)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("name", sorted(MODELS))
def test_open_models_keep_the_contract_and_the_original_logits(name):
    torch.manual_seed(0)
    model = build_model(name, 10, image_size=32).eval()
    reference = original(name, 10).eval()
    reference.load_state_dict(model.state_dict())  # strict: the same keys as the original model
    traced = fx.symbolic_trace(model)
    for size in (32, 64):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            logits, feats = model(x)
            traced_logits, traced_feats = traced(x)
            assert torch.equal(logits, reference(x))
        gap, pooled = feats["gap_feat"], feats["pooled_feat"]
        assert set(feats) == {"feats", "preact_feats", "gap_feat", "pooled_feat"}
        assert logits.shape == (2, 10) and gap.dim() == 4 and pooled.shape == gap.shape[:2]
        torch.testing.assert_close(pooled, gap.mean((2, 3)), rtol=1e-5, atol=1e-6)
        classifier = model.get_classifier()
        assert isinstance(classifier, torch.nn.Linear) and classifier.out_features == 10
        if MODELS[name]:
            torch.testing.assert_close(classifier(pooled), logits)
        sides = [f.shape[-1] for f in feats["feats"]]
        assert len(sides) == 5 and sides == sorted(sides, reverse=True) and sides[-1] == gap.shape[-1]
        assert sides[0] <= size // 2 and all(f.shape[0] == 2 for f in feats["feats"])
        assert torch.equal(traced_logits, logits) and torch.equal(traced_feats["gap_feat"], gap)
        assert torch.equal(traced_feats["pooled_feat"], pooled)
        assert all(torch.equal(a, b) for a, b in zip(traced_feats["feats"], feats["feats"]))


def test_train_mode_deep_copies_and_gradients_follow_the_original():
    torch.manual_seed(0)
    model = build_model("timm:resnet18", 10, image_size=32)
    reference = original("timm:resnet18", 10)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    logits, feats = model(x)  # train mode: batch statistics, running statistics updated as the original's
    assert torch.equal(logits, reference(x))
    assert torch.equal(model.state_dict()["bn1.running_mean"], reference.state_dict()["bn1.running_mean"])
    (logits.sum() + feats["feats"][2].mean()).backward()
    assert model.get_classifier().weight.grad is not None
    frozen = copy.deepcopy(model.eval())  # BatchNorm folding and the EMA copy models
    assert not frozen.training and type(frozen).__name__ == "ExternalModel"
    with torch.no_grad():
        assert torch.equal(frozen(x)[0], model(x)[0])


def _pair_cfg(kind: str, teacher: str, student: str, ckpt: str):
    return load_cfg(None, ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", teacher, "DISTILLER.STUDENT", student,
                           "DISTILLER.TEACHER_CKPT", ckpt])


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A timm resnet18 state dict (timm's own file) and a zoo resnet8 student file, for CIFAR-100."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(1)
    torch.save(timm.create_model("resnet18", num_classes=100).state_dict(), folder / "timm_resnet18.pth")
    torch.save({"model": build_model("resnet8", 100).state_dict()}, folder / "resnet8")
    return {"timm:resnet18": str(folder / "timm_resnet18.pth"), "resnet8": str(folder / "resnet8")}


@pytest.mark.parametrize("kind", ["KD", "DKD", "EXPKD"])  # EXPKD: CAM at gap_feat, its default
@pytest.mark.parametrize("teacher, student", [("timm:resnet18", "resnet8"), ("resnet8", "timm:resnet18")])
def test_a_distillation_step_pairs_an_open_model_with_a_zoo_model(teacher_files, kind, teacher, student):
    cfg = _pair_cfg(kind, teacher, student, teacher_files[teacher])
    distiller = build_distiller(cfg, num_data=8, num_classes=100).train()
    torch.manual_seed(0)
    logits, losses = distiller(image=torch.randn(4, 3, 32, 32), target=torch.randint(0, 100, (4,)), epoch=30)
    total = sum(losses.values())
    total.backward()
    assert logits.shape == (4, 100) and torch.isfinite(total)
    assert all(p.grad is not None for p in distiller.student.get_classifier().parameters())


def test_a_pair_a_method_cannot_connect_is_one_line_naming_method_models_and_shapes(teacher_files):
    cfg = _pair_cfg("FITNET", "resnet8", "timm:mobilenetv3_small_100", teacher_files["resnet8"])
    with pytest.raises(ConfigError) as error:
        build_distiller(cfg, num_data=8, num_classes=100)
    assert re.search(r"DISTILLER.TYPE = 'FITNET' cannot pair DISTILLER.TEACHER = 'resnet8' with DISTILLER.STUDENT = "
                     r"'timm:mobilenetv3_small_100': .*student map 4x4 .* teacher map 16x16", one_line(error))


@pytest.mark.slow
def test_train_runs_with_a_timm_teacher_file(tmp_path, cifar100_root, teacher_files):
    cfg = write_cfg(tmp_path, cifar100_root, teacher_files["timm:resnet18"], "KD", tmp_path / "out", epochs=1)
    run = tmp_path / "run"
    assert TRAIN.main(["--cfg", cfg, "--run-dir", str(run), "DISTILLER.TEACHER", "timm:resnet18"]) == 0
    results = read_results(str(run))
    assert results["finished"] and (results["teacher"], results["student"]) == ("timm:resnet18", "resnet8")
    assert results["teacher_ckpt"] == teacher_files["timm:resnet18"] and (run / "student_best").is_file()


def test_eval_reads_timm_weight_files(tmp_path, cifar100_root, capsys):
    torch.manual_seed(2)
    weights, ema = (timm.create_model("resnet18", num_classes=100).state_dict() for _ in range(2))
    plain, training = tmp_path / "plain.pth", tmp_path / "checkpoint.pth.tar"
    torch.save(weights, plain)
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": weights, "state_dict_ema": ema,
                "args": argparse.Namespace(model="resnet18", lr=0.1)}, training)  # timm train.py's layout
    for path in (plain, training):
        assert EVAL.main(["-m", "timm:resnet18", "-c", str(path), "-d", "cifar100", "DATASET.ROOT",
                          str(cifar100_root)]) == 0
        assert "Top-1" in capsys.readouterr().out
    loaded = load_model("timm:resnet18", "cifar100", 100, str(training)).state_dict()
    assert torch.equal(loaded["fc.weight"], ema["fc.weight"])  # timm's preference: the EMA weights

    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(weights, str(tmp_path / "model.safetensors"))
    loaded = load_model("timm:resnet18", "cifar100", 100, str(tmp_path / "model.safetensors")).state_dict()
    assert torch.equal(loaded["fc.weight"], weights["fc.weight"])


def test_a_registered_model_comes_in_through_experiment_imports(tmp_path):
    (tmp_path / "my_net.py").write_text(example_file())
    cfg = load_cfg(None, ["EXPERIMENT.IMPORTS", f"['{tmp_path / 'my_net.py'}']", "DISTILLER.TYPE", "NONE",
                          "DISTILLER.STUDENT", "my_net"])
    check_names(cfg)
    distiller = build_distiller(cfg, num_data=8, num_classes=10).train()
    _, losses = distiller(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), epoch=1)
    _, feats = distiller.student(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(feats["pooled_feat"], feats["gap_feat"].mean((2, 3)))
    assert torch.isfinite(losses["ce"])
    with pytest.raises(ConfigError, match="reserved for timm: and torchvision:"):
        register_model("timm:mine")
    with pytest.raises(ConfigError, match="the model zoo already has this name"):
        register_model("resnet8")


@pytest.mark.parametrize("name, expected", [
    ("timm:resnet1888", r"^DISTILLER.TEACHER = 'timm:resnet1888' is not a timm model; close names: .*timm:resnet18"),
    ("torchvision:resnet1888", r"^DISTILLER.TEACHER = 'torchvision:resnet1888' is not a torchvision classification "
                               r"model; close names: .*torchvision:resnet18"),
    ("hf:resnet18", r"^DISTILLER.TEACHER = 'hf:resnet18': unknown prefix 'hf:'; expected one of timm:, torchvision:"),
    ("resnet1888", r"^DISTILLER.TEACHER = 'resnet1888' is not in the cifar100 model registry; .*timm:<name>"),
])
def test_unknown_names_are_one_line_errors_at_start(name, expected):
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", name])
    with pytest.raises(ConfigError) as error:
        check_names(cfg)
    assert re.search(expected, one_line(error))


def test_an_open_model_has_no_default_checkpoint():
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "timm:resnet18"])
    with pytest.raises(ConfigError) as error:
        build_distiller(cfg, num_data=8, num_classes=100)
    assert "has no default checkpoint; set DISTILLER.TEACHER_CKPT to its weights file" in one_line(error)
    with pytest.raises(ConfigError) as error:
        load_model("torchvision:resnet18", "cifar100", 100, "pretrain")
    assert one_line(error).endswith("pass -c/--ckpt CKPT (or -c/--ckpt hub for the hub's pretrained weights)")


def test_models_outside_the_contract_and_a_missing_timm_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError) as error:
        build_model("torchvision:squeezenet1_0", 10, key="-m/--model")
    assert "torchvision:squeezenet1_0: its head has no Linear classifier" in one_line(error)
    with pytest.raises(TypeError, match="pass the data set as dataset="):
        build_model("resnet8", 10, "cifar100")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError) as error:
        check_model_name("timm:resnet18", key="DISTILLER.STUDENT")
    assert one_line(error) == "DISTILLER.STUDENT = 'timm:resnet18' needs timm: pip install 'mdistiller[timm]'"


def test_hub_weights_without_network_are_a_one_line_error(monkeypatch, tmp_path, teacher_files):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights either
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1: no minute of retries
    with pytest.raises(ConfigError) as error:
        load_model("torchvision:resnet18", "cifar100", 100, "hub")
    assert re.search(r"^-m/--model = 'torchvision:resnet18': fetching the hub's pretrained weights failed "
                     r"\(URLError: .*network is unreachable.*\); without network, pass a weights file", one_line(error))
    cfg = _pair_cfg("KD", "timm:resnet18", "resnet8", "hub")
    with pytest.raises(ConfigError) as error:
        build_distiller(cfg, num_data=8, num_classes=100)
    assert one_line(error).startswith("DISTILLER.TEACHER = 'timm:resnet18': fetching the hub's pretrained weights")
    with pytest.raises(ConfigError, match="-c/--ckpt hub downloads the hub weights of timm:/torchvision: models"):
        load_model("resnet8", "cifar100", 100, "hub")
    with pytest.raises(ConfigError, match="DISTILLER.TEACHER_CKPT hub downloads .* 'resnet8' is a zoo model"):
        build_distiller(_pair_cfg("KD", "resnet8", "resnet8", "hub"), num_data=8, num_classes=100)
