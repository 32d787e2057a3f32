"""Registries and EXPERIMENT.IMPORTS: a new method is one file, inside the package or outside it
(docs/extending.md)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdistiller.distillers import Distiller, distiller_dict, register_distiller
from mdistiller.engine import BaseTrainer, trainer_dict
from mdistiller.engine.cfg import CFG
from mdistiller.engine.config import load_cfg
from mdistiller.errors import ConfigError
from mdistiller.models import build_model

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "tools" / "train.py")


def example_file() -> str:
    """The distiller file of docs/extending.md, as a user copies it."""
    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(r"<!-- example: my_kd.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/extending.md lost its example file"
    return match.group(1)


@pytest.fixture
def digits_teacher(tmp_path) -> str:
    path = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model("resnet20", 10, dataset="digits").state_dict()}, path)
    return str(path)


def _train(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_every_distiller_module_registers_its_class_and_config_node():
    package = ROOT / "mdistiller" / "distillers"
    modules = {path.stem for path in package.glob("*.py") if not path.stem.startswith("_")}
    registered_modules = {cls.__module__.rpartition(".")[2] for cls in distiller_dict.values()}
    assert modules <= registered_modules, f"modules that register nothing: {modules - registered_modules}"
    for name, cls in distiller_dict.items():
        if cls.config_node:
            assert cls.config_node in CFG, name
            assert dict(CFG[cls.config_node]).keys() == cls.config_defaults.keys()


def test_upstream_registry_names_and_import_paths_still_work():
    from mdistiller.dataset import get_dataset  # noqa: F401
    from mdistiller.distillers import DKD, KD
    from mdistiller.models import cifar_model_dict, imagenet_model_dict  # noqa: F401

    assert distiller_dict["KD"] is KD and distiller_dict["DKD"] is DKD
    assert {"NONE", "KD", "DKD", "EXPKD", "CAM", "AT", "FITNET", "RKD", "PKT", "SP", "NST", "KDSVD", "VID", "OFD",
            "REVIEWKD", "CRD"} <= set(distiller_dict)
    assert set(trainer_dict) >= {"base", "crd", "dot", "crd_dot"}
    assert isinstance(CFG.KD.TEMPERATURE, float) and CFG.KD.TEMPERATURE == 4.0


def test_kd_temperature_takes_a_float_and_an_int():
    assert load_cfg(None, ["KD.TEMPERATURE", "2.5"]).KD.TEMPERATURE == 2.5
    assert load_cfg(None, ["KD.TEMPERATURE", "3"]).KD.TEMPERATURE == 3.0


def test_registering_a_taken_name_with_another_class_is_refused():
    with pytest.raises(ConfigError, match="DISTILLER.TYPE = 'KD' is registered twice"):
        @register_distiller("KD")
        class Other(Distiller):
            pass
    assert distiller_dict["KD"].__name__ == "KD"


def test_a_node_that_clashes_with_another_is_refused_and_nothing_is_registered():
    with pytest.raises(ConfigError, match="config node SOLVER"):
        @register_distiller("CLASH", defaults={"LR": 1.0}, config_node="SOLVER")
        class Clash(Distiller):
            pass
    assert "CLASH" not in distiller_dict


def test_a_distiller_registered_later_gets_its_node_in_new_configs():
    @register_distiller("LATEKD_TEST", defaults={"WEIGHT": 1.0, "LOSS": {"CE_WEIGHT": 0.5}})
    class LateKD(Distiller):
        pass

    cfg = load_cfg(None, ["DISTILLER.TYPE", "LATEKD_TEST", "LATEKD_TEST.LOSS.CE_WEIGHT", "0.25"])
    assert cfg.LATEKD_TEST.WEIGHT == 1.0 and cfg.LATEKD_TEST.LOSS.CE_WEIGHT == 0.25
    with pytest.raises(ConfigError, match="did you mean LATEKD_TEST.WEIGHT"):
        load_cfg(None, ["LATEKD_TEST.WEIGHTS", "2"])


def test_trainer_and_distiller_must_agree_on_contrastive_batches():
    from mdistiller.launch.build import trainer_class

    assert trainer_class(load_cfg(None, ["DISTILLER.TYPE", "CRD", "SOLVER.TRAINER", "crd"])).contrastive_batches
    with pytest.raises(ConfigError, match="SOLVER.TRAINER = 'base' does not fit DISTILLER.TYPE = 'CRD'.*crd, crd_dot"):
        trainer_class(load_cfg(None, ["DISTILLER.TYPE", "CRD"]))
    with pytest.raises(ConfigError, match="does not fit DISTILLER.TYPE = 'KD'"):
        trainer_class(load_cfg(None, ["DISTILLER.TYPE", "KD", "SOLVER.TRAINER", "crd"]))
    assert trainer_class(load_cfg(None, [])) is BaseTrainer


@pytest.mark.slow
def test_the_documented_example_file_trains_from_outside_the_package(tmp_path, digits_teacher):
    (tmp_path / "my_kd.py").write_text(example_file())
    config = ROOT / "configs" / "digits" / "quickstart" / "kd.yaml"
    args = ["--cfg", str(config), "EXPERIMENT.IMPORTS", "['my_kd.py']", "DISTILLER.TYPE", "MYKD", "MYKD.WEIGHT", "2.0",
            "DISTILLER.TEACHER_CKPT", digits_teacher, "SOLVER.EPOCHS", "1", "LOG.PREFIX", str(tmp_path / "out"),
            "EXPERIMENT.NAME", "mykd", "DATASET.TEST.BATCH_SIZE", "64"]
    result = _train(args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Extra parameters of MYKD: 0" in result.stdout
    saved = load_cfg(str(next((tmp_path / "out").rglob("config.yaml"))), freeze=False)  # from another directory
    assert saved.DISTILLER.TYPE == "MYKD" and saved.MYKD.WEIGHT == 2.0 and saved.MYKD.T == 4.0
    assert saved.EXPERIMENT.IMPORTS == [str(tmp_path / "my_kd.py")]

    unknown = _train(args[:-2] + ["MYKD.WEIGHTS", "2.0"], tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines() == [
        "train.py: error: command line: unknown key MYKD.WEIGHTS (value '2.0'); did you mean MYKD.WEIGHT?"]


@pytest.mark.parametrize("imports, expected", [
    ("['missing_kd.py']", "EXPERIMENT.IMPORTS: 'missing_kd.py' is not a file"),
    ("['no_such_module_kd']", "EXPERIMENT.IMPORTS: no module named 'no_such_module_kd' on sys.path"),
    ("['broken_kd.py']", "EXPERIMENT.IMPORTS: importing .*broken_kd.py failed: ZeroDivisionError"),
    ("'my_kd.py'", "EXPERIMENT.IMPORTS = 'my_kd.py'; expected a list"),
])
def test_bad_imports_are_one_line_errors(tmp_path, imports, expected):
    (tmp_path / "broken_kd.py").write_text("x = 1 / 0\n")
    result = _train(["EXPERIMENT.IMPORTS", imports, "LOG.PREFIX", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), lines


def test_imports_in_a_yaml_are_found_next_to_the_config(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "my_kd.py").write_text(example_file().replace('"MYKD"', '"MYKD_YAML_TEST"').replace(
        "cfg.MYKD.", "cfg.MYKD_YAML_TEST."))
    (folder / "exp.yaml").write_text("EXPERIMENT:\n  IMPORTS: ['my_kd.py']\nDISTILLER:\n  TYPE: MYKD_YAML_TEST\n"
                                     "MYKD_YAML_TEST:\n  T: 2\n")
    cfg = load_cfg(str(folder / "exp.yaml"))
    assert cfg.MYKD_YAML_TEST.T == 2.0 and isinstance(cfg.MYKD_YAML_TEST.T, float)
    load_cfg(str(folder / "exp.yaml"))  # a second import of the same file is a no-op, not a double registration
    assert json.dumps(cfg.EXPERIMENT.IMPORTS) == json.dumps([str(folder / "my_kd.py")])


def test_the_documented_data_set_example_trains_and_evaluates(tmp_path):
    """docs/extending.md's my_data.py, as a user copies it: a registered npz type trains through tools/train.py."""
    import numpy as np

    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(r"<!-- example: my_data.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/extending.md lost its data set example"
    (tmp_path / "my_data.py").write_text(match.group(1))
    rng = np.random.default_rng(0)
    root = tmp_path / "my_images"
    root.mkdir()
    for split, n in (("train", 40), ("test", 20)):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 3)
    result = _train(["--cfg", str(ROOT / "configs/digits/quickstart/vanilla.yaml"), "--run-dir", str(tmp_path / "run"),
                     "EXPERIMENT.IMPORTS", "['my_data.py']", "DATASET.TYPE", "npz", "DATASET.ROOT", str(root),
                     "DATASET.TRAIN_SUBSET", "0", "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16",
                     "DATASET.TEST.BATCH_SIZE", "10"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["finished"] is True and results["dataset"] == "npz"
    assert 0 <= results["last_acc"] <= 100
