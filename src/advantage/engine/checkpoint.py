"""Crash-safe checkpoints: written into a temporary folder, fsynced, then renamed into place, so
a half-written checkpoint is never picked up. Nothing is unpickled when loading: model weights
are safetensors, the rest is JSON or `torch.load(weights_only=True)`.

    RUN_DIR/checkpoints/step-000012/
        policy.safetensors        weights of the policy (and critic.safetensors, reference.safetensors)
          or dcp/                 FSDP2: every rank's shards (torch.distributed.checkpoint)
        optimizer.pt              optimizer and scheduler states (tensors and numbers only)
        extra.pt                  the caller's other state (asynchronous rollouts: the batches
                                  already sampled, the worker's state), if any
        rng-rank{r}.pt            Python, NumPy and torch RNG states of each rank (a rank
                                  the checkpoint has no state for keeps its own)
        trainer_state.json        step, data position, baseline and KL-controller state, config;
                                  written last: its presence marks a complete checkpoint

A checkpoint that is replaced (the same step saved again) or pruned is first renamed aside to a
dot-folder (`.replaced-…`, `.pruned-…`) and deleted there, so a folder killed half-way through its
deletion never looks complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint folder `path` (`step-000012` → 12)."""
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").is_file()
    ]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _set_aside(folder: Path, prefix: str) -> Path:
    """Rename `folder` to a dot-folder beside it (atomic), which `list_checkpoints` ignores."""
    aside = folder.with_name(prefix + folder.name)
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def remove_stale(run_dir: str | Path) -> list[str]:
    """Delete the dot-folders a killed run left behind (half-written, replaced or pruned
    checkpoints); return their names. Call it only while holding the run directory's lock."""
    root = checkpoint_root(run_dir)
    stale = sorted(p for p in root.glob(".*") if p.is_dir()) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in the place of `final` (fsynced, renamed into place; an
    old `final` is set aside first and then deleted), so `final` is never half-written."""
    _fsync_tree(tmp)
    replaced = _set_aside(final, ".replaced-") if final.exists() else None
    tmp.rename(final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


FINISHED = "finished.json"


def mark_finished(run_dir: str | Path, step: int) -> None:
    """Record that the run's end (its last checkpoint, evaluation after training, final model,
    report) is complete at `step`: written last, atomically."""
    path = Path(run_dir) / FINISHED
    tmp = path.with_name("." + FINISHED)
    tmp.write_text(json.dumps({"step": step}))
    tmp.replace(path)


def finished_step(run_dir: str | Path) -> int | None:
    """The step at which the run's end was completed (`mark_finished`), else None."""
    try:
        return int(json.loads((Path(run_dir) / FINISHED).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        elif f.is_dir():
            _fsync_tree(f)
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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict,
    trainer_state: dict,
    keep: int = 2,
    *,
    rank: int = 0,
    sharded: bool = False,
    extra: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep` complete ones.

    Every rank calls this. `optimizers` maps names to optimizers / schedulers. Unsharded
    (one process or DDP): rank 0 writes the weights (safetensors) and optimizer states.
    Sharded (FSDP2): every rank writes its shards with torch.distributed.checkpoint. Every rank
    writes its own RNG state. `extra` (tensors, numbers, strings, lists and dicts of them) goes
    to `extra.pt`. `trainer_state.json` is written last and marks completion.
    """
    from .parallel import barrier

    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(_sharded_state(modules, optimizers), checkpoint_id=str(tmp / "dcp"))
            if rank == 0:
                schedulers = {
                    k: v.state_dict() for k, v in optimizers.items() if not _is_optimizer(v)
                }
                torch.save(schedulers, tmp / "optimizer.pt")
        elif rank == 0:
            for name, module in modules.items():
                save_file(state_tensors(module), str(tmp / f"{name}.safetensors"))
            torch.save({k: v.state_dict() for k, v in optimizers.items()}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0 and extra is not None:
            torch.save(extra, tmp / "extra.pt")
        barrier()
        if rank == 0:
            trainer_state = {**trainer_state, "format": "sharded" if sharded else "safetensors"}
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            replace_folder(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(_set_aside(old, ".pruned-"), ignore_errors=True)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


class CheckpointError(Exception):
    """A checkpoint file is missing, truncated or unreadable; the message names the file."""


def read_file(path: Path, load=None):
    """`load(path)` (default: parse JSON); a failure becomes a `CheckpointError` naming the file."""
    try:
        return load(path) if load is not None else json.loads(path.read_text())
    except BaseException as e:  # missing, truncated, torn: anything that stops us reading it
        # (torch.distributed.checkpoint's CheckpointException derives from BaseException)
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise  # KeyboardInterrupt, SystemExit, ...
        why = "missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path.name}: {why.splitlines()[0][:160]}") from e


def load_checkpoint(
    path: str | Path, modules: dict[str, torch.nn.Module], optimizers: dict, *, rank: int = 0
) -> dict:
    """Load weights and optimizer/scheduler states in place (every rank) and this rank's RNG
    state; return the trainer state. Nothing is unpickled. A damaged file raises
    `CheckpointError` (the modules may then be partly loaded: load another checkpoint)."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"checkpoint.resume: {str(path)!r} is not a complete checkpoint folder"
        )
    trainer_state = read_file(path / "trainer_state.json")
    small = read_file(path / "optimizer.pt", lambda f: torch.load(f, weights_only=True))
    if trainer_state.get("format") == "sharded":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _sharded_state(modules, optimizers)
        read_file(path / "dcp", lambda f: dcp.load(state, checkpoint_id=str(f)))
        for name, module in modules.items():
            opt = optimizers.get(f"{name}_optimizer")
            set_state_dict(
                module,
                opt if opt is not None else [],
                model_state_dict=state[f"model/{name}"],
                optim_state_dict=state.get(f"optim/{name}", {}),
            )
    else:
        for name, module in modules.items():
            weights = read_file(path / f"{name}.safetensors", lambda f: load_file(str(f)))
            module.load_state_dict(weights, strict=True)
    for name, obj in optimizers.items():
        if name in small:
            obj.load_state_dict(small[name])
    rng = path / f"rng-rank{rank}.pt"
    if rng.exists():  # a rank the checkpoint had not (more processes now) keeps its own RNG
        set_rng_state(read_file(rng, lambda f: torch.load(f, weights_only=True)))
    if (path / "extra.pt").exists():
        trainer_state["extra"] = read_file(
            path / "extra.pt", lambda f: torch.load(f, weights_only=True)
        )
    return trainer_state


def _is_optimizer(obj) -> bool:
    return isinstance(obj, torch.optim.Optimizer)


def _sharded_state(modules: dict[str, torch.nn.Module], optimizers: dict) -> dict:
    """{"model/NAME": sharded model state, "optim/NAME": its optimizer's state} for DCP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {}
    for name, module in modules.items():
        opt = optimizers.get(f"{name}_optimizer")
        msd, osd = get_state_dict(module, opt if opt is not None else [])
        state[f"model/{name}"] = msd
        if opt is not None:
            state[f"optim/{name}"] = osd
    return state


def load_policy_weights(checkpoint: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's full (unsharded) state dict from a checkpoint of either format; `model` gives
    the keys and shapes of a sharded one (no process group needed: full tensors)."""
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    if trainer_state.get("format") == "sharded":
        import torch.distributed.checkpoint as dcp

        state = {"model/policy": model.state_dict()}
        dcp.load(state, checkpoint_id=str(checkpoint / "dcp"))
        return state["model/policy"]
    return load_file(str(checkpoint / "policy.safetensors"))
