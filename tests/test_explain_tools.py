"""tools/explain_eval.py and tools/visualize.py end to end on generated shapes data with tiny random models."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from mdistiller.engine.checkpoint import CheckpointError
from mdistiller.errors import ConfigError
from mdistiller.explain import explain
from mdistiller.explain.metrics import perturbation_auc
from mdistiller.launch import eval_common
from mdistiller.launch.build import load_model
from mdistiller.launch.eval_common import write_shapes_gtsegs
from mdistiller.models import cifar_model_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ev():
    return _load_tool("explain_eval")


@pytest.fixture(scope="module")
def viz():
    return _load_tool("visualize")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two random 4-class resnet8 students: one as a student file, one inside a full distiller checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    a, b = cifar_model_dict["resnet8"][0](num_classes=4), cifar_model_dict["resnet8"][0](num_classes=4)
    torch.save({"model": a.state_dict()}, root / "student_a")
    full = {f"module.student.{k}": v for k, v in b.state_dict().items()}
    full.update({f"module.teacher.{k}": v for k, v in a.state_dict().items()})
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 3, "model": full, "optimizer": optimizer, "best_acc": 1.0}, root / "full_b")
    torch.save(a.state_dict(), root / "bare_a")
    return {"a": str(root / "student_a"), "b": str(root / "full_b"), "bare": str(root / "bare_a"), "models": (a, b)}


def _nonempty(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    if path.endswith(".png"):
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_formats_load_the_student(ckpts, tmp_path):
    a, b = ckpts["models"]
    x = torch.rand(2, 3, 32, 32)
    torch.save({f"module.{k}": v for k, v in a.state_dict().items()}, tmp_path / "data_parallel_a")
    for path, ref in ((ckpts["a"], a), (ckpts["bare"], a), (ckpts["b"], b), (str(tmp_path / "data_parallel_a"), a)):
        model = load_model("resnet8", "shapes", 4, path)
        assert not model.training
        assert torch.equal(model(x)[0], ref.eval()(x)[0]), path
    random = load_model("resnet8", "shapes", 4, "none")
    assert not random.training and random(x)[0].shape == (2, 4)
    with pytest.raises(ConfigError, match="'resnet9000' is not in the shapes model registry"):
        load_model("resnet9000", "shapes", 4, "none")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model("resnet8", "shapes", 4, "/nonexistent/ckpt")


def _one_error_line(capsys, prog, *fragments):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_model_errors_are_one_line(ev, viz, ckpts, tmp_path, capsys):
    shapes = ["-d", "shapes", "--num-images", "4", "--out", str(tmp_path / "out")]
    assert ev.main(["perturbation", "-m", "resnet9000", "-c", "none", *shapes]) == 2
    _one_error_line(capsys, "explain_eval.py", "-m/--model = 'resnet9000' is not in the shapes model registry")
    assert ev.main(["agreement", "-t", "resnet9000", "-m", "resnet8", "-c", "none", *shapes]) == 2
    _one_error_line(capsys, "explain_eval.py", "-t/--teacher = 'resnet9000'")
    assert ev.main(["perturbation", "-m", "resnet8", "-c", "/nonexistent/ckpt", *shapes]) == 1
    _one_error_line(capsys, "explain_eval.py", "checkpoint not found: /nonexistent/ckpt")
    assert ev.main(["perturbation", "-m", "resnet8", "-c", "none", "-d", "nosuchdata"]) == 2
    _one_error_line(capsys, "explain_eval.py", "-d/--dataset = 'nosuchdata' is unknown")
    viz_out = ["--out", str(tmp_path / "heat.png")]
    assert viz.main(["heatmaps", "-m", "resnet9000", "-c", "none", *shapes[:-2], *viz_out]) == 2
    _one_error_line(capsys, "visualize.py", "-m/--model = 'resnet9000' is not in the shapes model registry")
    assert viz.main(["corr", "-t", "resnet8", "-tc", "/nonexistent/ckpt", "-m", "resnet8", "-c", ckpts["a"],
                     *shapes[:-2], *viz_out]) == 1
    _one_error_line(capsys, "visualize.py", "checkpoint not found: /nonexistent/ckpt", "-tc/--teacher-ckpt")
    with pytest.raises(ConfigError):  # --debug: the exception itself, for its traceback
        ev.main(["perturbation", "-m", "resnet9000", "-c", "none", *shapes, "--debug"])


def test_main_returns_the_exit_status(ev, viz, tmp_path, capsys):
    assert ev.main(["perturbation", "-m", "resnet8", "-c", "none", "-d", "shapes", "--num-images", "4", "-bs", "4",
                    "--out", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "perturbation_shapes_cam_positive.json")
    assert viz.main(["curves", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c.png")]) == 1
    _one_error_line(capsys, "visualize.py", "missing.txt")


def test_perturbation_tool(ev, ckpts, tmp_path):
    out = str(tmp_path / "out")
    argv = ["perturbation", "-m", "resnet8", "-c", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"], "--labels", "A", "B",
            "-d", "shapes", "--num-images", "8", "-bs", "4", "--method", "cam", "--out", out,
            "--cache-dir", str(tmp_path / "cache")]
    res = ev.run(argv)
    for suffix in (".json", ".png"):
        _nonempty(os.path.join(out, "perturbation_shapes_cam_positive" + suffix))
    with open(os.path.join(out, "perturbation_shapes_cam_positive.json")) as f:
        saved = json.load(f)
    assert [r["label"] for r in saved["results"]] == ["A", "B"]
    for r in saved["results"]:
        assert len(r["accuracies"]) == 10 and r["num_images"] == 8
        assert r["auc"] == pytest.approx(perturbation_auc(r["accuracies"]))
    assert len(os.listdir(tmp_path / "cache")) == 2
    assert ev.run(argv)["results"][0]["accuracies"] == res["results"][0]["accuracies"]  # from the cache
    neg = ev.run(argv[:-2] + ["--negative"])
    assert neg["test"] == "negative"
    _nonempty(os.path.join(out, "perturbation_shapes_cam_negative.png"))
    with pytest.raises(ValueError, match="one -c per -m"):
        ev.run(["perturbation", "-m", "resnet8", "-m", "resnet8", "-c", "none", "-d", "shapes"])


def test_segmentation_tool(ev, ckpts, tmp_path):
    data = str(tmp_path / "gtsegs_shapes.mat")
    write_shapes_gtsegs(data, 6, size=32)
    out = str(tmp_path / "seg")
    res = ev.run(["segmentation", "--data", data, "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--method", "cam",
                   "-bs", "4", "--num-examples", "3", "--out", out])
    scores = res["results"][0]
    assert scores["num_images"] == 6
    for k in ("pixel_accuracy", "miou", "map", "f1"):
        assert 0.0 <= scores[k] <= 1.0
    for suffix in (".json", ".png"):
        _nonempty(os.path.join(out, "segmentation_gtsegs_shapes_cam" + suffix))
    with pytest.raises(FileNotFoundError, match="--data"):
        ev.run(["segmentation", "--data", str(tmp_path / "missing.mat"), "-m", "resnet8", "-c", "none",
                 "-d", "shapes"])


def test_agreement_tool(ev, ckpts, tmp_path):
    out = str(tmp_path / "agree")
    res = ev.run(["agreement", "-t", "resnet8", "-tc", ckpts["a"], "-m", "resnet8", "-c", ckpts["bare"],
                   "-m", "resnet8", "-c", ckpts["b"], "--labels", "same", "other", "-d", "shapes",
                   "--num-images", "8", "--method", "cam", "gradcam", "--out", out])
    by = {(r["label"], r["method"]): r for r in res["results"]}
    for method in ("cam", "gradcam"):
        assert by[("same", method)]["cosine"] == pytest.approx(1.0, abs=1e-5)  # positive control: identical weights
        assert by[("same", method)]["iou"] == pytest.approx(1.0)
    assert by[("other", "cam")]["cosine"] < 0.99 and by[("other", "cam")]["iou"] < 1.0
    for suffix in (".json", ".png"):
        _nonempty(os.path.join(out, "agreement_shapes_resnet8" + suffix))


def test_visualize_figures(viz, ckpts, tmp_path):
    common = ["-d", "shapes", "--num-images", "24"]
    viz.run(["heatmaps", "-m", "resnet8", "-c", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"], "--method", "cam",
              "--num-images", "3", "-d", "shapes", "--out", str(tmp_path / "heat.png")])
    viz.run(["tsne", "-m", "resnet8", "-c", ckpts["a"], *common, "--perplexity", "5",
              "--out", str(tmp_path / "tsne.png")])
    same = viz.run(["corr", "-t", "resnet8", "-tc", ckpts["a"], "-m", "resnet8", "-c", ckpts["bare"],
                     "-m", "resnet8", "-c", ckpts["b"], "--labels", "same", "other", *common,
                     "--out", str(tmp_path / "corr.png")])
    assert same["same"]["max"] == 0.0 and same["other"]["max"] > 0.0
    for name in ("heat.png", "tsne.png", "corr.png", "corr.json"):
        _nonempty(str(tmp_path / name))


def test_class_correlation_difference(viz):
    labels = np.array([0, 0, 1, 2])
    logits = np.array([[2.0, 0, 0], [4.0, 2, 0], [0, 1, 0], [0, 0, 3]])
    assert np.allclose(viz.class_mean_logits(logits, labels, 3), [[3, 1, 0], [0, 1, 0], [0, 0, 3]])
    diff = viz.correlation_difference(logits, logits + np.eye(3)[[1, 1, 1, 1]], labels, 3)
    assert np.allclose(diff, [[0, 1, 0], [0, 0, 0], [0, 1, 0]])  # the diagonal (own class) is zeroed
    with pytest.raises(ValueError, match="no image"):
        viz.class_mean_logits(logits, labels, 4)


def test_training_curves_from_worklogs(viz, tmp_path):
    paths = []
    for run, slope in (("kd", 8.0), ("expkd", 9.0)):
        (tmp_path / run).mkdir()
        lines = []
        for epoch in range(1, 5):
            lines += ["-" * 25, f"epoch: {epoch}", "lr: 0.05", f"train_acc: {slope * epoch:.2f}",
                      f"train_loss: {4 / epoch:.2f}", f"test_acc: {slope * epoch - 1:.2f}", "-" * 25]
        (tmp_path / run / "worklog.txt").write_text("\n".join(lines) + f"\nbest_acc\t{4 * slope - 1:.2f}")
        paths.append(str(tmp_path / run / "worklog.txt"))
    log = viz.parse_worklog(paths[1])
    assert log["epoch"] == [1, 2, 3, 4] and log["test_acc"] == [8.0, 17.0, 26.0, 35.0] and log["best_acc"] == 35.0
    res = viz.run(["curves", *paths, "--labels", "KD", "Exp-KD", "--out", str(tmp_path / "curves.png")])
    assert res["best_acc"] == {"KD": 31.0, "Exp-KD": 35.0} and "lr" not in res["metrics"]
    _nonempty(str(tmp_path / "curves.png"))
    (tmp_path / "bad.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        viz.parse_worklog(str(tmp_path / "bad.txt"))



def test_layer_defaults_per_method(ev):
    # at "gap" LRP and gradient x input would rank pixels exactly like CAM, so they default to the input pixels
    assert [eval_common.resolve_layer(m, None) for m in ("cam", "gradcam", "lrp", "gradient_input")] == [
        "gap", "gap", "input", "input"]
    assert eval_common.resolve_layer("lrp", 2) == 2 and ev.build_parser().parse_args(
        ["perturbation", "-m", "resnet8", "--layer", "1"]).layer == 1


# ---------------------------------------------------------------------------------------------------- records, options


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_per_image_records_match_the_aggregates(ev, ckpts, tmp_path):
    out = str(tmp_path / "out")
    common = ["-d", "shapes", "--num-images", "10", "-bs", "4", "--out", out]
    pert = ev.run(["perturbation", "-m", "resnet8", "-c", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"],
                   "--labels", "A", "B", "--method", "gradcam", *common])
    rows = _csv(os.path.join(out, "perturbation_shapes_gradcam_positive.csv"))
    for r in pert["results"]:
        mine = [row for row in rows if row["model"] == r["label"]]
        assert [int(row["image"]) for row in mine] == list(range(10))  # one row per image
        for f, acc in zip(r["fractions"], r["accuracies"]):
            assert np.mean([int(row[f"correct_at_{round(100 * f)}"]) for row in mine]) == pytest.approx(acc)
        aucs = [float(row["auc"]) for row in mine]
        assert np.mean(aucs) == pytest.approx(r["auc"]) and r["uncertainty"]["auc"]["std"] == pytest.approx(
            np.std(aucs, ddof=1))
        assert r["clean_accuracy"] == pytest.approx(np.mean([row["pred"] == row["label"] for row in mine]))
        low, high = r["uncertainty"]["auc"]["ci95"]
        assert low <= r["auc"] <= high
    assert pert["ties"] == "random" and pert["better"] == "lower AUC"

    data = str(tmp_path / "gtsegs_shapes.mat")
    write_shapes_gtsegs(data, 7, size=32)
    seg = ev.run(["segmentation", "--data", data, "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "-bs", "3",
                  "--out", out])["results"][0]
    rows = _csv(os.path.join(out, "segmentation_gtsegs_shapes_cam.csv"))
    assert [int(row["image"]) for row in rows] == list(range(7))
    for k in ("map", "f1"):
        assert np.mean([float(row[k]) for row in rows]) == pytest.approx(seg[k])
    assert seg["uncertainty"]["miou"]["interval"].startswith("bootstrap")

    agree = ev.run(["agreement", "-t", "resnet8", "-tc", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"], "-d", "shapes",
                    "--num-images", "6", "-bs", "4", "--method", "cam", "gradcam", "--out", out])
    rows = _csv(os.path.join(out, "agreement_shapes_resnet8.csv"))
    assert len(rows) == 2 * 6
    for r in agree["results"]:
        mine = [row for row in rows if row["method"] == r["method"]]
        assert np.mean([float(row["cosine"]) for row in mine]) == pytest.approx(r["cosine"])
        assert np.mean([float(row["iou"]) for row in mine]) == pytest.approx(r["iou"])
        assert r["student_accuracy"] == pytest.approx(np.mean([row["student_pred"] == row["label"] for row in mine]))


def test_tie_option_and_seed(ev, ckpts, tmp_path):
    argv = ["perturbation", "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--num-images", "6", "-bs", "6",
            "--method", "gradcam", "--out", str(tmp_path)]
    runs = {t: ev.run(argv + ["--ties", t])["results"][0] for t in ("random", "raster", "topk")}
    assert ev.run(argv + ["--ties", "random"])["results"][0]["accuracies"] == runs["random"]["accuracies"]
    assert all(r["num_images"] == 6 for r in runs.values())
    assert ev.build_parser().parse_args(["perturbation", "-m", "resnet8"]).ties == "random"


def test_lrp_options(ev, ckpts, tmp_path, capsys):
    p = ev.build_parser()
    args = p.parse_args(["perturbation", "-m", "resnet8", "--method", "lrp", "--rule", "epsilon_gamma_box",
                         "--zero-bias", "--layer", "1"])
    assert (args.rule, args.zero_bias, args.layer) == ("epsilon_gamma_box", True, 1)
    model = load_model("resnet8", "shapes", 4, ckpts["a"])
    x, classes = torch.rand(2, 3, 32, 32), torch.tensor([0, 3])
    for rule, zero_bias, layer in (("epsilon_gamma_box", True, None), ("zplus", False, 1)):
        fn = eval_common.make_map_fn(model, "lrp", layer, rule=rule, zero_bias=zero_bias)
        ref = explain(model, x, classes[:, None], method="lrp", layer=layer if layer is not None else "input",
                      rule=rule, zero_bias=zero_bias)[:, 0]
        assert torch.equal(fn(x, classes), ref)
    assert not torch.equal(eval_common.make_map_fn(model, "lrp", None, rule="zplus")(x, classes),
                           eval_common.make_map_fn(model, "lrp", None)(x, classes))
    res = ev.run(["perturbation", "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--num-images", "4",
                  "--method", "lrp", "--rule", "zplus", "--zero-bias", "--out", str(tmp_path)])
    assert (res["rule"], res["zero_bias"], res["layer"]) == ("zplus", True, {"lrp": "input"})
    assert ev.main(["perturbation", "-m", "resnet8", "-c", "none", "-d", "shapes", "--num-images", "4",
                    "--rule", "zplus", "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "explain_eval.py", "--rule: LRP options, given without --method lrp")


def test_help_keeps_lines_and_says_how_to_read(ev, viz):
    top = ev.build_parser().format_help()
    assert "ckpt/student_best \\\n        -d cifar100" in top  # the continuation lines stay lines
    sub = ev.build_parser()._subparsers._group_actions[0].choices
    for name, words in (("perturbation", ("lower is better", "[0, 90]", "clean accuracy", "robustness")),
                        ("segmentation", ("higher is better", "[0, 1]", "bootstrap")),
                        ("agreement", ("[-1, 1]", "not measure map quality", "clean accuracy"))):
        text = sub[name].format_help()
        for w in words:
            assert w in text, (name, w)
    assert "\n    python tools/visualize.py tsne" in viz.build_parser().format_help()


def test_imagenet_perturbation_transform(imagenet_root, ev, monkeypatch):
    from PIL import Image
    from torchvision import transforms

    def load(center_crop):
        args = ev.build_parser().parse_args(["perturbation", "-m", "ResNet18", "-d", "imagenet", "--data-root",
                                             str(imagenet_root), "-bs", "4", *(["--center-crop"] * center_crop)])
        assert args.center_crop == center_crop
        loader, _, num_classes = eval_common.load_eval_data(args, center_crop=args.center_crop)
        return loader, num_classes

    (loader, num_classes), (cropped, _) = load(False), load(True)
    assert num_classes == 1000
    path = loader.dataset.samples[0][0]
    with open(path, "rb") as f:
        pil = Image.open(f).convert("RGB")  # 48x40: the aspect ratio is not kept by the reference's resize
    images, _ = next(iter(loader))
    assert images.shape[1:] == (3, 224, 224) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images[0], transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])(pil))
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(pil)
    assert torch.equal(next(iter(cropped))[0][0], crop) and not torch.equal(crop, images[0])
    # the perturbation subcommand hands the flag on (stopped before any model runs)
    seen = []

    def fake_load(args, center_crop=True):
        seen.append(center_crop)
        raise RuntimeError("stop")

    monkeypatch.setattr(ev, "load_eval_data", fake_load)
    for flag in ([], ["--center-crop"]):
        with pytest.raises(RuntimeError, match="stop"):
            ev.run(["perturbation", "-m", "resnet8", "-c", "none", "-d", "cifar100", *flag])
    assert seen == [False, True]


def test_visualize_out_folder_and_images_beyond_one_batch(viz, ckpts, tmp_path, capsys):
    folder = tmp_path / "figs"
    res = viz.run(["heatmaps", "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--num-images", "5", "-bs", "2",
                   "--out", str(folder)])
    assert res["num_images"] == 5  # three batches of 2, cut to 5
    _nonempty(str(folder / "heatmaps.png"))
    assert not (tmp_path / "figs.png").exists()
    assert f"wrote {folder / 'heatmaps.png'}" in capsys.readouterr().out
    viz.run(["corr", "-t", "resnet8", "-tc", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"], "-d", "shapes",
             "--num-images", "8", "--out", str(folder)])
    for name in ("corr.png", "corr.json"):
        _nonempty(str(folder / name))
    viz.run(["heatmaps", "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--num-images", "2",
             "--out", str(tmp_path / "named.png")])
    _nonempty(str(tmp_path / "named.png"))


def test_map_cache_is_shared_by_the_subcommands(ev, ckpts, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    common = ["-d", "shapes", "--num-images", "6", "--cache-dir", str(cache), "--out", str(tmp_path / "out")]
    ev.run(["perturbation", "-m", "resnet8", "-c", ckpts["a"], "-bs", "4", *common])
    assert len(os.listdir(cache)) == 1
    calls = []
    real = eval_common.explain

    def counting(*a, **k):
        calls.append(k["method"])
        return real(*a, **k)

    monkeypatch.setattr(eval_common, "explain", counting)
    # the teacher's maps (its own prediction, same data) come from the perturbation run, even at another batch size
    ev.run(["agreement", "-t", "resnet8", "-tc", ckpts["a"], "-m", "resnet8", "-c", ckpts["b"], "-bs", "3", *common])
    assert len(calls) == 2 and len(os.listdir(cache)) == 2  # only the student's two batches were explained
    data = str(tmp_path / "gtsegs.mat")
    write_shapes_gtsegs(data, 4, size=32)
    seg = ["segmentation", "--data", data, "-m", "resnet8", "-c", ckpts["a"], "-d", "shapes", "--cache-dir",
           str(cache), "--out", str(tmp_path / "out")]
    first = ev.run(seg)
    calls.clear()
    assert ev.run(seg)["results"] == first["results"] and calls == []
    ev.run(["perturbation", "-m", "resnet8", "-c", "none", *common])  # random weights: never cached
    assert len(os.listdir(cache)) == 3


def test_map_cache_unit(tmp_path):
    maps = torch.arange(10.0).view(10, 1, 1)
    calls = []

    def map_fn(x, classes):
        calls.append(x.shape[0])
        return maps[x[:, 0, 0, 0].long()]

    x = torch.arange(10.0).view(10, 1, 1, 1)
    first = eval_common.MapCache(str(tmp_path), {"model": "m", "method": "cam"})
    fn = first.wrap(map_fn)
    assert torch.equal(torch.cat([fn(x[:4], None), fn(x[4:], None)]), maps)
    first.save()
    again = eval_common.MapCache(str(tmp_path), {"model": "m", "method": "cam"})
    fn = again.wrap(map_fn)
    assert torch.equal(torch.cat([fn(x[i : i + 3], None) for i in range(0, 10, 3)]), maps) and calls == [4, 6]
    with pytest.raises(ValueError, match="holds 10 maps"):
        fn(x[:1], None)
    other = eval_common.MapCache(str(tmp_path), {"model": "m", "method": "gradcam"})
    assert other.stored is None and other.path != again.path
    assert eval_common.MapCache("", {"model": "m"}).path is None
