"""Exp-KD (docs/expkd.md): the explanation loss trains the student, is per-sample, matches finite differences, and every
shipped Exp-KD / fork CAM config builds and trains."""
import glob
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from mdistiller.distillers import distiller_dict
from mdistiller.distillers.ExpKD import DISTANCES, NORMS, exp_loss, top_classes
from mdistiller.engine.cfg import CFG
from mdistiller.explain import explain_from_features
from mdistiller.models import cifar_model_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBOS = [(n, d) for n in NORMS for d in DISTANCES if d != "kl" or n == "softmax"]


def _cfg(**overrides):
    """CFG with `overrides` set as given (no literal_eval, so a stage index stays the string yacs expects)."""
    cfg = CFG.clone()
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        if not isinstance(value, type(node[leaf])) and not (isinstance(value, int) and isinstance(node[leaf], float)):
            raise TypeError(f"test config {key}={value!r}: default is {node[leaf]!r}")
        node[leaf] = value
    return cfg


def _maps(seed, shape=(3, 4, 8, 8), dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pair(teacher="resnet14", student="resnet8", num_classes=10, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    t = cifar_model_dict[teacher][0](num_classes=num_classes).to(dtype)
    s = cifar_model_dict[student][0](num_classes=num_classes).to(dtype)
    return s, t


def _batch(batch=4, size=16, num_classes=10, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g).to(dtype)
    return image, torch.randint(0, num_classes, (batch,), generator=g)


def _exp_only(**overrides):
    """Config whose total loss is the explanation term alone, warm-up finished at epoch 1."""
    base = {"EXPKD.CE_WEIGHT": 0.0, "EXPKD.KD_WEIGHT": 0.0, "EXPKD.EXP_WEIGHT": 1.0, "EXPKD.WARMUP": 1}
    base.update(overrides)
    return _cfg(**base)


# ---------------------------------------------------------------- the loss on maps


@pytest.mark.parametrize("norm,distance", COMBOS)
@pytest.mark.parametrize("resolution", [0, 2])
def test_exp_loss_is_zero_for_equal_maps_and_positive_otherwise(norm, distance, resolution):
    maps = _maps(0)
    assert exp_loss(maps, maps.clone(), resolution, norm, 2.0, distance).abs().item() < 1e-12
    assert exp_loss(maps, _maps(1), resolution, norm, 2.0, distance).item() > 1e-6


@pytest.mark.parametrize("norm,distance", COMBOS)
def test_exp_loss_is_per_sample_and_per_class(norm, distance):
    student, teacher = _maps(0, (5, 3, 8, 8)), _maps(1, (5, 3, 4, 4))
    per_map = exp_loss(student, teacher, 0, norm, 0.5, distance, reduction="none")
    assert per_map.shape == (5, 3)
    for b in range(5):
        alone = exp_loss(student[b:b + 1], teacher[b:b + 1], 0, norm, 0.5, distance, reduction="none")
        torch.testing.assert_close(alone[0], per_map[b], rtol=0, atol=1e-12)
        for k in range(3):
            single = exp_loss(student[b:b + 1, k:k + 1], teacher[b:b + 1, k:k + 1], 0, norm, 0.5, distance)
            torch.testing.assert_close(single, per_map[b, k], rtol=0, atol=1e-12)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(exp_loss(student[perm], teacher[perm], 0, norm, 0.5, distance), per_map.mean())


def test_exp_loss_reference_values():
    """none+mse is CAT-KD's pooled CAM MSE; softmax+kl is KL(p_t‖p_s) over space; l2+cos is 1 − cos."""
    s, t = _maps(0), _maps(1)
    pooled_s, pooled_t = F.adaptive_avg_pool2d(s, 2), F.adaptive_avg_pool2d(t, 2)
    torch.testing.assert_close(exp_loss(s, t, 2, "none", 1.0, "mse"), F.mse_loss(pooled_s, pooled_t))
    log_s, log_t = F.log_softmax(s.flatten(2) / 3.0, -1), F.log_softmax(t.flatten(2) / 3.0, -1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()
    torch.testing.assert_close(exp_loss(s, t, 0, "softmax", 3.0, "kl"), kl)
    cos = (s.flatten(2) * t.flatten(2)).sum(-1) / (s.flatten(2).norm(dim=-1) * t.flatten(2).norm(dim=-1))
    torch.testing.assert_close(exp_loss(s, t, 0, "l2", 1.0, "cos"), (1 - cos).mean())
    unit_s, unit_t = F.normalize(s.flatten(2), dim=-1), F.normalize(t.flatten(2), dim=-1)
    torch.testing.assert_close(exp_loss(s, t, 0, "l2", 1.0, "mse"), ((unit_s - unit_t) ** 2).mean())


def test_teacher_map_is_resized_to_the_student_map():
    teacher = _maps(1, (2, 3, 8, 8))
    student = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = exp_loss(student, teacher, 0, "none", 1.0, "mse")
    torch.testing.assert_close(loss, F.adaptive_avg_pool2d(teacher, 4).pow(2).mean())
    small_teacher = _maps(2, (2, 3, 2, 2))
    loss_up = exp_loss(student, small_teacher, 0, "none", 1.0, "mse")
    up = F.interpolate(small_teacher, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss_up, up.pow(2).mean())


@pytest.mark.parametrize("norm,distance", COMBOS)
def test_exp_loss_gradcheck(norm, distance):
    student = _maps(0, (2, 2, 4, 4)).requires_grad_(True)
    teacher = _maps(1, (2, 2, 8, 8))
    assert torch.autograd.gradcheck(lambda s: exp_loss(s, teacher, 0, norm, 0.7, distance), (student,))


def test_top_classes():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0]])
    assert top_classes(logits, 2).tolist() == [[1, 2], [0, 3]]
    assert top_classes(logits, 0).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_cam_is_complete():
    """mean_hw CAM + bias = logit for the chosen classes (the maps come from the tensor that feeds the head)."""
    model = _pair(dtype=torch.float64)[0].eval()
    image, _ = _batch(dtype=torch.float64)
    logits, feats = model(image)
    classes = top_classes(logits, 3)
    cam = explain_from_features(model, feats, classes, "cam")
    bias = model.get_classifier().bias[classes]
    torch.testing.assert_close(cam.mean((2, 3)) + bias, logits.gather(1, classes))


