"""tools/sweep.py (docs/studies.md): configs × grid × seeds as tools/train.py subprocesses in fixed run directories;
a killed sweep continues where it stopped, a failed run does not stop the others, bad input fails before anything
runs, and the submitit launcher runs the same command."""
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine_train import ROOT, load_tool, one_thread, teacher_file, write_cfg  # noqa: F401

from mdistiller.engine.records import read_metrics, read_results
from mdistiller.launch import sweep as sweep_module
from mdistiller.launch.sweep import parse_grid, plan_runs, split_overrides

SWEEP = load_tool("sweep")
EPOCHS = 4  # a run stopped after its first epoch still has epochs to resume
SEEDS = ("0", "1")
RUNS = [f"{name}/base/seed{seed}" for name in ("kd", "none") for seed in SEEDS]
TIME_COLUMNS = ("train_img_per_s", "epoch_time_s")


@pytest.fixture(scope="module")
def configs(tmp_path_factory, cifar100_root, teacher_file):  # noqa: F811
    """none.yaml and kd.yaml: resnet8 on 48 generated CIFAR-100 images for EPOCHS epochs."""
    base = tmp_path_factory.mktemp("sweep_configs")
    paths = []
    for kind in ("NONE", "KD"):
        path = base / f"{kind.lower()}.yaml"
        os.replace(write_cfg(base, cifar100_root, teacher_file, kind, base / "unused", epochs=EPOCHS), path)
        paths.append(str(path))
    return paths


