"""tools/summarize.py (docs/studies.md): one row per group of runs that differ only in their seed, mean ± sample std
of the finished runs, unfinished runs and short groups flagged, the same bytes for the same folders."""
import csv
import io
import json
import statistics

import pytest
from test_engine_train import load_tool

SUMMARIZE = load_tool("summarize")
# (run dir, distiller, config_sha, seed, finished, best_acc, last_acc, wall_time_s, KD.TEMPERATURE in config.yaml)
RECORDS = [
    ("kd/t4/seed0", "KD", "aaa", 0, True, 71.25, 70.5, 100.0, 4.0),
    ("kd/t4/seed1", "KD", "aaa", 1, True, 72.0, 71.75, 110.0, 4.0),
    ("kd/t4/seed2", "KD", "aaa", 2, True, 70.125, 69.0, 90.0, 4.0),
    ("kd/t2/seed0", "KD", "bbb", 0, True, 69.0, 68.5, 95.0, 2.0),
    ("none/base/seed0", "NONE", "ccc", 0, True, 65.5, 65.0, 80.0, 4.0),
    ("none/base/seed1", "NONE", "ccc", 1, True, 66.5, 66.25, 82.0, 4.0),
    ("none/base/seed2", "NONE", "ccc", 2, False, 30.0, 30.0, 10.0, 4.0),
]


def write_run(root, path, distiller, sha, seed, finished, best, last, wall, temperature):
    run = root / path
    run.mkdir(parents=True)
    results = {"record_version": 1, "finished": finished, "epoch": 240 if finished else 12, "epochs": 240,
               "best_acc": best, "best_epoch": 200, "last_acc": last, "seed": seed, "distiller": distiller,
               "teacher": None if distiller == "NONE" else "resnet32x4", "student": "resnet8x4",
               "dataset": "cifar100", "overrides": {"EXPERIMENT.SEED": str(seed)}, "config_sha": sha,
               "wall_time_s": wall}
    (run / "results.json").write_text(json.dumps(results) + "\n")
    (run / "config.yaml").write_text(f"KD:\n  TEMPERATURE: {temperature}\nSOLVER:\n  LR: 0.05\n")


@pytest.fixture()
def study(tmp_path):
    for record in reversed(RECORDS):  # creation order must not matter
        write_run(tmp_path / "study", *record)
    return tmp_path / "study"


def summarize(capsys, *args):
    assert SUMMARIZE.main([str(arg) for arg in args]) == 0
    return capsys.readouterr().out


def by_hand(distiller, sha, key):
    values = [r[{"best_acc": 5, "last_acc": 6, "wall_time_s": 7}[key]] for r in RECORDS
              if r[1] == distiller and r[2] == sha and r[4]]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def test_markdown_rows_are_mean_and_sample_std_of_the_finished_runs(study, capsys):
    lines = summarize(capsys, study).splitlines()
    assert lines[0] == ("| dataset | teacher | student | distiller | config_sha | n | seeds | best top-1 (%) | "
                        "last top-1 (%) | wall time (s) | flags |")
    assert lines[1] == "|" + "---|" * 11
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[3], row[4]) for row in rows] == [("KD", "aaa"), ("KD", "bbb"), ("NONE", "ccc")]
    for row in rows:
        for column, key in ((7, "best_acc"), (8, "last_acc")):
            mean, std = by_hand(row[3], row[4], key)
            assert row[column] == (f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}")
        assert row[9] == f"{by_hand(row[3], row[4], 'wall_time_s')[0]:.1f}"
    assert rows[0][5:7] == ["3", "0,1,2"] and rows[0][10] == ""
    assert rows[1][5:7] == ["1", "0"] and rows[1][10] == "n=1 of 3"
    assert rows[2][1] == "—" and rows[2][5:7] == ["2", "0,1"]
    assert rows[2][10] == "n=2 of 3; 1 unfinished (seed 2 at epoch 12/240)"  # its 30 % is not averaged in


def test_the_same_folders_give_the_same_bytes(study, capsys, tmp_path):
    first = summarize(capsys, study, "--format", "json")
    assert summarize(capsys, study, "--format", "json") == first
    assert summarize(capsys, study, study / "kd", "--format", "json") == first  # a run found twice counts once
    assert summarize(capsys, study) == summarize(capsys, study)


def test_json_has_keys_seeds_runs_unfinished_and_each_metric(study, capsys):
    groups = json.loads(summarize(capsys, study, "--format", "json"))
    assert [g["keys"]["config_sha"] for g in groups] == ["aaa", "bbb", "ccc"]
    kd, short, none = groups
    assert kd["keys"] == {"dataset": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4", "distiller": "KD",
                          "config_sha": "aaa"}
    assert (kd["n"], kd["of"], kd["seeds"]) == (3, 3, [0, 1, 2])
    assert kd["runs"] == [str(study / "kd" / "t4" / f"seed{s}") for s in range(3)]
    for key in ("best_acc", "last_acc", "wall_time_s"):
        mean, std = by_hand("KD", "aaa", key)
        assert kd[key]["mean"] == pytest.approx(mean) and kd[key]["std"] == pytest.approx(std)
    assert short["best_acc"] == {"mean": 69.0, "std": None} and short["flags"] == ["n=1 of 3"]
    assert none["unfinished"] == [{"run": str(study / "none" / "base" / "seed2"), "seed": 2, "epoch": 12,
                                   "epochs": 240}]
    assert none["n"] == 2 and none["best_acc"]["mean"] == pytest.approx(66.0)