# ---------------------------------------------------------------- the distiller


def test_losses_dict_is_weighted_and_warmed_up():
    student, teacher = _pair()
    image, target = _batch()
    cfg = _cfg(**{"EXPKD.CE_WEIGHT": 0.5, "EXPKD.KD_WEIGHT": 2.0, "EXPKD.EXP_WEIGHT": 3.0, "EXPKD.WARMUP": 4})
    distiller = distiller_dict["EXPKD"](student, teacher, cfg).train()
    _, at_1 = distiller(image=image, target=target, epoch=1)
    reference = distiller_dict["EXPKD"](student, teacher, _exp_only()).train()
    _, ref = reference(image=image, target=target, epoch=1)
    assert set(at_1) == {"loss_ce", "loss_kd", "loss_exp"}
    torch.testing.assert_close(at_1["loss_exp"], 3.0 * 0.25 * ref["loss_exp"])
    _, at_8 = distiller(image=image, target=target, epoch=8)
    torch.testing.assert_close(at_8["loss_exp"], 3.0 * ref["loss_exp"])
    logits, _ = student(image)
    torch.testing.assert_close(at_8["loss_ce"], 0.5 * F.cross_entropy(logits, target))


EXPLAINERS = [("cam", "gap"), ("gradcam", "gap"), ("gradcam", "1"), ("lrp", "gap"), ("lrp", "1")]


@pytest.mark.parametrize("pair", [("resnet14", "resnet8"), ("resnet32x4", "ShuffleV1")])
@pytest.mark.parametrize("explainer,layer", EXPLAINERS)
def test_exp_loss_reaches_every_student_parameter_that_feeds_the_maps(pair, explainer, layer):
    """CAM/Grad-CAM at the GAP input use every parameter but the head's bias; Grad-CAM at an inner stage depends
    on the biases of the last layers only through ReLU masks (piecewise constant), so there only weights are required
    to receive a gradient; LRP's stabilised ratios involve every parameter."""
    if pair[1] == "ShuffleV1" and layer != "gap":
        pytest.skip("one inner-layer pair is enough")
    student, teacher = _pair(*pair, num_classes=100 if pair[0] == "resnet32x4" else 10)
    image, target = _batch(size=32, num_classes=student.get_classifier().out_features)
    cfg = _exp_only(**{"EXPKD.EXPLAINER": explainer, "EXPKD.LAYER": layer})
    distiller = distiller_dict["EXPKD"](student, teacher, cfg).train()
    _, losses = distiller(image=image, target=target, epoch=1)
    assert losses["loss_ce"].item() == 0 and losses["loss_kd"].item() == 0
    losses["loss_exp"].backward()
    head_bias = student.get_classifier().bias
    if explainer == "lrp":
        required = list(student.named_parameters())
    elif layer == "gap":
        required = [(name, p) for name, p in student.named_parameters() if p is not head_bias]
    else:
        required = [(name, p) for name, p in student.named_parameters() if p.dim() > 1]
    missing = [name for name, p in required if p.grad is None or p.grad.abs().max().item() == 0]
    assert not missing, f"no gradient from L_exp for {missing}"
    assert all(p.grad is None for p in teacher.parameters())


