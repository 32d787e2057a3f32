"""Run records (docs/records.md): results.json and metrics.csv of a run, across a kill and a resume; the config hash;
run directories that stay one path component; overrides the run never reads."""
import csv
import json
from pathlib import Path

import pytest
import torch
from test_engine_train import (  # noqa: F401
    _interrupt_at,
    load_tool,
    one_thread,
    read_worklog,
    teacher_file,
    tensorboard_scalars,
    write_cfg,
)

from mdistiller.engine.config import experiment_name, load_cfg, safe_component
from mdistiller.engine.records import config_sha, read_metrics, read_results

TRAIN = load_tool("train")
RESULT_KEYS = {"finished", "epoch", "epochs", "best_acc", "best_epoch", "last_acc", "seed", "distiller", "teacher",
               "student", "dataset", "overrides", "config_sha", "git_rev", "versions", "wall_time_s", "train_img_per_s"}
TIME_COLUMNS = ("train_img_per_s", "epoch_time_s")


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, cifar100_root, teacher_file):  # noqa: F811
    base = tmp_path_factory.mktemp("kd")
    cfg = write_cfg(base, cifar100_root, teacher_file, "KD", base / "out")
    run = base / "dir"
    assert TRAIN.main(["--cfg", cfg, "--run-dir", str(run), "KD.TEMPERATURE", "2.5"]) == 0
    return run


def test_results_json_holds_the_run_and_matches_the_worklog(kd_run, teacher_file):  # noqa: F811
    results = read_results(str(kd_run))
    assert RESULT_KEYS <= set(results)
    blocks, tail = read_worklog(kd_run / "worklog.txt")
    accs = [block["test_acc"] for block in blocks]
    assert results["finished"] is True and results["epoch"] == results["epochs"] == 2
    assert tail[-1] == f"best_acc\t{results['best_acc']:.2f}" and round(results["best_acc"], 2) == max(accs)
    assert round(results["last_acc"], 2) == accs[-1]
    assert results["best_epoch"] == 1 + accs.index(max(accs))
    assert (results["distiller"], results["teacher"], results["student"], results["dataset"], results["seed"]) == \
        ("KD", "resnet8", "resnet8", "cifar100", 0)
    assert results["overrides"] == {"KD.TEMPERATURE": "2.5"}
    assert results["teacher_ckpt"] == teacher_file and len(results["teacher_ckpt_sha256"]) == 64
    assert results["versions"]["torch"] == torch.__version__
    assert results["wall_time_s"] > 0 and results["train_img_per_s"] > 0
    assert results["config_sha"] == config_sha(load_cfg(str(kd_run / "config.yaml")))
    assert not list(kd_run.parent.glob("out"))  # --run-dir replaces LOG.PREFIX/PROJECT/name


def test_metrics_csv_has_a_row_per_epoch_with_each_loss_term(kd_run):
    rows = read_metrics(str(kd_run))
    blocks, _ = read_worklog(kd_run / "worklog.txt")
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert list(rows[0])[:5] == ["epoch", "lr", "train_loss", "loss_ce", "loss_kd"]
    assert {"train_acc", "train_acc_top5", "test_acc", "test_acc_top5", "test_loss", *TIME_COLUMNS} <= set(rows[0])
    for row, block in zip(rows, blocks):
        assert float(row["loss_ce"]) + float(row["loss_kd"]) == pytest.approx(float(row["train_loss"]), rel=1e-5)
        for key in ("train_acc", "test_acc", "test_loss"):
            assert round(float(row[key]), 2) == block[key]
    assert [float(row["lr"]) for row in rows] == [0.05, pytest.approx(0.005)]  # LR_DECAY_STAGES [1]


def test_a_killed_and_resumed_run_ends_with_the_same_records(kd_run, tmp_path, cifar100_root, teacher_file,  # noqa: F811
                                                             monkeypatch):
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "out")
    run = tmp_path / "resumed"
    args = ["--cfg", cfg, "--run-dir", str(run), "KD.TEMPERATURE", "2.5"]
    with monkeypatch.context() as patch:
        _interrupt_at(2, patch)
        assert TRAIN.main(args) == 130
    interrupted = read_results(str(run))
    assert interrupted["finished"] is False and interrupted["epoch"] == 1
    assert len(read_metrics(str(run))) == 1
    assert TRAIN.main(["--resume"] + args) == 0
    resumed, reference = read_results(str(run)), read_results(str(kd_run))
    assert resumed["wall_time_s"] > interrupted["wall_time_s"]
    for key in ("finished", "epoch", "best_acc", "best_epoch", "last_acc", "config_sha", "overrides"):
        assert resumed[key] == reference[key], key

    def without_times(rows):
        return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]

    assert without_times(read_metrics(str(run))) == without_times(read_metrics(str(kd_run)))


def test_config_sha_ignores_seed_names_and_paths_but_not_the_recipe(tmp_path, cifar100_root, teacher_file):  # noqa: F811
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "out")
    base = config_sha(load_cfg(cfg))
    same = ["EXPERIMENT.SEED", "7", "DATASET.ROOT", "/elsewhere", "DISTILLER.TEACHER_CKPT", "/other/teacher.pth",
            "LOG.PREFIX", "/tmp/x", "EXPERIMENT.NAME", "other", "LOG.WANDB", "True"]
    assert config_sha(load_cfg(cfg, same)) == base
    for key, value in (("SOLVER.LR", "0.1"), ("KD.TEMPERATURE", "2.0"), ("DATASET.TRAIN_SUBSET", "40"),
                       ("DISTILLER.STUDENT", "resnet14")):
        assert config_sha(load_cfg(cfg, [key, value])) != base, key


