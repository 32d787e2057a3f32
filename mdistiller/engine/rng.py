"""Seeding and RNG-state capture, so that a seeded run resumed after epoch k ends with the same weights as an
uninterrupted one (on CPU).

Every random draw of a training run comes from: Python's `random`, NumPy's global generator, torch's CPU and CUDA
generators (augmentations; the DataLoader's shuffling and worker seeds are drawn from torch's CPU generator unless
the loader or its sampler owns a `torch.Generator`, which is captured too). All are plain containers and tensors,
so they load with `weights_only=True`.
"""
import os
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed every generator when `seed >= 0` (negative: unseeded, as upstream). `deterministic` also selects
    deterministic kernels (slower); otherwise cuDNN autotuning stays on as upstream."""
    if seed >= 0:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def _loader_generators(loader) -> List[Tuple[str, torch.Generator]]:
    """The `torch.Generator`s a DataLoader owns (its own, its sampler's, its batch sampler's sampler's)."""
    if loader is None:
        return []
    candidates = [
        ("loader", getattr(loader, "generator", None)),
        ("sampler", getattr(getattr(loader, "sampler", None), "generator", None)),
        ("batch_sampler", getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)),
    ]
    seen, found = set(), []
    for name, generator in candidates:
        if isinstance(generator, torch.Generator) and id(generator) not in seen:
            seen.add(id(generator))
            found.append((name, generator))
    return found


def capture_rng_state(loader=None) -> Dict:
    """All RNG states, including the training loader's own generators."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "loader": {name: generator.get_state() for name, generator in _loader_generators(loader)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict, loader=None) -> Optional[str]:
    """Restore what `capture_rng_state` saved. Returns a warning when something could not be restored exactly."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    problems = []
    saved_loader = state.get("loader", {})
    for name, generator in _loader_generators(loader):
        if name in saved_loader:
            generator.set_state(saved_loader[name])
        else:
            problems.append(f"the data loader's {name} generator")
    if torch.cuda.is_available():
        if len(state.get("cuda", [])) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            problems.append("the CUDA generators (saved on a different number of GPUs)")
    return f"not restored: {', '.join(problems)}" if problems else None
