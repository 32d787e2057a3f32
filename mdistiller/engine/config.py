"""Loading experiment configs on top of the defaults in `cfg.py`, with yacs semantics and one-line errors.

yacs itself raises bare `KeyError("Non-existent config key: X")` or a type-mismatch message without the file; here
every problem names the source (file or command line), the key, the value and what was expected. Values follow
yacs: strings are `literal_eval`-ed, types must match the default (list <-> tuple and None allowed), and, as the
only extension, an int is accepted where the default is a float (`LR: 1`).
"""
import difflib
import hashlib
import os
import re
from typing import Any, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode, _check_and_coerce_cfg_value_type

from ..errors import ConfigError
from .cfg import CFG
from .imports import KEY as IMPORTS_KEY
from .imports import import_modules

__all__ = ["ConfigError", "load_cfg", "merge_file", "merge_opts", "experiment_name", "cfg_to_yaml", "dump_cfg"]


def _expected(default: Any) -> str:
    if isinstance(default, CfgNode):
        return "a mapping of sub-keys"
    return f"{type(default).__name__} (default {default!r})"


def _unknown_key(source: str, node: CfgNode, full_key: str, key: str, value: Any) -> ConfigError:
    parent = full_key[: -len(key)]
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = f"did you mean {parent}{close[0]}?" if close else f"expected one of {parent}{{{', '.join(node.keys())}}}"
    return ConfigError(f"{source}: unknown key {full_key} (value {value!r}); {hint}")


def _coerce(source: str, full_key: str, value: Any, default: Any) -> Any:
    value = CfgNode._decode_cfg_value(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # yaml and yacs read a bare 1 as an int: `EXPKD.LAYER 1` means the stage "1"
    if isinstance(value, dict) and not isinstance(default, CfgNode):
        raise ConfigError(f"{source}: {full_key} = {dict(value)!r} is a mapping; expected {_expected(default)}")
    try:
        return _check_and_coerce_cfg_value_type(value, default, full_key.split(".")[-1], full_key)
    except ValueError:
        raise ConfigError(
            f"{source}: {full_key} = {value!r} has type {type(value).__name__}; expected {_expected(default)}"
        ) from None


def _merge_mapping(source: str, mapping: dict, node: CfgNode, prefix: str) -> None:
    for key, value in mapping.items():
        full_key = prefix + str(key)
        if not isinstance(key, str) or key not in node:
            if node.is_new_allowed() and isinstance(key, str):
                node[key] = CfgNode(value) if isinstance(value, dict) else CfgNode._decode_cfg_value(value)
                continue
            raise _unknown_key(source, node, full_key, str(key), value)
        default = node[key]
        if isinstance(default, CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full_key} = {value!r}; expected {_expected(default)}")
            _merge_mapping(source, value, default, full_key + ".")
        else:
            node[key] = _coerce(source, full_key, value, default)


def read_yaml(path: str) -> dict:
    """The mapping of a yaml config file ({} when empty), or a ConfigError naming the file and the problem."""
    try:
        with open(path, "r") as f:
            text = f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level is a {type(data).__name__}; expected a mapping of config keys")
    return data


def merge_file(cfg: CfgNode, path: str) -> None:
    """Merge a yaml file into `cfg` (unfrozen) or raise ConfigError naming the file."""
    _merge_mapping(path, read_yaml(path), cfg, "")


def merge_opts(cfg: CfgNode, opts: Sequence[str], source: str = "command line") -> None:
    """Merge `KEY VALUE ...` overrides (yacs `merge_from_list` semantics) or raise ConfigError."""
    if len(opts) % 2:
        raise ConfigError(f"{source}: overrides must be KEY VALUE pairs; {opts[-1]!r} has no value")
    for full_key, value in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = str(full_key).split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, CfgNode) or part not in node:
                parent = node if isinstance(node, CfgNode) else CfgNode()
                raise _unknown_key(source, parent, ".".join(parts[: depth + 1]), part, value)
            if depth < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CfgNode):
            raise ConfigError(f"{source}: {full_key} = {value!r}; expected one of its sub-keys, not the whole node")
        node[parts[-1]] = _coerce(source, str(full_key), value, node[parts[-1]])


