"""Lost or corrupted work, and resume: each case is a row of the README's reliability table.

A resumed run refuses a config its checkpoint cannot follow and applies (and reports) the rest;
a damaged newest checkpoint falls back to the previous one; a checkpoint killed while it is
replaced or pruned never looks complete; a torn metrics line is trimmed; one run per run_dir;
`log.every=0` fails at load; `advantage docs` and `advantage consolidate` touch nothing they
were not asked to. (Signals and the SIGKILL loop are in test_resume.py.)
"""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from advantage.rl.config_changes import resume_view

from advantage.engine import checkpoint as ckpt
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

BASE = ("train.steps=2", "checkpoint.every=1", "checkpoint.keep=3", "log.report=false")


def _trainer(run_dir, *overrides):
    return Trainer(load_config(None, small_config(run_dir, *BASE, *overrides)), [length_reward])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step grpo run (G = 4, lr 1e-3) with checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    _trainer(run_dir).fit()
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _view(*overrides):
    cfg = load_config(None, list(overrides))
    return resume_view(dataclasses.asdict(cfg), dataclasses.asdict(cfg.algorithm_spec()))


# 7. checkpoints killed while replaced or pruned; damaged checkpoints --------------------------


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("case", ["re-save the newest step", "prune the oldest"])
def test_a_checkpoint_killed_while_replaced_or_pruned_never_looks_complete(
    tmp_path, monkeypatch, case
):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())

    def save(step):
        return ckpt.save_checkpoint(tmp_path, step, {"policy": model}, {"opt": opt}, {}, keep=2)

    save(1), save(2)
    real_rmtree = shutil.rmtree

    def killed_half_way(path, ignore_errors=False):
        """The process dies after deleting one file of the folder."""
        path = Path(path)
        if path.name.startswith(".tmp-") or not path.exists():
            return real_rmtree(path, ignore_errors=ignore_errors)
        (path / "optimizer.pt").unlink()
        raise _Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_half_way)
    with pytest.raises(_Killed):
        save(2 if case == "re-save the newest step" else 3)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    listed = ckpt.list_checkpoints(tmp_path)
    assert listed and all((p / "optimizer.pt").is_file() for p in listed), listed
    ckpt.load_checkpoint(listed[-1], {"policy": model}, {"opt": opt})
    assert ckpt.remove_stale(tmp_path)  # the half-deleted folder, set aside, goes next start
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
