"""The Fashion-MNIST study (benchmarks/results/fashion_mnist/README.md): the README's table is what
tools/summarize.py prints for the committed records, the study's configs build their distillers, and the study's
pipeline (teacher, sweep, explanation records, summary) runs end to end on generated IDX files."""
import json
import re
from pathlib import Path

import pytest
import torch
from generated_data import write_idx
from test_engine_train import load_tool

from mdistiller.distillers import distiller_class
from mdistiller.engine.config import load_cfg
from mdistiller.launch.build import check_names
from mdistiller.launch.summary import summary_text
from mdistiller.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "results" / "fashion_mnist"
CONFIGS = sorted((ROOT / "configs" / "fashion_mnist").glob("*.yaml"))
STUDY = ["vanilla", "kd", "dkd", "catkd", "catkd_mv2", "expkd_cam", "expkd_gradcam", "expkd_lrp"]
WITHOUT_CHECKPOINTS = {("MobileNetV2", "dkd"), ("MobileNetV2", "catkd_mv2")}
TABLE = re.compile(r"<!-- fashion_mnist table: (.*?) -->\n(.*?)\n<!-- end of table -->", re.S)


def test_readme_table_is_the_summary_of_the_committed_records():
    match = TABLE.search((ROOT / "README.md").read_text())
    assert match, "README.md lost its Fashion-MNIST table (between its markers)"
    command = match.group(1).split()
    assert command[:3] == ["python3", "tools/summarize.py", "benchmarks/results/fashion_mnist"]
    group_by = command[command.index("--group-by") + 1:command.index("--baseline")]
    baseline = command[command.index("--baseline") + 1]
    assert match.group(2) + "\n" == summary_text([str(RECORDS)], group_by=group_by, baseline=baseline)


def test_the_study_records_are_finished_text_records():
    """Every run of the study is in (the teacher; 7 methods x 2 pairs x 3 seeds), finished, distilled from one teacher
    file, and with explanation metrics on 500 test images, except the runs whose checkpoints were lost before the
    explain phase (benchmarks/results/fashion_mnist/README.md)."""
    runs = [path.parent for path in RECORDS.rglob("results.json")]
    assert len(runs) == 1 + 7 * 2 * 3
    teacher_files, explained_with = set(), set()
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert results["finished"] is True, run
        if results["distiller"] != "NONE":
            teacher_files.add(results["teacher_ckpt_sha256"])
        explain = run / "explain.json"
        if run.relative_to(RECORDS).parts[:2] in WITHOUT_CHECKPOINTS:
            assert not explain.exists(), run
        else:
            key = json.loads(explain.read_text())["key"]
            assert key["num_images"] == 500, run
            explained_with.add(key["teacher_ckpt_sha256"])
    assert len(teacher_files) == 1 and None not in teacher_files and explained_with == teacher_files


@pytest.mark.parametrize("name", STUDY)
def test_the_study_configs_build_their_distillers(name):
    for student in ("resnet8", "MobileNetV2") if not name.startswith("catkd") else (None,):
        cfg = load_cfg(str(ROOT / "configs" / "fashion_mnist" / f"{name}.yaml"),
                       ["DISTILLER.STUDENT", student] if student else [])
        check_names(cfg)
        assert cfg.DATASET.TYPE == "fashion_mnist" and cfg.DATASET.TRAIN_SUBSET == 3000
        cls = distiller_class(cfg.DISTILLER.TYPE)
        model = build_model(cfg.DISTILLER.STUDENT, 10)
        distiller = cls(model, build_model("resnet20", 10).eval(), cfg) if cls.needs_teacher else cls(model)
        _, losses = distiller.train()(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), epoch=1)
        assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_the_study_pipeline_runs_on_generated_idx_files(tmp_path, capsys):
    """Teacher, a sweep of KD and Exp-KD (one pair, one seed, 200 images), explanation records, the table."""
    data = write_idx(tmp_path / "fashion", num_train=300, num_test=100)
    sweep, explain_eval = load_tool("sweep"), load_tool("explain_eval")
    out, configs = tmp_path / "results", ROOT / "configs" / "fashion_mnist"
    small = ["DATASET.ROOT", str(data), "SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[1]",
             "DATASET.TEST.BATCH_SIZE", "50"]
    assert sweep.main(["--cfg", str(configs / "teacher.yaml"), "--out", str(out), *small,
                       "DATASET.TRAIN_SUBSET", "200"]) == 0
    teacher = out / "teacher" / "base" / "seed0" / "student_best"
    assert sweep.main(["--cfg", str(configs / "kd.yaml"), str(configs / "expkd_cam.yaml"), "--jobs", "2",
                       "--out", str(out / "resnet8"), *small, "DATASET.TRAIN_SUBSET", "200", "EXPKD.WARMUP", "1",
                       "DISTILLER.TEACHER_CKPT", str(teacher)]) == 0
    written = explain_eval.run(["runs", str(out), "-t", "resnet20", "-tc", str(teacher), "--num-images", "40",
                                "--device", "cpu"])["written"]
    assert len(written) == 3
    capsys.readouterr()
    table = summary_text([str(out)], group_by=["student", "EXPERIMENT.NAME"], baseline="EXPERIMENT.NAME=kd")
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [(row[0].strip("| "), row[1]) for row in rows] == [("resnet20", "teacher"), ("resnet8", "expkd_cam"),
                                                               ("resnet8", "kd")]
    assert re.fullmatch(r"[+-]\d+\.\d\d \([01]/1 seeds\)", rows[1][5]), rows[1]
    assert "agreement cosine" in table.splitlines()[0]
