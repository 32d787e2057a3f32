"""Checkpoint files in upstream mdistiller's formats, written atomically and read without running pickled code.

Formats (file names have no extension, as upstream):
- full (`latest`, `best`, `epoch_N`): {"epoch", "model" (distiller state, keys prefixed `module.` as upstream's
  DataParallel wrapper wrote them), "optimizer", "best_acc"} plus resume extras ("rng_state", ...);
- student (`student_latest`, `student_best`, `student_N`, and teacher files): {"model": bare model state_dict}.
"""
import os
import pickle
import tempfile
from typing import Any, BinaryIO, Callable, Dict, Mapping

import torch
import torch.nn as nn

DATA_PARALLEL_PREFIX = "module."
STUDENT_PREFIX = "student."


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unwritable or does not fit the model; the message names the file."""


def save_checkpoint(obj, path: str) -> None:
    """`torch.save` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[BinaryIO], Any], what: str = "file") -> None:
    """`write(f)` into a temporary file in the same directory, fsync, then rename over `path`: a kill leaves either
    the old file or the new one, never a truncated one. The file gets the permissions of a plain `open` (mkstemp's
    are private)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        fd, tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.unlink(tmp_path)
        if isinstance(error, OSError):  # disk full, read-only or vanished directory: the old file is untouched
            kept = "the previous file is unchanged" if os.path.exists(path) else "no previous file"
            raise CheckpointError(f"cannot write {what} {path}: {error.strerror or error} ({kept})") from None
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: str):
    """`torch.load(path, map_location="cpu", weights_only=True)`: tensors and plain containers only, so a file from
    the internet cannot run code. Raises CheckpointError naming the file for any problem."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint is not a file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _weights_only_detail(error)
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{path}: refused to load: it holds Python objects other than tensors and plain containers "
                f"({detail}; loading uses weights_only=True so that a checkpoint cannot run code)"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt): {detail}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt): {_first_line(error)}"
        ) from None


def _weights_only_detail(error: BaseException) -> str:
    """The informative line of torch's multi-paragraph weights-only error."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    lines = [line for line in lines if not line.startswith(("Please file an issue", "Check the documentation"))]
    return " ".join(lines).rstrip(".") if lines else _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = DATA_PARALLEL_PREFIX) -> Dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state_dict.items()}


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = DATA_PARALLEL_PREFIX) -> Dict[str, torch.Tensor]:
    """Drop `prefix` from every key when all keys carry it (upstream's `module.`); otherwise return the keys as is."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def model_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    """The bare model weights in a loaded file: a student/teacher file {"model": ...}, a full checkpoint (its
    `student.` weights) or a bare state dict."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(
            f"{path}: expected a state dict or a dict with a 'model' state dict, got {type(obj).__name__}"
        )
    state = strip_prefix(state)
    if any(key.startswith(STUDENT_PREFIX) for key in state):
        state = {key[len(STUDENT_PREFIX):]: value for key, value in state.items() if key.startswith(STUDENT_PREFIX)}
    return state


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, what: str) -> None:
    """Strict `load_state_dict` whose failure is one line naming the file and the first mismatches."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [
        f"{key} {list(state_dict[key].shape)} vs {list(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    problems = [
        f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    if problems:
        raise CheckpointError(f"{path}: does not match {what}: " + "; ".join(problems))
    module.load_state_dict(state_dict)
