"""Config loading: yacs semantics, one-line errors naming file/key/value/expected, upstream experiment names."""
import pytest

from mdistiller.engine.cfg import CFG
from mdistiller.engine.config import ConfigError, dump_cfg, experiment_name, load_cfg


def _yaml(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_file_and_overrides_merge_with_yacs_semantics(tmp_path):
    path = _yaml(tmp_path, "SOLVER:\n  LR: 0.1\n  LR_DECAY_STAGES: [10, 20]\nDISTILLER:\n  TYPE: KD\n")
    cfg = load_cfg(path, ["SOLVER.EPOCHS", "3", "SOLVER.LR_DECAY_STAGES", "[1,2]", "KD.TEMPERATURE", "2"])
    assert (cfg.SOLVER.LR, cfg.SOLVER.EPOCHS, cfg.SOLVER.LR_DECAY_STAGES) == (0.1, 3, [1, 2])
    assert (cfg.DISTILLER.TYPE, cfg.KD.TEMPERATURE) == ("KD", 2)
    assert cfg.is_frozen()
    assert CFG.SOLVER.LR == 0.05  # defaults untouched


def test_int_accepted_for_float_and_tuple_for_list(tmp_path):
    cfg = load_cfg(_yaml(tmp_path, "SOLVER:\n  LR: 1\n"), ["FITNET.INPUT_SIZE", "[64, 64]"])
    assert cfg.SOLVER.LR == 1.0 and isinstance(cfg.SOLVER.LR, float)
    assert tuple(cfg.FITNET.INPUT_SIZE) == (64, 64)


def test_unknown_key_in_file_names_file_key_value_and_suggestion(tmp_path):
    path = _yaml(tmp_path, "SOLVER:\n  LRR: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(path)
    message = str(info.value)
    assert "\n" not in message
    assert path in message and "SOLVER.LRR" in message and "0.1" in message and "SOLVER.LR?" in message


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key NOPE .*expected one of|unknown key NOPE .*did you mean"):
        load_cfg(_yaml(tmp_path, "NOPE: 1\n"))


def test_integer_accepted_for_a_string_key(tmp_path):
    """A stage index written bare (`LAYER: 1`, `EXPKD.LAYER -1`) becomes the string the key holds."""
    assert load_cfg(_yaml(tmp_path, "EXPKD:\n  LAYER: 1\n")).EXPKD.LAYER == "1"
    assert load_cfg(None, ["EXPKD.LAYER", "-1"]).EXPKD.LAYER == "-1"
    assert load_cfg(None, ["EXPKD.LAYER", "'2'"]).EXPKD.LAYER == "2"  # the old doubly quoted form still works
    with pytest.raises(ConfigError, match="EXPKD.LAYER = 1.5 has type float"):
        load_cfg(None, ["EXPKD.LAYER", "1.5"])


def test_wrong_type_in_file(tmp_path):
    path = _yaml(tmp_path, "SOLVER:\n  EPOCHS: fast\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(path)
    message = str(info.value)
    assert path in message and "SOLVER.EPOCHS" in message and "'fast'" in message and "expected int" in message


def test_leaf_given_a_mapping_and_node_given_a_value(tmp_path):
    with pytest.raises(ConfigError, match="SOLVER.LR .*mapping"):
        load_cfg(_yaml(tmp_path, "SOLVER:\n  LR: {a: 1}\n"))
    with pytest.raises(ConfigError, match="SOLVER = 3; expected a mapping"):
        load_cfg(_yaml(tmp_path, "SOLVER: 3\n"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _yaml(tmp_path, "SOLVER:\n  LR: [0.1\n  EPOCHS: 3\n")
    with pytest.raises(ConfigError) as info:
        load_cfg(path)
    message = str(info.value)
    assert "\n" not in message and path in message and "malformed YAML at line" in message


def test_top_level_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="top level is a list"):
        load_cfg(_yaml(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_cfg(str(tmp_path / "absent.yaml"))


def test_override_errors():
    with pytest.raises(ConfigError, match=r"command line: SOLVER.LR = 'abc' has type str; expected float"):
        load_cfg(None, ["SOLVER.LR", "abc"])
    with pytest.raises(ConfigError, match=r"command line: unknown key SOLVER.BATCHSIZE .*did you mean SOLVER.BATCH_"):
        load_cfg(None, ["SOLVER.BATCHSIZE", "8"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs; 'SOLVER.LR' has no value"):
        load_cfg(None, ["SOLVER.LR"])
    with pytest.raises(ConfigError, match="sub-keys"):
        load_cfg(None, ["SOLVER", "1"])


def test_experiment_name_follows_upstream():
    cfg = load_cfg(None, ["EXPERIMENT.TAG", "dkd,res32x4,res8x4", "EXPERIMENT.PROJECT", "cifar100_baselines"])
    assert experiment_name(cfg) == ("cifar100_baselines/dkd,res32x4,res8x4", ["dkd", "res32x4", "res8x4"])
    name, tags = experiment_name(cfg, ["SOLVER.LR", "0.1", "SOLVER.BATCH_SIZE", "128"])
    assert name == "cifar100_baselines/dkd,res32x4,res8x4SOLVER.LR:0.1,SOLVER.BATCH_SIZE:128"
    assert tags[-2:] == ["SOLVER.LR:0.1", "SOLVER.BATCH_SIZE:128"]
    named = load_cfg(None, ["EXPERIMENT.NAME", "mine"])
    assert experiment_name(named)[0] == "distill/mine"


def test_dumped_config_loads_back_identically(tmp_path):
    cfg = load_cfg(None, ["DISTILLER.TYPE", "DKD", "SOLVER.LR_DECAY_STAGES", "[3, 4]"])
    dump_cfg(cfg, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "&id" not in text
    again = load_cfg(str(tmp_path / "config.yaml"))
    assert again == cfg