def test_distiller_loss_is_the_mean_of_per_sample_losses():
    """The student in eval mode (BN with running statistics), so only the loss could couple samples."""
    student, teacher = _pair()
    distiller = distiller_dict["EXPKD"](student, teacher, _exp_only(**{"EXPKD.TOPK": 3})).eval()
    image, target = _batch(batch=5)
    whole = distiller.forward_train(image=image, target=target, epoch=1)[1]["loss_exp"]
    singles = torch.stack([distiller.forward_train(image=image[i:i + 1], target=target[i:i + 1], epoch=1)[1]["loss_exp"]
                           for i in range(5)])
    torch.testing.assert_close(whole, singles.mean())
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(distiller.forward_train(image=image[perm], target=target[perm], epoch=1)[1]["loss_exp"],
                               whole)


@pytest.mark.parametrize("explainer,layer", EXPLAINERS)
def test_full_loss_matches_finite_differences(explainer, layer):
    """Directional derivative of CE + KD + L_exp along a random direction of every student parameter (float64)."""
    student, teacher = _pair(dtype=torch.float64)
    cfg = _cfg(**{"EXPKD.EXPLAINER": explainer, "EXPKD.LAYER": layer, "EXPKD.EXP_WEIGHT": 5.0, "EXPKD.WARMUP": 1,
                  "EXPKD.TOPK": 3})
    distiller = distiller_dict["EXPKD"](student, teacher, cfg).train()
    image, target = _batch(batch=3, size=8, dtype=torch.float64)
    params = [p for p in student.parameters()]

    def total():
        return sum(distiller(image=image, target=target, epoch=1)[1].values())

    loss = total()
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = total().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = total().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-3
    assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (numeric, analytic)


def test_detached_normalizers_reach_the_student_only():
    """EXPKD.DETACH_NORMALIZERS: the same loss, and the student's gradient is the one with frozen LRP normalisers."""
    student, teacher = _pair(dtype=torch.float64)
    image, target = _batch(batch=3, size=8, dtype=torch.float64)
    grads = {}
    for detach in (False, True):
        cfg = _exp_only(**{"EXPKD.EXPLAINER": "lrp", "EXPKD.LAYER": "1", "EXPKD.TOPK": 2,
                           "EXPKD.DETACH_NORMALIZERS": detach})
        distiller = distiller_dict["EXPKD"](student, teacher, cfg).train()
        loss = distiller.forward_train(image=image, target=target, epoch=1)[1]["loss_exp"]
        grads[detach] = (loss.detach(), torch.autograd.grad(loss, list(student.parameters()), allow_unused=True))
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-12, atol=0)
    changed = [not torch.allclose(a, b) for a, b in zip(grads[True][1], grads[False][1]) if a is not None]
    assert changed and any(changed)


# ---------------------------------------------------------------- config errors and the fork's alias


def test_topk_larger_than_the_number_of_classes_is_a_config_error():
    student, teacher = _pair(num_classes=10)
    with pytest.raises(ValueError, match=r"EXPKD\.TOPK: 11, expected 0 .* to 10"):
        distiller_dict["EXPKD"](student, teacher, _cfg(**{"EXPKD.TOPK": 11}))
    with pytest.raises(ValueError, match=r"CAM\.K: 50, expected 0 .* to 10"):
        distiller_dict["CAM"](student, teacher, _cfg())