def _declared_imports(path: Optional[str], data: dict, opts: Sequence[str]) -> Tuple[str, Any]:
    """(source, EXPERIMENT.IMPORTS) as the overrides or else the file set it, read before the merge."""
    for key, value in reversed(list(zip(opts[0::2], opts[1::2]))):
        if key == IMPORTS_KEY:
            return "command line", CfgNode._decode_cfg_value(value)
    experiment = data.get("EXPERIMENT")
    if isinstance(experiment, dict) and "IMPORTS" in experiment:
        return str(path), experiment["IMPORTS"]
    return "", []


def load_cfg(path: Optional[str], opts: Sequence[str] = (), freeze: bool = True) -> CfgNode:
    """Defaults + `path` (if given) + overrides, as `tools/train.py` builds it. The modules named in
    EXPERIMENT.IMPORTS are imported first, so the config nodes of the distillers they register can be set."""
    opts = list(opts)
    data = read_yaml(path) if path else {}
    source, imports = _declared_imports(path, data, opts)
    if imports:
        if not isinstance(imports, (list, tuple)):
            raise ConfigError(f"{source}: {IMPORTS_KEY} = {imports!r}; expected a list of module names or .py paths")
        imports = import_modules(imports, source, [os.path.dirname(os.path.abspath(path))] if path else [])
    cfg = CFG.clone()
    _merge_mapping(str(path), data, cfg, "")
    merge_opts(cfg, opts)
    if imports:
        cfg.EXPERIMENT.IMPORTS = list(imports)
    if freeze:
        cfg.freeze()
    return cfg


# A run directory name keeps upstream's readable `NAME` + `KEY:VALUE,...` when it is safe; otherwise (a value with
# a path separator or other odd characters, or a name longer than MAX_NAME bytes) it is cut and gets a hash.
MAX_NAME = 120
SAFE_NAME = re.compile(r"[A-Za-z0-9._,:=+@%-]")


def safe_component(name: str, max_bytes: int = MAX_NAME) -> str:
    """One path component (never a nested folder, never '.' or '..', at most `max_bytes` bytes) that keeps `name`
    readable and is unique to it: unsafe characters become '_' and then a 10-digit hash of `name` is appended."""
    cleaned = "".join(ch if SAFE_NAME.fullmatch(ch) else "_" for ch in name)
    if cleaned == name and name not in ("", ".", "..") and len(name.encode()) <= max_bytes:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{cleaned[: max_bytes - len(digest) - 1].rstrip('.')}-{digest}"


def experiment_name(cfg: CfgNode, opts: Sequence[str] = ()) -> Tuple[str, List[str]]:
    """Upstream's rule: NAME or TAG, then each override as `KEY:VALUE` (comma-joined, appended with no separator),
    under PROJECT, made one safe path component (`safe_component`). Returns (PROJECT/name, wandb tags). The run
    directory is LOG.PREFIX/PROJECT/name; the full overrides are in its config.yaml and results.json."""
    name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    tags = cfg.EXPERIMENT.TAG.split(",")
    if opts:
        extra = ["{}:{}".format(k, v) for k, v in zip(opts[::2], opts[1::2])]
        tags += extra
        name += ",".join(extra)
    return os.path.join(cfg.EXPERIMENT.PROJECT, safe_component(name)), tags


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors when two keys share a default object (FITNET/VID.INPUT_SIZE)."""

    def ignore_aliases(self, data):
        return True


_PlainDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _to_plain(value: Any) -> Any:
    if isinstance(value, CfgNode):
        return {key: _to_plain(item) for key, item in value.items()}
    return list(value) if isinstance(value, tuple) else value


def cfg_to_yaml(cfg: CfgNode) -> str:
    return yaml.dump(_to_plain(cfg), Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)


def dump_cfg(cfg: CfgNode, path: str) -> None:
    """Write the merged config (loadable again with `load_cfg`)."""
    with open(path, "w") as f:
        f.write(cfg_to_yaml(cfg))