def test_csv_splits_mean_and_std_and_metric_selects_the_columns(study, capsys):
    rows = list(csv.reader(io.StringIO(summarize(capsys, study, "--format", "csv", "--metric", "best"))))
    assert rows[0] == ["dataset", "teacher", "student", "distiller", "config_sha", "n", "seeds", "best top-1 (%) mean",
                       "best top-1 (%) std", "wall time (s)", "flags"]
    mean, std = by_hand("KD", "aaa", "best_acc")
    assert rows[1][7:9] == [f"{mean:.2f}", f"{std:.2f}"] and rows[2][7:9] == ["69.00", "—"]
    assert "last top-1" not in summarize(capsys, study, "--metric", "best")


def test_group_by_a_config_key_reads_the_runs_config(study, capsys):
    groups = json.loads(summarize(capsys, study, "--format", "json", "--group-by", "distiller", "KD.TEMPERATURE"))
    assert [(g["keys"]["distiller"], g["keys"]["KD.TEMPERATURE"], g["n"]) for g in groups] == [
        ("KD", 2.0, 1), ("KD", 4.0, 3), ("NONE", 4.0, 2)]
    one = json.loads(summarize(capsys, study, "--format", "json", "--group-by", "dataset"))
    assert len(one) == 1 and one[0]["n"] == 6 and len(one[0]["unfinished"]) == 1


def test_a_folder_without_results_is_a_one_line_error(tmp_path, study, capsys):
    (tmp_path / "empty").mkdir()
    assert SUMMARIZE.main([str(study), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"summarize.py: error: {tmp_path / 'empty'}: no results.json below this folder"


def test_baseline_adds_the_paired_difference_seed_by_seed(study, capsys):
    lines = summarize(capsys, study, "--group-by", "distiller", "config_sha", "--baseline", "distiller=KD",
                      "--metric", "best").splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[4:6] == ["best top-1 (%)", "best top-1 (%) - KD, paired (wins/n)"]
    rows = {(r[0], r[1]): r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    # KD/aaa and KD/bbb are both baselines of NONE: two candidates, so no pairing (never a silent pick)
    assert rows[("NONE", "ccc")][5] == "—"
    lines = summarize(capsys, study, "--group-by", "distiller", "KD.TEMPERATURE", "--baseline", "distiller=KD",
                      "--metric", "best").splitlines()
    rows = {(r[0], r[1]): r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    kd = {r[3]: r[5] for r in RECORDS if r[1] == "KD" and r[8] == 4.0}
    none = {r[3]: r[5] for r in RECORDS if r[1] == "NONE" and r[4]}
    diffs = [none[s] - kd[s] for s in sorted(none)]
    expected = f"{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} (0/{len(diffs)} seeds)"
    assert rows[("NONE", "4.0")][5] == expected
    assert rows[("KD", "4.0")][5] == "—"  # the baseline itself
    groups = json.loads(summarize(capsys, study, "--group-by", "distiller", "KD.TEMPERATURE", "--baseline",
                                  "distiller=KD", "--format", "json"))
    none_group = next(g for g in groups if g["keys"]["distiller"] == "NONE")
    assert none_group["best_acc_paired"]["n"] == 2 and none_group["best_acc_paired"]["wins"] == 0
    assert none_group["best_acc_paired"]["mean"] == pytest.approx(statistics.mean(diffs))


def test_a_baseline_that_matches_no_group_is_a_one_line_error(study, capsys):
    assert SUMMARIZE.main([str(study), "--baseline", "distiller=DKD"]) == 2
    assert "--baseline distiller=DKD: no group has distiller 'DKD'" in capsys.readouterr().err
    assert SUMMARIZE.main([str(study), "--baseline", "lr=0.1"]) == 2


def test_explain_records_add_agreement_and_auc_columns(study, capsys):
    values = {"kd/t4/seed0": (0.8, 0.4, 20.0), "kd/t4/seed1": (0.9, 0.5, 22.0)}
    for path, (cosine, iou, auc) in values.items():
        (study / path / "explain.json").write_text(json.dumps(
            {"agreement_cosine": cosine, "agreement_iou": iou, "perturbation_auc": auc}))
    lines = summarize(capsys, study).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[9:12] == ["agreement cosine", "agreement IoU", "perturbation AUC"]
    row = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert row[9:12] == [f"0.850 ± {statistics.stdev([0.8, 0.9]):.3f}", f"0.450 ± {statistics.stdev([0.4, 0.5]):.3f}",
                         f"21.00 ± {statistics.stdev([20.0, 22.0]):.2f}"]
    assert [cell.strip() for cell in lines[4].strip("|").split("|")][9:12] == ["—"] * 3
