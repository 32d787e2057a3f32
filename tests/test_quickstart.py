"""tools/quickstart.py: README command (1), its pipeline (shortened) end to end, caching, scheduling and the table."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "tools", "quickstart.py")


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qs = load_quickstart()


def fenced_commands(markdown: str):
    """Command lines of the fenced code blocks, in order: comments and blank lines dropped, `$ ` prompts stripped,
    backslash continuations joined."""
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line[2:] if line.startswith("$ ") else line)
    return commands


def test_readme_command_1_is_the_documented_quickstart_command():
    readme = os.path.join(REPO, "README.md")
    assert os.path.isfile(readme), "README.md is missing; its first fenced command must be tools/quickstart.py's"
    with open(readme) as f:
        commands = fenced_commands(f.read())
    assert len(commands) >= 2, f"README.md: expected two fenced commands first, found {commands}"
    assert commands[0] == qs.COMMAND
    assert qs.COMMAND in qs.__doc__
    help_text = subprocess.run([sys.executable, QUICKSTART, "--help"], capture_output=True, text=True, check=True)
    assert qs.COMMAND in " ".join(help_text.stdout.split())


def test_fenced_commands_parser():
    text = "intro\n```bash\n# comment\n$ python3 -m venv .venv && \\\n  .venv/bin/python x.py\n```\n```\ny --z\n```\n"
    assert fenced_commands(text) == ["python3 -m venv .venv && .venv/bin/python x.py", "y --z"]


def test_plan_run_sets_seed_teacher_and_scales_the_schedule(tmp_path):
    out = str(tmp_path)
    run = qs.plan_run("expkd_cam", 2, out, 20, "T/student_best")
    base = qs.load_cfg(os.path.join(qs.CONFIG_DIR, "expkd_cam.yaml"))
    cfg = run.cfg
    assert run.name == "expkd_cam_seed2" and run.run_dir == os.path.join(out, "runs", "expkd_cam_seed2")
    assert cfg.EXPERIMENT.SEED == 2 and cfg.DISTILLER.TEACHER_CKPT == "T/student_best"
    assert cfg.SOLVER.EPOCHS == 20 and base.SOLVER.EPOCHS == 40
    assert list(cfg.SOLVER.LR_DECAY_STAGES) == [round(s / 2) for s in base.SOLVER.LR_DECAY_STAGES]
    assert cfg.EXPKD.WARMUP == round(base.EXPKD.WARMUP / 2)
    command = run.planned.command(resume=False)
    assert command[1:6] == [os.path.join(qs.REPO, "tools", "train.py"), "--cfg",
                            os.path.join(qs.CONFIG_DIR, "expkd_cam.yaml"), "--run-dir", run.run_dir]
    vanilla = qs.plan_run("vanilla", 0, out, 0, "T/student_best").cfg
    assert vanilla.DISTILLER.TEACHER_CKPT == "" and vanilla.SOLVER.EPOCHS == 40
    assert qs.plan_run("expkd_lrp", 0, out, 0, "T").cfg.EXPKD.LAYER == "-2"


def _finish(run, teacher_ckpt=None, teacher_sha=None):
    """A finished record for `run` in its directory, as the trainer writes it."""
    from mdistiller.engine.records import config_sha

    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, "results.json"), "w") as f:
        json.dump({"finished": True, "config_sha": config_sha(run.cfg), "teacher_ckpt": teacher_ckpt,
                   "teacher_ckpt_sha256": teacher_sha, "best_acc": 50.0, "last_acc": 50.0}, f)


def test_train_states_retrain_students_of_another_teacher_and_runs_of_another_config(tmp_path):
    from mdistiller.engine.records import file_sha256

    out = str(tmp_path)
    teacher = qs.plan_run(qs.TEACHER, 0, out, 0, "")
    kd, vanilla = (qs.plan_run(m, 0, out, 0, teacher.checkpoint("best")) for m in ("kd", "vanilla"))
    assert qs.train_states(teacher, [kd, vanilla]) == {qs.TEACHER: "new", "kd_seed0": "new", "vanilla_seed0": "new"}
    _finish(teacher)
    with open(teacher.checkpoint("best"), "w") as f:
        f.write("weights 1")
    _finish(kd, teacher.checkpoint("best"), file_sha256(teacher.checkpoint("best")))
    _finish(vanilla)
    assert set(qs.train_states(teacher, [kd, vanilla]).values()) == {"done"}
    with open(teacher.checkpoint("best"), "w") as f:
        f.write("weights 2")  # a retrained teacher: its students are stale, the vanilla run is not
    assert qs.train_states(teacher, [kd, vanilla]) == {qs.TEACHER: "done", "kd_seed0": "new", "vanilla_seed0": "done"}
    assert not os.path.exists(kd.run_dir)
    shorter = qs.plan_run("vanilla", 0, out, 3, "")  # another schedule in the same directory
    assert qs.train_states(teacher, [shorter])["vanilla_seed0"] == "new" and not os.path.exists(vanilla.run_dir)


def test_every_quickstart_config_is_a_valid_run():
    from mdistiller.launch.build import check_names

    for method in [qs.TEACHER, *qs.METHODS]:
        cfg = qs.load_cfg(os.path.join(qs.CONFIG_DIR, f"{method}.yaml"))
        check_names(cfg)
        assert cfg.DATASET.TYPE == "digits" and cfg.EXPERIMENT.NAME == method
        if method != qs.TEACHER:
            assert cfg.DATASET.TRAIN_SUBSET == 200 and cfg.DISTILLER.STUDENT == "resnet8"


def test_eval_steps_stamp_success_only_and_name_the_log_of_a_failure(tmp_path):
    marker = tmp_path / "out.txt"
    good = qs.EvalStep("good", ["-c", f"open({str(marker)!r}, 'w').write('x')"], str(tmp_path / "good.log"),
                       [str(marker)], [])
    qs.run_eval(good)
    assert qs.eval_done(good) and (tmp_path / "good.log.cmd").read_text() == " ".join(good.argv)
    bad = qs.EvalStep("bad", ["-c", "print('boom'); raise SystemExit(4)"], str(tmp_path / "bad.log"), [], [])
    with open(bad.log + ".cmd", "w") as f:  # the stamp of an earlier success of the same command
        f.write(" ".join(bad.argv))
    with pytest.raises(qs.StepError, match=r"(?s)bad failed \(exit status 4\); log: \S*bad\.log\n.*boom$"):
        qs.run_eval(bad)
    assert not os.path.exists(bad.log + ".cmd")  # a failed or interrupted evaluation never looks finished


def test_markdown_table_has_a_row_per_method_and_std_only_over_several_seeds():
    stats = {"mean": 97.25, "std": 0.5, "n": 3}
    single = {"mean": 0.5, "std": 0.0, "n": 1}
    results = {
        "setup": {"student": "resnet8", "train_subset": 200, "epochs": 40, "steps": 200,
                  "teacher": "resnet20, all, 12 epochs", "seeds": [0, 1, 2]},
        "teacher": {"config": "t.yaml", "best": 99.4, "last": 99.2, "perturbation_auc": 40.0},
        "methods": {
            "kd": {"label": "KD", "config": "kd.yaml", "best_top1": stats, "last_top1": stats,
                   "cam_cosine": single, "cam_iou": single, "perturbation_auc": stats},
        },
    }
    table = qs.markdown(results)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method") and rows[1].startswith("| teacher resnet20")
    assert rows[2] == "| KD | `kd.yaml` | 97.25 ± 0.50 | 97.25 ± 0.50 | 0.500 | 0.500 | 97.25 ± 0.50 |"
    assert qs.COMMAND in table


def test_fresh_removes_only_what_the_quickstart_writes(tmp_path):
    for name in ("runs/kd_seed0", "logs", "eval"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "results.md").write_text("old")
    (tmp_path / "mine.txt").write_text("keep")
    qs.clean(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


@pytest.mark.slow
def test_smoke_pipeline_writes_every_output_and_a_rerun_skips_finished_work(tmp_path):
    out = str(tmp_path / "qs")
    cmd = [sys.executable, QUICKSTART, "--smoke", "--out", out]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    methods = [m for m in qs.METHODS if m not in qs.OPTIONAL_METHODS]
    runs = [qs.TEACHER] + [f"{m}_seed0" for m in methods]

    for name in ("results.md", "results.json", "curves.png", "heatmaps.png", "commands.sh"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 0, path
        assert path in first.stdout, f"{path} not printed"
    for name in ("curves.png", "heatmaps.png", "eval/agreement_digits_resnet20.png",
                 "eval/perturbation_digits_cam_positive.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    commands = open(os.path.join(out, "commands.sh")).read()
    for run in runs:
        for name in ("config.yaml", "worklog.txt", "results.json", "latest", "student_latest", "student_best"):
            assert os.path.isfile(os.path.join(out, "runs", run, name)), (run, name)
        config = "teacher" if run == qs.TEACHER else run.rsplit("_seed", 1)[0]
        assert f"tools/train.py --cfg configs/digits/quickstart/{config}.yaml --run-dir {out}/runs/{run}" in commands

    results = json.load(open(os.path.join(out, "results.json")))
    assert results["command"] == qs.COMMAND
    assert list(results["methods"]) == methods
    assert results["setup"]["epochs"] == qs.SMOKE["epochs"] and results["setup"]["seeds"] == [0]
    for method, entry in results["methods"].items():
        assert [r["seed"] for r in entry["runs"]] == [0]
        for key in ("best_top1", "last_top1", "perturbation_auc"):
            assert 0 <= entry[key]["mean"] <= 100, (method, key)
        assert -1 <= entry["cam_cosine"]["mean"] <= 1 and 0 <= entry["cam_iou"]["mean"] <= 1
        assert entry["best_top1"]["mean"] >= entry["last_top1"]["mean"]
    table = open(os.path.join(out, "results.md")).read()
    assert all(f"| {qs.METHODS[m]} |" in table for m in methods)

    stamps = {run: os.path.getmtime(os.path.join(out, "runs", run, "student_latest")) for run in runs}
    eval_stamp = os.path.getmtime(os.path.join(out, "eval", "agreement_digits_resnet20.json"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(runs)} training runs ({len(runs)} already done)" in again.stdout
    assert "  done   " not in again.stdout
    assert stamps == {run: os.path.getmtime(os.path.join(out, "runs", run, "student_latest")) for run in runs}
    assert eval_stamp == os.path.getmtime(os.path.join(out, "eval", "agreement_digits_resnet20.json"))