def sweep_args(configs, out, *extra):
    return ["--cfg", *configs, "--seeds", *SEEDS, "--jobs", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def swept(configs, tmp_path_factory):
    """The uninterrupted sweep: 2 methods × 2 seeds, 2 at a time."""
    out = tmp_path_factory.mktemp("swept") / "out"
    assert SWEEP.main(sweep_args(configs, out)) == 0
    return out


def launches(run: Path):
    return [line for line in (run / "train.log").read_text().splitlines() if line.startswith("$ ")]


def without_times(rows):
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def test_a_sweep_writes_one_finished_record_per_method_and_seed(swept):
    assert sorted(str(p.parent.relative_to(swept)) for p in swept.rglob("results.json")) == RUNS
    for name in RUNS:
        results = read_results(str(swept / name))
        assert results["finished"] is True and results["epoch"] == EPOCHS
        assert results["distiller"] == name.split("/")[0].upper()
        assert results["overrides"] == {"EXPERIMENT.SEED": name[-1]} and results["seed"] == int(name[-1])
        assert len(launches(swept / name)) == 1


def test_a_rerun_skips_finished_runs_and_prints_the_summary(swept, configs, capsys):
    stamps = {name: os.stat(swept / name / "results.json").st_mtime_ns for name in RUNS}
    assert SWEEP.main(sweep_args(configs, swept)) == 0
    captured = capsys.readouterr()
    assert "4 runs under" in captured.err and "4 done, 0 to resume, 0 new" in captured.err
    assert stamps == {name: os.stat(swept / name / "results.json").st_mtime_ns for name in RUNS}
    table = captured.out.splitlines()
    assert table[0].startswith("| dataset | teacher | student | distiller | config_sha | n | seeds |")
    assert [row.split(" | ")[3] for row in table[2:]] == ["KD", "NONE"] and all("| 2 | 0,1 |" in r for r in table[2:])


def test_a_killed_sweep_reruns_to_the_uninterrupted_records_training_nothing_twice(swept, configs, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sweep.py"), *sweep_args(configs, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # stop once a run has recorded its first epoch
        records = [read_results(str(out / name)) or {} for name in RUNS]
        if any(r.get("epoch", 0) >= 1 and not r.get("finished") for r in records):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    finished = {name: os.stat(out / name / "results.json").st_mtime_ns for name in RUNS
                if (read_results(str(out / name)) or {}).get("finished")}
    to_resume = [name for name in RUNS if name not in finished and (out / name / "latest").is_file()]
    assert to_resume, "no run was stopped part-way"

    assert SWEEP.main(sweep_args(configs, out)) == 0
    for name in finished:
        assert os.stat(out / name / "results.json").st_mtime_ns == finished[name]
        assert len(launches(out / name)) == 1
    for name in to_resume:
        assert [("--resume" in line) for line in launches(out / name)] == [False, True]
    for name in RUNS:
        assert len(launches(out / name)) <= 2
        resumed, reference = read_results(str(out / name)), read_results(str(swept / name))
        for key in ("finished", "epoch", "best_acc", "best_epoch", "last_acc", "config_sha"):
            assert resumed[key] == reference[key], (name, key)
        rows = read_metrics(str(out / name))
        assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
        assert without_times(rows) == without_times(read_metrics(str(swept / name)))


def test_a_failed_run_is_reported_and_does_not_stop_the_others(configs, teacher_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    status = SWEEP.main(["--cfg", configs[1], "--grid", f"DISTILLER.TEACHER_CKPT=/nonexistent.pth,{teacher_file}",
                         "--jobs", "2", "--out", str(out), "SOLVER.EPOCHS", "1"])
    err = capsys.readouterr().err
    assert status == 1
    failed = [line for line in err.splitlines() if line.startswith("sweep: failed: ")]
    assert len(failed) == 1 and "/nonexistent.pth" in failed[0] and "train.py: error:" in failed[0]
    records = [read_results(str(path.parent)) for path in out.rglob("results.json")]
    assert [(r["finished"], r["teacher_ckpt"]) for r in records] == [(True, teacher_file)]


def test_dry_run_lists_the_runs_and_their_states_and_runs_nothing(swept, configs, tmp_path, capsys):
    assert SWEEP.main(sweep_args(configs, tmp_path / "new", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 runs: 0 done, 0 to resume, 4 new"
    assert [line.split()[:2] for line in lines[1:]] == [
        ["new", str(tmp_path / "new" / name)] for name in ("none/base/seed0", "none/base/seed1", "kd/base/seed0",
                                                           "kd/base/seed1")]
    assert not (tmp_path / "new").exists()
    assert SWEEP.main(sweep_args(configs, swept, "--dry-run")) == 0
    assert capsys.readouterr().out.startswith("4 runs: 4 done, 0 to resume, 0 new")


@pytest.mark.parametrize("extra, expected", [
    (["SOLVER.LRR", "0.1"], "unknown key SOLVER.LRR (value '0.1'); did you mean SOLVER.LR?"),
    (["--grid", "KD.TEMPERATURE=2,hot"], "KD.TEMPERATURE = 'hot' has type str; expected float"),
    (["--grid", "KD.TEMPERATURE="], "--grid 'KD.TEMPERATURE=': expected KEY=VALUE1,VALUE2,..."),
    (["EXPERIMENT.SEED", "3"], "EXPERIMENT.SEED is set by --seeds"),
])
def test_bad_input_is_one_line_before_anything_runs(configs, tmp_path, capsys, extra, expected):
    assert SWEEP.main(sweep_args(configs, tmp_path / "out") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sweep.py: error: ") and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_directory_holding_another_configs_run_is_refused(swept, configs, capsys):
    assert SWEEP.main(sweep_args(configs, swept) + ["SOLVER.LR", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of another config" in err and "delete that directory or choose another --out" in err


def test_run_directories_are_bounded_single_components_and_overrides_come_last(tmp_path):
    runs = plan_runs(["a/kd.yaml"], [0, 1], parse_grid(["DATASET.ROOT=/x/y,/z", "SOLVER.LR_DECAY_STAGES=[1,2],[3]"]),
                     ["SOLVER.LR", "0.1"], str(tmp_path))
    assert len(runs) == 8 and len({run.run_dir for run in runs}) == 8
    for run in runs:
        label = Path(run.run_dir).relative_to(tmp_path).parts
        assert len(label) == 3 and label[0] == "kd" and len(label[1].encode()) <= 120
        assert run.overrides[:2] == ("SOLVER.LR", "0.1") and run.overrides[-2] == "EXPERIMENT.SEED"
    assert runs[0].overrides[2:6] == ("DATASET.ROOT", "/x/y", "SOLVER.LR_DECAY_STAGES", "[1,2]")
    assert split_overrides(["--seeds", "0", "1", "SOLVER.LR", "0.1"]) == (["--seeds", "0", "1"], ["SOLVER.LR", "0.1"])
    assert split_overrides(["--cfg", "KD.yaml", "--", "x.y", "1"]) == (["--cfg", "KD.yaml"], ["x.y", "1"])


def test_the_submitit_launcher_trains_a_run_as_a_checkpointable_job(configs, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "out"
    assert SWEEP.main(["--cfg", configs[0], "--out", str(out), "--launcher", "slurm", "--submitit-cluster", "local",
                       "--timeout-min", "5", "--slurm-partition", "unused-here", "SOLVER.EPOCHS", "1"]) == 0
    results = read_results(str(out / "none" / "base" / "seed0"))
    assert results["finished"] is True and results["epoch"] == 1
    assert any((out / ".submitit").rglob("*_result.pkl"))
    assert "| NONE |" in capsys.readouterr().out


def test_devices_run_one_child_per_gpu_at_a_time_with_the_cores_shared(monkeypatch, tmp_path):
    started = []

    def spawn(run, env):
        busy = [device for device, proc in started if proc.poll() is None]
        assert env["CUDA_VISIBLE_DEVICES"] not in busy and len(busy) < 2
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, sweep_module.cores() // 2))
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
        started.append((env["CUDA_VISIBLE_DEVICES"], proc))
        return proc

    monkeypatch.setattr(sweep_module, "spawn", spawn)
    runs = plan_runs(["kd.yaml"], range(5), out=str(tmp_path))
    outcome = sweep_module.run_sweep(runs, devices=["0", "1"], states=dict.fromkeys(runs, "new"),
                                     stream=io.StringIO())
    assert len(outcome.finished) == 5 and outcome.exit_code == 0
    assert {device for device, _ in started} == {"0", "1"}


def test_explain_records_follow_the_sweep_and_enter_the_summary(swept, teacher_file, cifar100_root,  # noqa: F811
                                                                tmp_path, capsys):
    """tools/explain_eval.py runs: an explain.json per finished run, equal to the agreement and perturbation
    subcommands run by hand; a second call skips them; the summary gains their columns."""
    import json

    from mdistiller.launch.summary import summary_text

    explain_eval = load_tool("explain_eval")
    argv = ["runs", str(swept), "-t", "resnet8", "-tc", teacher_file, "--num-images", "20", "-bs", "10",
            "--device", "cpu"]
    assert sorted(explain_eval.run(argv)["written"]) == sorted(str(swept / name) for name in RUNS)
    run = swept / RUNS[0]
    record = json.loads((run / "explain.json").read_text())
    common = ["-m", "resnet8", "-c", str(run / "student_latest"), "-d", "cifar100", "--data-root",
              str(cifar100_root), "--num-images", "20", "-bs", "10", "--device", "cpu", "--out", str(tmp_path)]
    agreement = explain_eval.run(["agreement", "-t", "resnet8", "-tc", teacher_file, "--method", "cam",
                                  *common])["results"][0]
    perturbation = explain_eval.run(["perturbation", "--method", "cam", *common])["results"][0]
    assert record["agreement_cosine"] == agreement["cosine"] and record["agreement_iou"] == agreement["iou"]
    assert record["perturbation_auc"] == perturbation["auc"]
    again = explain_eval.run(argv)
    assert again["written"] == [] and len(again["skipped"]) == len(RUNS)
    clone = tmp_path / "clone" / "run"  # committed records come without checkpoints
    shutil.copytree(run, clone, ignore=shutil.ignore_patterns("student_*", "explain.json"))
    assert explain_eval.run(["runs", str(clone.parent), *argv[2:]]) == {"written": [], "skipped": [],
                                                                         "missing": [str(clone)]}
    header = summary_text([str(swept)]).splitlines()[0]
    assert "| agreement cosine | agreement IoU | perturbation AUC |" in header
