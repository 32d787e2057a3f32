"""Model weight files by format (docs/models.md): the framework's own (student and teacher files, full checkpoints,
bare state dicts: `engine.checkpoint.model_state_dict`), timm's training checkpoints and `.safetensors` files."""
import argparse
from typing import Dict, Mapping

import torch

from ..engine.checkpoint import CheckpointError, load_checkpoint, model_state_dict, strip_prefix

# timm's training checkpoints hold the weights under these keys; timm's own loader prefers the EMA, in this order
TIMM_KEYS = ("state_dict_ema", "model_ema", "state_dict")
COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper (timm's clean_state_dict strips it too)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _safetensors(path: str) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise CheckpointError(f"{path}: reading .safetensors files needs safetensors: pip install safetensors") \
            from error
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path}: not a readable safetensors file: {_first_line(error)}") from error


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The bare model weights of the file `path`, loaded without running pickled code (timm's `args` namespace
    aside, which its train.py saves with the weights); CheckpointError naming the file otherwise."""
    if path.endswith(".safetensors"):
        obj = _safetensors(path)
    else:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = load_checkpoint(path)
    if isinstance(obj, Mapping):
        obj = next((obj[key] for key in TIMM_KEYS if isinstance(obj.get(key), Mapping) and obj[key]), obj)
    return strip_prefix(model_state_dict(obj, path), COMPILED_PREFIX)
