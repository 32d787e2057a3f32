"""EXPERIMENT.IMPORTS: users' modules (their own distillers, trainers) imported before a config is merged, so that
what they register, config nodes included, is known to the merge; docs/extending.md."""
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import List, Sequence

from ..errors import ConfigError

KEY = "EXPERIMENT.IMPORTS"


def _file_module(path: str, source: str) -> None:
    """Import a .py file once per absolute path, under a name derived from it (importing it again is a no-op)."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    stem = "".join(ch if ch.isalnum() else "_" for ch in os.path.splitext(os.path.basename(path))[0])
    name = f"mdistiller_user_{stem}_{digest}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ConfigError(f"{source}: {KEY}: importing {path} failed: {type(error).__name__}: {error}") from error


def import_modules(names: Sequence[str], source: str, search_dirs: Sequence[str] = ()) -> List[str]:
    """Import each entry of EXPERIMENT.IMPORTS: a `.py` path (absolute, or relative to the working directory or to
    one of `search_dirs`, e.g. the config file's folder) or a module name on sys.path. Returns the entries with each
    path made absolute, so that the run's config.yaml imports the same files from anywhere."""
    resolved = []
    for entry in names:
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"{source}: {KEY} entry {entry!r}; expected a module name or a .py path")
        if entry.endswith(".py"):
            candidates = [entry] if os.path.isabs(entry) else [os.path.join(d, entry) for d in ("", *search_dirs)]
            found = [path for path in candidates if os.path.isfile(path)]
            if not found:
                raise ConfigError(f"{source}: {KEY}: {entry!r} is not a file (looked in "
                                  f"{', '.join(os.path.abspath(os.path.dirname(c) or '.') for c in candidates)})")
            resolved.append(os.path.abspath(found[0]))
            _file_module(resolved[-1], source)
            continue
        resolved.append(entry)
        try:
            importlib.import_module(entry)
        except ModuleNotFoundError as error:
            if error.name and (entry == error.name or entry.startswith(error.name + ".")):
                raise ConfigError(f"{source}: {KEY}: no module named {entry!r} on sys.path") from error
            raise ConfigError(f"{source}: {KEY}: importing {entry!r} failed: {error}") from error
        except ConfigError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
            raise ConfigError(f"{source}: {KEY}: importing {entry!r} failed: {reason}") from error
    return resolved
