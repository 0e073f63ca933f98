"""Crash-safe checkpoints: written into a temporary folder, fsynced, then renamed into place, so
a half-written checkpoint is never picked up. Nothing is unpickled when loading: model weights
are safetensors, the rest is JSON or `torch.load(weights_only=True)`.

    RUN_DIR/checkpoints/step-000012/
        policy.safetensors        weights of the policy (and critic.safetensors, reference.safetensors)
        optimizer.pt              optimizer and scheduler states (tensors and numbers only)
        rng.pt                    Python, NumPy and torch RNG states
        trainer_state.json        step, data position, baseline and KL-controller state, config
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and (p / "trainer_state.json").is_file()]  # fmt: skip
    return sorted(done, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state as contiguous tensors, shared storage (tied weights) broken."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": json.dumps(random.getstate()),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state(
        (name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, modules: dict[str, torch.nn.Module],
                    optim_state: dict, trainer_state: dict, keep: int = 2) -> Path:  # fmt: skip
    """Write checkpoint `step` atomically and keep the newest `keep` complete ones."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{step:06d}-"))
    try:
        for name, module in modules.items():
            save_file(state_tensors(module), str(tmp / f"{name}.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module]) -> tuple[dict, dict]:
    """Load weights into `modules` (strict); return (optimizer state, trainer state).
    The RNG states are restored too."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"checkpoint.resume: {str(path)!r} is not a complete checkpoint folder"
        )
    for name, module in modules.items():
        state = load_file(str(path / f"{name}.safetensors"))
        module.load_state_dict(state, strict=True)
    optim_state = torch.load(path / "optimizer.pt", weights_only=True)
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return optim_state, json.loads((path / "trainer_state.json").read_text())