@pytest.mark.parametrize("key,value,message", [
    ("EXPKD.NORM", "minmax", r"EXPKD\.NORM: 'minmax', expected one of"),
    ("EXPKD.DISTANCE", "l1", r"EXPKD\.DISTANCE: 'l1', expected one of"),
    ("EXPKD.EXPLAINER", "shap", r"EXPKD\.EXPLAINER: 'shap', expected one of"),
    ("EXPKD.RESOLUTION", -1, r"EXPKD\.RESOLUTION: -1"),
    ("EXPKD.DISTANCE", "kl", r"EXPKD\.DISTANCE 'kl' .* EXPKD\.NORM 'softmax'"),
    ("EXPKD.DETACH_NORMALIZERS", True, r"EXPKD\.DETACH_NORMALIZERS: True needs EXPKD\.EXPLAINER 'lrp'"),
])
def test_bad_values_are_config_errors(key, value, message):
    student, teacher = _pair()
    with pytest.raises(ValueError, match=message):
        distiller_dict["EXPKD"](student, teacher, _cfg(**{key: value}))


FORK_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs/cifar100/cam/*.yaml")))


def test_fork_cam_configs_are_shipped():
    assert len(FORK_CONFIGS) >= 11


@pytest.mark.parametrize("path", FORK_CONFIGS, ids=os.path.basename)
def test_fork_cam_configs_load_through_the_alias(path):
    cfg = CFG.clone()
    cfg.merge_from_file(path)
    assert cfg.DISTILLER.TYPE == "CAM"
    student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
    teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
    distiller = distiller_dict["CAM"](student, teacher, cfg).train()
    assert distiller.exp_weight == cfg.CAM.LOSS.FEAT_WEIGHT and distiller.topk == cfg.CAM.K
    assert distiller.temperature == cfg.CAM.T and distiller.ce_weight == cfg.CAM.LOSS.CE_WEIGHT
    image, target = _batch(batch=2, size=32, num_classes=100)
    _, losses = distiller(image=image, target=target, epoch=1)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_exp"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_exp"].item() > 0


# ---------------------------------------------------------------- 2-epoch runs of every shipped Exp-KD config

SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs/cifar100/expkd/*.yaml"))) + sorted(
    glob.glob(os.path.join(REPO, "configs/imagenet/*/cam.yaml")))


def _train_tool():
    spec = importlib.util.spec_from_file_location("_tool_train_expkd", os.path.join(REPO, "tools", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_pair_is_shipped():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs/cifar100/dkd/*.yaml"))}
    assert names and names == {os.path.basename(p) for p in SHIPPED if "/cifar100/" in p}
    assert {p.split(os.sep)[-2] for p in SHIPPED if "/imagenet/" in p} == {"r34_r18", "r50_mv1"}


def _random_teacher(cfg, size: int) -> torch.nn.Module:
    """Random weights with BatchNorm statistics measured on random images, so a deep teacher's outputs stay finite."""
    if cfg.DATASET.TYPE == "imagenet":
        from mdistiller.models import imagenet_model_dict
        teacher = imagenet_model_dict[cfg.DISTILLER.TEACHER](pretrained=False)
    else:
        teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
    for module in teacher.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    teacher.train()
    with torch.no_grad():
        teacher(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0)))
    return teacher.eval()


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_two_epoch_run_of_every_shipped_config(path, tmp_path, cifar100_root, imagenet_root):
    """The config's own pair and loss, a random teacher, on generated data: 8 images in batches of 4, 2 epochs."""
    cfg = CFG.clone()
    cfg.merge_from_file(path)
    imagenet = cfg.DATASET.TYPE == "imagenet"
    teacher_file = tmp_path / "teacher.pth"
    torch.save({"model": _random_teacher(cfg, 224 if imagenet else 32).state_dict()}, teacher_file)
    cfg.merge_from_list([
        "DATASET.ROOT", str(imagenet_root if imagenet else cifar100_root), "DATASET.NUM_WORKERS", 0,
        "DATASET.TRAIN_SUBSET", 4 if imagenet else 8, "DATASET.TEST.BATCH_SIZE", 50,
        "SOLVER.BATCH_SIZE", 2 if imagenet else 4, "SOLVER.EPOCHS", 2, "SOLVER.LR_DECAY_STAGES", [1],
        "DISTILLER.TEACHER_CKPT", str(teacher_file), "LOG.PREFIX", str(tmp_path / "out"), "EXPERIMENT.NAME", "run",
        "EXPERIMENT.SEED", 0])
    short = tmp_path / "cfg.yaml"
    short.write_text(cfg.dump())
    assert _train_tool().main(["--cfg", str(short)]) == 0
    worklog = (tmp_path / "out" / cfg.EXPERIMENT.PROJECT / "run" / "worklog.txt").read_text()
    assert worklog.count("epoch: ") == 2 and "best_acc" in worklog
