"""Shared error handling of the command-line tools: one line on stderr instead of a traceback (unless --debug)."""
import sys
from typing import Callable

from ..dataset import DatasetError
from ..engine.checkpoint import CheckpointError
from ..engine.lock import RunLockedError
from ..engine.signals import TrainingStopped
from ..engine.trainer import NonFiniteLossError
from ..errors import ConfigError

# Errors caused by the user's input or environment: their message is the whole story.
USER_ERRORS = (ConfigError, CheckpointError, DatasetError, NonFiniteLossError, RunLockedError, OSError)


def one_line(error: BaseException) -> str:
    text = str(error)
    if "\nOriginal Traceback" in text:  # re-raised from a DataLoader worker: keep "Caught X in ..." and the error
        head, trace = text.split("\nOriginal Traceback", 1)
        text = f"{head} {trace.strip().splitlines()[-1]}"
    text = " ".join(text.split())
    if isinstance(error, USER_ERRORS) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_cli(prog: str, body: Callable[[], None], debug: bool) -> int:
    """Run `body`; exit status 0, 2 (bad config or arguments), 1 (other errors), 130 (interrupted) or 128 + N
    (stopped cleanly by signal N, e.g. 143 for SIGTERM)."""
    try:
        body()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except TrainingStopped as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as error:
        if debug:
            raise
        hint = "" if isinstance(error, USER_ERRORS) else " (rerun with --debug for the traceback)"
        print(f"{prog}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0
