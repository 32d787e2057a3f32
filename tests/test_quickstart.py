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


def test_run_config_sets_run_identity_and_scales_the_schedule(tmp_path):
    out = str(tmp_path)
    text, cfg = qs.run_config("expkd_cam", 2, out, 20, "T/student_best")
    base = qs.load_cfg(os.path.join(qs.CONFIG_DIR, "expkd_cam.yaml"))
    assert (cfg.EXPERIMENT.NAME, cfg.EXPERIMENT.SEED, cfg.LOG.PREFIX) == ("expkd_cam_seed2", 2, out)
    assert cfg.DISTILLER.TEACHER_CKPT == "T/student_best"
    assert cfg.SOLVER.EPOCHS == 20 and base.SOLVER.EPOCHS == 40
    assert list(cfg.SOLVER.LR_DECAY_STAGES) == [round(s / 2) for s in base.SOLVER.LR_DECAY_STAGES]
    assert cfg.EXPKD.WARMUP == round(base.EXPKD.WARMUP / 2)
    written = tmp_path / "run.yaml"
    written.write_text(text)
    assert qs.load_cfg(str(written)) == cfg  # what tools/train.py reads is this config
    _, vanilla = qs.run_config("vanilla", 0, out, 0, "T/student_best")
    assert vanilla.DISTILLER.TEACHER_CKPT == "" and vanilla.SOLVER.EPOCHS == 40
    _, lrp = qs.run_config("expkd_lrp", 0, out, 0, "T")
    assert lrp.EXPKD.LAYER == "-2"


def test_train_state_ignores_added_keys_but_not_changed_values(tmp_path):
    step = qs.train_step("kd", 1, str(tmp_path), 0, "T")
    assert qs.train_state(step) == "new"
    os.makedirs(step.run_dir)
    dumped = qs.yaml.safe_load(qs.cfg_to_yaml(step.cfg))
    del dumped["SOLVER"]["MOMENTUM"]
    dumped["SOLVER"]["NEW_KEY"] = 1
    config = os.path.join(step.run_dir, "config.yaml")
    with open(config, "w") as f:
        qs.yaml.safe_dump(dumped, f)
    assert qs.train_state(step) == "stale"  # started, but no checkpoint yet
    open(os.path.join(step.run_dir, "latest"), "w").close()
    with open(os.path.join(step.run_dir, "worklog.txt"), "w") as f:
        f.write("epoch: 1\ntest_acc: 50.00\n")
    assert qs.train_state(step) == "partial"
    open(step.checkpoint("latest"), "w").close()
    with open(os.path.join(step.run_dir, "worklog.txt"), "a") as f:
        f.write("last_acc\t50.00\nbest_acc\t50.00")
    assert qs.train_state(step) == "done"
    dumped["SOLVER"]["LR"] = 0.5
    with open(config, "w") as f:
        qs.yaml.safe_dump(dumped, f)
    assert qs.train_state(step) == "stale"


def test_every_quickstart_config_is_a_valid_run():
    from mdistiller.launch.build import check_names

    for method in [qs.TEACHER, *qs.METHODS]:
        cfg = qs.load_cfg(os.path.join(qs.CONFIG_DIR, f"{method}.yaml"))
        check_names(cfg)
        assert cfg.DATASET.TYPE == "digits" and cfg.EXPERIMENT.NAME == method
        if method != qs.TEACHER:
            assert cfg.DATASET.TRAIN_SUBSET == 200 and cfg.DISTILLER.STUDENT == "resnet8"


def _python_step(tmp_path, name, code, after=()):
    return qs.Step(name, ["-c", code], str(tmp_path / f"{name}.log"), outputs=(), after=list(after))


class _Quiet(qs.Progress):
    def __init__(self):
        super().__init__(0)
        self.lines = []

    def _message(self, text):
        self.lines.append(text)


def test_runner_respects_dependencies_and_stamps_eval_steps(tmp_path):
    marker = tmp_path / "first.txt"
    first = _python_step(tmp_path, "first", f"import time; time.sleep(0.3); open({str(marker)!r}, 'w').write('x')")
    second = _python_step(tmp_path, "second", f"import os; assert os.path.exists({str(marker)!r})", after=[first])
    skipped = _python_step(tmp_path, "skipped", "raise SystemExit(3)")
    progress = _Quiet()
    qs.Runner(2, 1, progress).run([second, first, skipped], skip=lambda s: s is skipped)
    assert marker.exists() and not os.path.exists(skipped.log)
    assert [line.split()[1] for line in progress.lines if "done" in line] == ["first", "second"]
    assert (tmp_path / "second.log.cmd").read_text() == " ".join(second.argv)


def test_runner_stops_on_a_failing_step_and_names_its_log(tmp_path):
    bad = _python_step(tmp_path, "bad", "print('Epoch:1/3| lr:0.1'); print('boom'); raise SystemExit(4)")
    later = _python_step(tmp_path, "later", "pass", after=[bad])
    with open(bad.log + ".cmd", "w") as f:  # the stamp of an earlier success of the same command
        f.write(" ".join(bad.argv))
    with pytest.raises(qs.StepError, match=r"(?s)bad failed \(exit status 4\); log: \S*bad\.log\n.*boom$"):
        qs.Runner(1, 1, _Quiet()).run([bad, later], skip=lambda s: False)
    assert not os.path.exists(later.log)
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
    for run in runs:
        for name in ("config.yaml", "worklog.txt", "latest", "student_latest", "student_best"):
            assert os.path.isfile(os.path.join(out, "runs", run, name)), (run, name)
        assert os.path.isfile(os.path.join(out, "configs", f"{run}.yaml"))
        assert f"tools/train.py --cfg {out}/configs/{run}.yaml" in open(os.path.join(out, "commands.sh")).read()

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
    assert " start " not in again.stdout
    assert stamps == {run: os.path.getmtime(os.path.join(out, "runs", run, "student_latest")) for run in runs}
    assert eval_stamp == os.path.getmtime(os.path.join(out, "eval", "agreement_digits_resnet20.json"))

    teacher = qs.train_step(qs.TEACHER, 0, out, qs.SMOKE["teacher_epochs"], "")
    assert qs.train_state(teacher) == "done"
    assert qs.train_state(qs.train_step(qs.TEACHER, 0, out, 3, "")) == "stale"
    assert qs.train_state(qs.train_step("kd", 0, out, qs.SMOKE["epochs"], "elsewhere/student_best")) == "stale"
