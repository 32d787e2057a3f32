"""Detection distillation (detection/): tiny generated COCO data, tiny images, random weights, CPU only."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detection import engine  # noqa: E402
from detection.config import KD_TYPES, load_cfg  # noqa: E402
from detection.evaluation import coco_box_ap  # noqa: E402
from detection.model import build_distiller, build_student, rcnn_dkd_loss  # noqa: E402
from detection.model.reviewkd import ReviewKDFusion, hcl_loss  # noqa: E402
from mdistiller.distillers.DKD import dkd_loss  # noqa: E402

CATEGORIES = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]
CONFIGS = sorted((REPO / "detection" / "configs").glob("*/*.yaml"))


def _write_split(root: Path, split: str, num_images: int, seed: int) -> None:
    """Coloured rectangles on grey 64x80 images; the colour is the category."""
    rng = np.random.default_rng(seed)
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        pixels = np.full((64, 80, 3), 128, dtype=np.uint8)
        for low, high in ((34, 50), (10, 20)):  # one COCO "medium" and one "small" box per image
            w, h = rng.integers(low, high, size=2)
            x, y = rng.integers(0, 80 - w), rng.integers(0, 64 - h)
            category = int(rng.integers(1, 4))
            pixels[y : y + h, x : x + w] = 0
            pixels[y : y + h, x : x + w, category - 1] = 255
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0}
            )
        name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(root / split / name)
        images.append({"id": image_id, "file_name": name, "width": 80, "height": 64})
    (root / "annotations").mkdir(exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    _write_split(root, "train2017", 4, seed=0)
    _write_split(root, "val2017", 3, seed=1)
    return root


def _tiny_opts(root: Path, out: Path, kd_type: str, teacher_ckpt: str = "", student: str = "resnet18") -> list:
    return [
        "MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", 4, "MODEL.BACKBONE.NAME", student, "MODEL.BACKBONE.WEIGHTS", "",
        "MODEL.BACKBONE.NORM", "BN", "MODEL.BACKBONE.TRAINABLE_LAYERS", 5,
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 100, "MODEL.RPN.PRE_NMS_TOPK_TEST", 100,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", 30, "MODEL.RPN.POST_NMS_TOPK_TEST", 30, "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE", 20,
        "TEACHER.BACKBONE.NAME", "resnet18", "TEACHER.BACKBONE.NORM", "BN", "TEACHER.WEIGHTS", teacher_ckpt,
        # a different normalisation for the teacher, as with Detectron2-style teachers
        "TEACHER.PIXEL_MEAN", "[0.5, 0.5, 0.5]", "TEACHER.PIXEL_STD", "[0.25, 0.25, 0.25]",
        "KD.TYPE", kd_type, "KD.DKD.BETA", 2.0, "KD.DKD.T", 2.0,
        "DATASETS.ROOT", str(root), "INPUT.MIN_SIZE_TRAIN", "[64]", "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE", 96,
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 1, "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.LOG_PERIOD", 1, "TEST.IMS_PER_BATCH", 3, "OUTPUT_DIR", str(out), "SEED", 0,
    ]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, coco_root) -> str:
    """A random R18 detector saved as {"model": state_dict}, as our engine writes student checkpoints."""
    torch.manual_seed(0)
    cfg = load_cfg(None, _tiny_opts(coco_root, Path("unused"), "NONE", student="resnet18"))
    path = tmp_path_factory.mktemp("teacher") / "student_latest"
    torch.save({"model": build_student(cfg).state_dict()}, path)
    return str(path)


def _batch(coco_root: Path):
    from detection.data import CocoDetection, collate

    dataset = CocoDetection(str(coco_root), "train2017", 4, train=True)
    return collate([dataset[0], dataset[1]])


EXPECTED = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}


@pytest.mark.parametrize(
    "kd_type,student,extra",
    [("NONE", "resnet18", set()), ("DKD", "resnet18", {"loss_dkd"}), ("ReviewKD", "resnet18", {"loss_reviewkd"}),
     ("ReviewDKD", "mobilenet_v2", {"loss_dkd", "loss_reviewkd"})],
)
def test_one_iteration_per_kd_type(coco_root, teacher_ckpt, tmp_path, kd_type, student, extra):
    torch.manual_seed(0)
    cfg = load_cfg(None, _tiny_opts(coco_root, tmp_path, kd_type, teacher_ckpt, student))
    distiller = build_distiller(cfg).train()
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()} if distiller.teacher else {}
    optimizer = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=0.01)
    images, targets = _batch(coco_root)
    losses = distiller(images, targets)
    assert set(losses) == EXPECTED | extra
    assert all(math.isfinite(v.item()) for v in losses.values()), losses
    sum(losses.values()).backward()
    optimizer.step()
    assert distiller.student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    if distiller.teacher is not None:
        assert not distiller.teacher.training
        assert all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
        assert all(p.grad is None for p in distiller.teacher.parameters())
    if "loss_reviewkd" in extra:
        assert distiller.kd_trans.abfs[0].conv1[0].weight.grad is not None


def test_dkd_loss_is_dkd_on_matched_roi_logits(coco_root, teacher_ckpt, tmp_path):
    """Capture both detectors' ROI class logits and the sampled ROIs' classes; loss_dkd must be dkd_loss of them."""
    torch.manual_seed(0)
    cfg = load_cfg(None, _tiny_opts(coco_root, tmp_path, "DKD", teacher_ckpt))
    distiller = build_distiller(cfg).train()
    seen = {}
    distiller.student.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o[0]))
    distiller.teacher.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o[0]))
    sample = distiller.student.roi_heads.select_training_samples

    def recording_sample(proposals, targets):
        out = sample(proposals, targets)
        seen["labels"] = torch.cat(out[2])
        return out

    distiller.student.roi_heads.select_training_samples = recording_sample
    losses = distiller(*_batch(coco_root))
    s, t, labels = seen["s"], seen["t"], seen["labels"]
    assert s.shape == t.shape == (labels.numel(), 4)
    assert (labels > 0).any() and (labels == 0).any()  # foreground and background ROIs both distilled
    assert not torch.allclose(s, t)
    expected = dkd_loss(s, t, labels, cfg.KD.DKD.ALPHA, cfg.KD.DKD.BETA, cfg.KD.DKD.T)
    torch.testing.assert_close(losses["loss_dkd"], expected)
    torch.testing.assert_close(rcnn_dkd_loss(s, t, [labels[:5], labels[5:]], 1.0, 2.0, 2.0), expected)


def test_teacher_sees_its_own_normalisation_of_the_same_batch(coco_root, teacher_ckpt, tmp_path):
    cfg = load_cfg(None, _tiny_opts(coco_root, tmp_path, "DKD", teacher_ckpt))
    distiller = build_distiller(cfg).train()
    images, targets = _batch(coco_root)
    images = [images[0], images[1][:, :50, :70]]  # different sizes, so the batch has padding
    image_list, _ = distiller.student.transform(images, targets)
    expected, _ = distiller.teacher.transform(images)  # teacher: eval mode, MIN_SIZE_TEST == MIN_SIZE_TRAIN here
    assert image_list.image_sizes == expected.image_sizes
    torch.testing.assert_close(distiller._teacher_tensors(image_list), expected.tensors, atol=1e-5, rtol=1e-5)


def test_reviewkd_fusion_and_hcl():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, s, s) for s in (16, 8, 4, 2, 1)]
    fusion = ReviewKDFusion([8] * 5, [6] * 5, 4)
    out = fusion(feats)
    assert [o.shape for o in out] == [(2, 6, s, s) for s in (16, 8, 4, 2, 1)]
    # the finest output depends on the coarsest input (the "review" path), the coarsest not on the finest
    coarse = [f.clone().requires_grad_() for f in feats]
    fusion(coarse)[0].sum().backward()
    assert coarse[-1].grad.abs().sum() > 0
    assert hcl_loss(out, [o.detach() for o in out]).item() == 0.0
    teacher = [torch.zeros_like(o) for o in out]
    # 16x16 level: (mse + mse4/2 + mse2/4 + mse1/8) / (1 + 1/2 + 1/4 + 1/8)
    fs = out[0].detach()
    pooled = [torch.nn.functional.adaptive_avg_pool2d(fs, k).pow(2).mean() for k in (4, 2, 1)]
    level0 = (fs.pow(2).mean() + pooled[0] / 2 + pooled[1] / 4 + pooled[2] / 8) / 1.875
    torch.testing.assert_close(hcl_loss(out[:1], teacher[:1]), level0)


def test_horizontal_flip_moves_boxes_with_pixels(coco_root):
    from detection.data import CocoDetection

    plain = CocoDetection(str(coco_root), "train2017", 4, train=True, hflip_prob=0.0)[0]
    flipped = CocoDetection(str(coco_root), "train2017", 4, train=True, hflip_prob=1.0)[0]
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    pairs = zip(plain[1]["boxes"].int().tolist(), flipped[1]["boxes"].int().tolist())
    for (x0, y0, x1, y1), (fx0, fy0, fx1, fy1) in pairs:
        torch.testing.assert_close(flipped[0][:, fy0:fy1, fx0:fx1], plain[0][:, y0:y1, x0:x1].flip(-1))


def test_coco_box_ap_scores_perfect_and_empty_detections(coco_root):
    from detection.data import CocoDetection

    coco = CocoDetection(str(coco_root), "val2017", 4, train=False).coco
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.loadAnns(coco.getAnnIds())
    ]
    ids = coco.getImgIds()
    scores = coco_box_ap(coco, perfect, ids)
    assert [scores[k] for k in ("AP", "AP50", "AP75", "APs", "APm")] == pytest.approx([100.0] * 5)
    wrong_class = [{**d, "category_id": d["category_id"] % 3 + 1} for d in perfect]
    assert coco_box_ap(coco, wrong_class, ids)["AP"] == 0.0
    empty = coco_box_ap(coco, [], ids)
    assert empty["AP"] == 0.0 and math.isnan(empty["APl"])


def test_lr_schedule_warmup_and_steps():
    cfg = load_cfg(str(REPO / "detection/configs/DKD/DKD-R18-R101.yaml"))
    assert engine.lr_at(0, cfg.SOLVER) == pytest.approx(0.01 * 0.001)
    assert engine.lr_at(500, cfg.SOLVER) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert engine.lr_at(1000, cfg.SOLVER) == pytest.approx(0.01)
    assert engine.lr_at(119999, cfg.SOLVER) == pytest.approx(0.01)
    assert engine.lr_at(120000, cfg.SOLVER) == pytest.approx(0.001)
    assert engine.lr_at(170000, cfg.SOLVER) == pytest.approx(0.0001)


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_config_loads(path):
    cfg = load_cfg(str(path))
    if path.parent.name == "Teacher":
        assert cfg.KD.TYPE == "NONE"
        return
    assert cfg.KD.TYPE == path.parent.name == path.stem.split("-")[0]
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (8, 0.01, 180000)
    assert list(cfg.SOLVER.STEPS) == [120000, 160000]
    pair = path.stem.split("-", 1)[1]
    student, teacher = {"R18-R101": ("resnet18", "resnet101"), "R50-R101": ("resnet50", "resnet101"),
                        "MV2-R50": ("mobilenet_v2", "resnet50")}[pair]
    assert (cfg.MODEL.BACKBONE.NAME, cfg.TEACHER.BACKBONE.NAME) == (student, teacher)
    if cfg.KD.TYPE != "DKD":
        assert cfg.KD.REVIEWKD.LOSS_WEIGHT == {"R18-R101": 1.2, "R50-R101": 1.0, "MV2-R50": 2.0}[pair]
    assert cfg.KD.TYPE in KD_TYPES


def test_torchvision_weights_come_from_the_local_cache(coco_root, tmp_path, monkeypatch):
    """Files laid out as torchvision caches them load into our student backbone and R50 teacher (same key layout)."""
    import torchvision
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

    from detection.model.backbone import build_backbone

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    classifier = torchvision.models.resnet18()
    torch.save(classifier.state_dict(), cache / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name)
    backbone = build_backbone("resnet18", "FrozenBN", "torchvision")
    assert torch.equal(backbone.body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    torch.save(classifier.state_dict(), tmp_path / "zoo_resnet18")  # e.g. a classifier checkpoint of our zoo
    backbone = build_backbone("resnet18", "BN", str(tmp_path / "zoo_resnet18"))
    assert torch.equal(backbone.body.conv1.weight, classifier.conv1.weight)
    with pytest.raises(ValueError, match="does not fit resnet34"):
        build_backbone("resnet34", "BN", str(tmp_path / "zoo_resnet18"))

    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(detector.state_dict(), cache / Path(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.url).name)
    opts = _tiny_opts(coco_root, tmp_path, "DKD", "torchvision")
    opts += ["TEACHER.BACKBONE.NAME", "resnet50", "MODEL.NUM_CLASSES", 91]
    teacher = build_distiller(load_cfg(None, opts)).teacher
    teacher_head, student_head = teacher.roi_heads.box_predictor, detector.roi_heads.box_predictor
    assert torch.equal(teacher_head.cls_score.weight, student_head.cls_score.weight)


def test_clear_errors(coco_root, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="COCO data not found.*instances_train2017.json"):
        engine.train(load_cfg(None, _tiny_opts(tmp_path / "nowhere", tmp_path, "NONE")))
    with pytest.raises(FileNotFoundError, match="TEACHER.WEIGHTS: checkpoint file not found"):
        build_distiller(load_cfg(None, _tiny_opts(coco_root, tmp_path, "DKD", str(tmp_path / "missing.pth"))))
    with pytest.raises(ValueError, match="TEACHER.WEIGHTS is empty"):
        build_distiller(load_cfg(None, _tiny_opts(coco_root, tmp_path, "DKD", "")))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    opts = _tiny_opts(coco_root, tmp_path, "DKD", "torchvision") + ["TEACHER.BACKBONE.NAME", "resnet50"]
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        build_distiller(load_cfg(None, opts))
    with pytest.raises(ValueError, match="no COCO Faster R-CNN FPN for 'resnet101'"):
        build_distiller(load_cfg(None, opts[:-1] + ["resnet101"]))
    with pytest.raises(ValueError, match="KD.TYPE: got 'KD'"):
        load_cfg(None, ["KD.TYPE", "KD"])
    with pytest.raises(ValueError, match="MODEL.NUM_CLASSES=3"):
        engine.train(load_cfg(None, _tiny_opts(coco_root, tmp_path, "NONE") + ["MODEL.NUM_CLASSES", 3]))


def test_train_checkpoint_resume_and_eval(coco_root, teacher_ckpt, tmp_path):
    """Train 1 iteration (COCOeval numbers written), resume to 2, then --eval-only the saved student."""
    opts = _tiny_opts(coco_root, tmp_path, "ReviewDKD", teacher_ckpt)
    metrics = engine.train(load_cfg(None, opts))
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if k != "APl")
    assert math.isnan(metrics["APl"])  # no large box in the data: COCOeval's -1 becomes nan
    written = json.loads((tmp_path / engine.EVAL_FILE).read_text())
    assert written["iteration"] == 1 and written["bbox"]["AP"] == pytest.approx(metrics["AP"])
    detections = json.loads((tmp_path / engine.RESULTS_FILE).read_text())
    assert detections and {d["image_id"] for d in detections} <= {1, 2, 3}
    first = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)
    assert first["iteration"] == 1 and not any(k.startswith("teacher.") for k in first["model"])
    assert any(k.startswith("kd_trans.") for k in first["model"])
    assert not list(tmp_path.glob("*.tmp"))

    engine.train(load_cfg(None, opts + ["SOLVER.MAX_ITER", 2]), resume=True)
    second = torch.load(tmp_path / engine.CHECKPOINT, weights_only=True)
    assert second["iteration"] == 2
    key = "student.roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(first["model"][key], second["model"][key])

    student_ckpt = str(tmp_path / engine.STUDENT_CHECKPOINT)
    eval_opts = opts + ["MODEL.WEIGHTS", student_ckpt, "OUTPUT_DIR", str(tmp_path / "eval")]
    again = engine.evaluate_only(load_cfg(None, eval_opts))
    second_metrics = json.loads((tmp_path / engine.EVAL_FILE).read_text())["bbox"]
    assert again["AP"] == pytest.approx(second_metrics["AP"])


@pytest.mark.slow
def test_cli_from_repo_root(coco_root, teacher_ckpt, tmp_path):
    config = REPO / "detection" / "configs" / "DKD" / "DKD-R18-R101.yaml"
    opts = [str(v) for v in _tiny_opts(coco_root, tmp_path, "DKD", teacher_ckpt)]
    result = subprocess.run(
        [sys.executable, "detection/train_net.py", "--config-file", str(config), *opts],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss_dkd" in result.stdout and "bbox AP" in result.stdout
    assert json.loads((tmp_path / engine.EVAL_FILE).read_text())["iteration"] == 1