IMPORTED_DISTILLER = """
from mdistiller.distillers import register_distiller
from mdistiller.distillers.KD import KD


@register_distiller("SHAKD", defaults={"WEIGHT": 1.0})
class ShaKD(KD):
    pass
"""


def test_importing_a_distiller_changes_only_the_sha_of_experiments_that_train_it(tmp_path, cifar100_root,
                                                                                  teacher_file):  # noqa: F811
    """A sweep plans all its configs in one process: a user's distiller imported for one config must not change the
    config_sha of another (its run, trained in a fresh process, would never match again; docs/records.md)."""
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "out")
    base = config_sha(load_cfg(cfg))
    plugin = tmp_path / "sha_kd.py"
    plugin.write_text(IMPORTED_DISTILLER)
    imports = ["EXPERIMENT.IMPORTS", f"['{plugin}']"]
    mine = config_sha(load_cfg(cfg, imports + ["DISTILLER.TYPE", "SHAKD"]))
    assert config_sha(load_cfg(cfg)) == base
    assert config_sha(load_cfg(cfg, imports)) == base
    assert mine != base
    assert config_sha(load_cfg(cfg, imports + ["DISTILLER.TYPE", "SHAKD", "SHAKD.WEIGHT", "2.0"])) != mine


def test_fifteen_overrides_with_paths_give_one_bounded_run_directory(tmp_path, cifar100_root, teacher_file):  # noqa: F811
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "out", epochs=1)
    opts = ["DATASET.ROOT", str(cifar100_root), "DISTILLER.TEACHER_CKPT", teacher_file,
            "SOLVER.LR", "0.04", "SOLVER.MOMENTUM", "0.8", "SOLVER.WEIGHT_DECAY", "0.0004", "KD.TEMPERATURE", "3.0",
            "KD.LOSS.CE_WEIGHT", "0.2", "KD.LOSS.KD_WEIGHT", "0.8", "SOLVER.LR_DECAY_RATE", "0.2",
            "DATASET.TEST.BATCH_SIZE", "25", "EXPERIMENT.TAG", "t", "LOG.TENSORBOARD_FREQ", "0",
            "LOG.SAVE_CHECKPOINT_FREQ", "3", "DATASET.NUM_WORKERS", "0", "SOLVER.BATCH_SIZE", "16"]
    assert len(opts) == 30
    assert TRAIN.main(["--cfg", cfg] + opts) == 0
    projects = list((tmp_path / "out" / "p").iterdir())
    assert len(projects) == 1 and projects[0].is_dir()
    name = projects[0].name
    assert len(name.encode()) <= 120 and "/" not in name
    assert (projects[0] / "latest").is_file() and (projects[0] / "results.json").is_file()
    recorded = read_results(str(projects[0]))["overrides"]
    assert recorded["DATASET.ROOT"] == str(cifar100_root) and recorded["DISTILLER.TEACHER_CKPT"] == teacher_file
    assert len(recorded) == 15


def test_safe_component_keeps_safe_names_and_separates_unsafe_ones():
    cfg = load_cfg(None, ["EXPERIMENT.NAME", "run", "EXPERIMENT.PROJECT", "p"])
    assert experiment_name(cfg, ["SOLVER.LR", "0.1"])[0] == "p/runSOLVER.LR:0.1"  # upstream's readable form
    a, b = safe_component("runDATASET.ROOT:/data/a"), safe_component("runDATASET.ROOT:_data_a")
    assert "/" not in a and a != b and b == "runDATASET.ROOT:_data_a"
    assert safe_component("x" * 500) != safe_component("x" * 499)
    assert all(len(safe_component(n).encode()) <= 120 for n in ("x" * 500, "é" * 300, ".."))
    assert safe_component("..") not in ("", ".", "..")


def test_an_override_the_distiller_never_reads_is_reported(tmp_path, cifar100_root, teacher_file, capsys):  # noqa: F811
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "out", epochs=1)
    assert TRAIN.main(["--cfg", cfg, "DKD.BETA", "2.0", "KD.TEMPERATURE", "3.0"]) == 0
    out = capsys.readouterr().out
    assert "DKD.BETA is set but DISTILLER.TYPE KD never reads it" in out
    assert "KD.TEMPERATURE is set" not in out


def test_tensorboard_gets_each_loss_term_and_the_lr_per_epoch(tmp_path, cifar100_root,  # noqa: F811
                                                              teacher_file, tensorboard_scalars):  # noqa: F811
    scalars = tensorboard_scalars
    cfg = write_cfg(tmp_path, cifar100_root, teacher_file, "KD", tmp_path / "tb")
    assert TRAIN.main(["--cfg", cfg, "--run-dir", str(tmp_path / "run")]) == 0
    per_epoch = {(tag, step): value for tag, step, value in scalars if tag.startswith("train/")}
    assert set(per_epoch) == {(f"train/{name}", epoch) for epoch in (1, 2) for name in ("loss_ce", "loss_kd", "lr")}
    rows = read_metrics(str(tmp_path / "run"))
    for row in rows:
        assert float(row["loss_kd"]) == pytest.approx(per_epoch[("train/loss_kd", int(row["epoch"]))], rel=1e-5)


def test_results_json_is_plain_json_with_a_newline(kd_run):
    text = (kd_run / "results.json").read_text()
    assert text.endswith("\n") and json.loads(text)["finished"] is True
    with open(kd_run / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[0] == "epoch" and Path(kd_run / "metrics.csv").read_text().count("\n") == 3
