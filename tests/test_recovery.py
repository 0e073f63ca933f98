"""Lost or corrupted work, and resume: each case is a row of the README's reliability table.

A resumed run refuses a config its checkpoint cannot follow and applies (and reports) the rest;
a damaged newest checkpoint falls back to the previous one; a checkpoint killed while it is
replaced or pruned never looks complete; a torn metrics line is trimmed; one run per run_dir;
`log.every=0` fails at load; `advantage docs` and `advantage consolidate` touch nothing they
were not asked to. (Signals and the SIGKILL loop are in test_resume.py.)
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advantage.cli import main
from advantage.core import resolve
from advantage.engine import checkpoint as ckpt
from advantage.engine.configlib import ConfigError
from advantage.rl import trainer as trainer_module
from advantage.rl.config import load_config
from advantage.rl.config_changes import config_changes, resume_view
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


# 3. resume with a changed config ------------------------------------------------------------


def test_config_changes_sorts_refused_from_applied():
    saved = _view("rollout.num_generations=8", "train.lr=1e-4")
    refused, applied = config_changes(
        saved,
        _view(
            "algorithm=rloo",
            "rollout.num_generations=4",
            "train.lr=0.5",
            "train.steps=200",
            "log.every=5",
            "model.precision=bf16",  # autocast only: weights and optimizer stay fp32
            "checkpoint.resume=none",  # not compared
        ),
    )
    assert [str(c) for c in refused] == [
        "algorithm: grpo → rloo",
        "algo.baseline: group_mean → leave_one_out",
        "algo.scope: group → none",
        "algo.kl_placement: loss → reward",
        "algo.kl_estimator: k3 → k1",
        "algo.kl_coef: 0.04 → 0.05",
        "algo.aggregation: seq_mean_token_mean → token_mean",
        "rollout.num_generations: 8 → 4",
    ]
    assert [str(c) for c in applied] == [
        "model.precision: fp32 → bf16",
        "train.steps: 100 → 200",
        "train.lr: 0.0001 → 0.5",
        "log.every: 1 → 5",
    ]
    # the critic, LoRA, the base model and a synced reference are part of the saved state
    for overrides, shown in [
        (["algorithm=ppo"], "critic: no → yes"),
        (["model.lora={r: 4}"], 'model.lora: null → {"r": 4}'),
        (["model.name_or_path=other"], "model.name_or_path: builtin:tiny-reverse → other"),
        (["model.tokenizer=other"], "model.tokenizer: null → other"),  # it was applied
        (["model.critic=some/critic"], "model.critic: null → some/critic"),
        (["model.ref_sync_steps=2"], "synced reference: no → yes"),
    ]:
        refused, _ = config_changes(_view(), _view(*overrides))
        assert shown in [str(c) for c in refused], overrides


def test_config_changes_compares_resolved_axes_not_names():
    """A preset renamed with overrides that resolve to the same axes changes nothing saved."""
    grpo, rloo = dataclasses.asdict(resolve("grpo")), dataclasses.asdict(resolve("rloo"))
    same = [f"algo.{k}={json.dumps(v)}" for k, v in grpo.items() if k != "name" and rloo[k] != v]
    refused, applied = config_changes(_view(), _view("algorithm=rloo", *same))
    assert refused == [] and [str(c) for c in applied] == ["algorithm: grpo → rloo"]
    assert config_changes(_view(), _view()) == ([], [])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, shown",
    [
        (
            ("algorithm=rloo", "rollout.num_generations=2"),
            r"algorithm: grpo → rloo, algo\.baseline: group_mean → leave_one_out.*"
            r"rollout\.num_generations: 4 → 2",
        ),
        (
            ("algorithm=ppo",),
            r"algorithm: grpo → ppo, algo\.baseline: group_mean → critic, .*, critic: no → yes",
        ),
        (("model.lora={r: 4}",), r'model\.lora: null → \{"r": 4\}'),
    ],
)
def test_resume_refuses_a_setup_the_checkpoint_cannot_follow(
    run_copy, monkeypatch, overrides, shown
):
    def no_models(*args):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(trainer_module, "build_run", no_models)
    with pytest.raises(
        ConfigError,
        match=r"checkpoint.resume: .*step-000002 was saved with a different setup, which its "
        rf"state cannot continue under: {shown}; undo these changes to resume, or start a new "
        r"run \(checkpoint.resume=none and a new log.run_dir\)",
    ):
        _trainer(run_copy, *overrides)


@pytest.mark.slow
def test_resume_applies_and_reports_a_new_learning_rate(run_copy, caplog):
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = _trainer(run_copy, "train.lr=0.5", "train.steps=3")
    assert trainer.step == 2
    assert (
        "resuming step-000002 with config changes: train.steps: 2 → 3, train.lr: 0.001 → 0.5"
        in (caplog.text)
    )
    assert [g["lr"] for g in trainer.run.optimizer.param_groups] == [0.5]
    assert trainer.run.scheduler.base_lrs == [0.5]
    assert trainer.fit().metrics[-1]["lr"] == 0.5  # the saved optimizer's 1e-3 did not win


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


DAMAGE = {
    "truncated weights": ("policy.safetensors", lambda b: b[: len(b) // 2]),
    "torn trainer_state.json": ("trainer_state.json", lambda b: b[:40]),
    "missing optimizer.pt": ("optimizer.pt", None),
    "truncated RNG state": ("rng-rank0.pt", lambda b: b[:100]),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(run_copy, caplog, damage):
    name, cut = DAMAGE[damage]
    target = run_copy / "checkpoints" / "step-000002" / name
    if cut is None:
        target.unlink()
    else:
        target.write_bytes(cut(target.read_bytes()))
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = _trainer(run_copy, "train.steps=3")
    assert trainer.step == 1
    assert f"checkpoint step-000002 is damaged ({name}: " in caplog.text
    assert "resuming from the previous complete one, step-000001" in caplog.text
    assert (run_copy / "checkpoints" / "damaged-step-000002").is_dir()  # kept, not deleted
    trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)][-1] == "step-000003"


@pytest.mark.slow
def test_no_loadable_checkpoint_is_an_error(run_copy):
    for step in (1, 2):
        (run_copy / "checkpoints" / f"step-00000{step}" / "optimizer.pt").unlink()
    with pytest.raises(
        ConfigError,
        match=r"no checkpoint could be loaded: step-000002 is damaged \(optimizer.pt: missing\); "
        r"step-000001 is damaged",
    ):
        _trainer(run_copy, "train.steps=3")


def test_a_finished_run_without_checkpoints_is_not_trained_over(run_copy, tmp_path):
    # adversarial probes: checkpoints/ deleted to free disk, or an SFT run's folder: train
    # started afresh there and replaced final/ and metrics.jsonl without a word
    shutil.rmtree(run_copy / "checkpoints")
    sft = tmp_path / "sft"
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "model.safetensors").write_bytes(b"an SFT model")
    (sft / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')

    def files() -> dict:  # but the run lock's file
        return {p: p.read_bytes() for d in (run_copy, sft) for p in d.rglob("*")
                if p.is_file() and p.name != ".lock"}  # fmt: skip

    kept = files()
    for folder, what in ((run_copy, r"a finished run \(finished.json\)"),
                         (sft, r"a trained model \(final/\)")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"'{folder}' already holds {what} and no "
                           "checkpoint to continue it from; choose a new log.run_dir"):  # fmt: skip
            _trainer(folder)
    assert files() == kept


def test_sft_into_an_rl_run_folder_is_refused(run_copy, capsys):
    # an adversarial probe: sft called the RL run's logs "an interrupted SFT run", moved them
    # aside and wrote its final/ into the RL folder; the RL rerun then replaced it
    (run_copy / "finished.json").unlink()  # an interrupted RL run: checkpoints, logs
    kept = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()}
    assert main(["sft", f"log.run_dir={run_copy}", "train.steps=1"]) == 2
    assert capsys.readouterr().err == (
        f"error: log.run_dir '{run_copy}' holds an RL run (checkpoints/); choose a new "
        "log.run_dir (nothing is overwritten)\n"
    )
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file()} == kept


def test_a_damaged_sharded_checkpoint_is_a_checkpoint_error(tmp_path):
    # a probe: a missing FSDP2 shard raised torch's CheckpointException, a BaseException that
    # `except Exception` let through — a 218-line traceback, no fallback to the previous one
    from torch.distributed.checkpoint.api import CheckpointException

    def load(path):
        raise CheckpointException("ranks:dict_keys([0, 1])", {})

    with pytest.raises(ckpt.CheckpointError, match=r"^dcp: CheckpointException: "):
        ckpt.read_file(tmp_path / "dcp", load)
    with pytest.raises(KeyboardInterrupt):  # still not caught
        ckpt.read_file(tmp_path / "x", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_report_on_a_run_folder_without_step_records_is_one_line(tmp_path, capsys):
    # a probe: an empty metrics.jsonl (or only torn lines) was a FileNotFoundError traceback
    (tmp_path / "metrics.jsonl").write_text('{"torn": \n')
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'metrics.jsonl'} holds no step record (empty, torn or not ours): "
        "nothing to report\n"
    )


# 8. a torn metrics line ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_torn_metrics_line_is_trimmed_on_resume_and_skipped_by_report(run_copy, caplog):
    metrics = run_copy / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "reward/me')  # the disk filled up mid-line
    with caplog.at_level("WARNING", logger="advantage"):
        assert main(["report", str(run_copy)]) == 0
    assert "metrics.jsonl: skipped line 3, not valid JSON (a torn write)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = _trainer(run_copy, "train.steps=3")
    assert "metrics.jsonl: removed line 3 that is not valid JSON (a torn write)" in caplog.text
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    trainer.fit()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


# 9. one run per run_dir ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_first(run_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "advantage",
            "train",
            *small_config(run_dir, "train.steps=1000", "reward.functions=[helpers:length_reward]"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        with pytest.raises(
            ConfigError,
            match=rf"log.run_dir '{run_dir}' is in use by another run \(pid {first.pid}\); wait "
            "for it to end or choose another log.run_dir",
        ):
            _trainer(run_dir, "train.steps=1000")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the lock of the killed run: the folder can be resumed at once
    _trainer(run_dir, "train.steps=1000").close()


def test_a_second_lock_in_the_same_process_says_so(run_dir):
    from advantage.engine.runlock import RunDirLock

    held = RunDirLock(run_dir)
    with pytest.raises(ConfigError, match=r"another Trainer in this process \(pid \d+\)"):
        RunDirLock(run_dir)
    held.release()
    RunDirLock(run_dir).release()


# 11. log.every=0; `advantage docs` writes only where it is asked to -----------------------------


def test_log_every_zero_fails_at_load():
    with pytest.raises(ConfigError, match=r"log.every must be >= 1, got 0"):
        load_config(None, ["log.every=0"])


def test_docs_never_write_into_a_users_project(tmp_path, monkeypatch, capsys):
    import advantage.docs

    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    (project / "docs" / "config.md").write_text("the user's own notes")
    monkeypatch.chdir(project)
    # an installed copy, not the source checkout
    monkeypatch.setattr(advantage.docs, "source_checkout", lambda: None, raising=False)
    assert main(["docs"]) == 2
    assert "error: advantage docs: give --out FOLDER" in capsys.readouterr().err
    assert main(["docs", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.md").is_file()
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(advantage.docs, "source_checkout", lambda: checkout)
    assert main(["docs"]) == 0
    assert (checkout / "docs" / "config.md").is_file()
    assert (project / "docs" / "config.md").read_text() == "the user's own notes"


# 12. `advantage consolidate` runs no code from the checkpoint ----------------------------------


@pytest.mark.slow
def test_consolidate_trusts_remote_code_only_when_asked(trained, tmp_path, monkeypatch):
    from advantage.rl import checkpointing

    checkpoint = Path(shutil.copytree(trained / "checkpoints" / "step-000002", tmp_path / "c"))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["config"]["model"]["trust_remote_code"] = True  # written by whoever shared it
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    asked = []
    for name in ("load_causal_lm", "load_tokenizer"):
        real = getattr(checkpointing, name)

        def spy(path, trust_remote_code=False, real=real, name=name):
            asked.append((name, trust_remote_code))
            return real(path, False)

        monkeypatch.setattr(checkpointing, name, spy)
    assert main(["consolidate", str(checkpoint), str(tmp_path / "out")]) == 0
    assert asked == [("load_causal_lm", False), ("load_tokenizer", False)]
    asked.clear()
    assert main(["consolidate", str(checkpoint), str(tmp_path / "o2"), "--trust-remote-code"]) == 0
    assert asked == [("load_causal_lm", True), ("load_tokenizer", True)]


# 13. the run's end, rewinds, more processes (an adversarial probe's findings) -----------------


@pytest.mark.slow
def test_a_run_killed_in_its_end_finishes_it_on_rerun(tmp_path, monkeypatch, capsys):
    """Killed after its last checkpoint (here in the final save), a run was "already finished"
    for good: no final/, no evaluation after RL, no report, and a sweep failed it forever."""
    from advantage.rl import checkpointing

    run_dir = tmp_path / "run"
    end = ("checkpoint.save_final=true", "data.eval=builtin:reverse:eval", "eval.size=8")
    real_save = checkpointing.save_final

    def killed(run):
        raise _Killed

    monkeypatch.setattr(checkpointing, "save_final", killed)
    with pytest.raises(_Killed):
        _trainer(run_dir, *end).fit()
    assert ckpt.finished_step(run_dir) is None and not (run_dir / "final").exists()
    monkeypatch.setattr(checkpointing, "save_final", real_save)
    result = _trainer(run_dir, *end).fit()
    assert "step 2 is trained and saved, the run's end" in capsys.readouterr().out
    assert ckpt.finished_step(run_dir) == 2 and (run_dir / "final" / "config.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["step"] for r in records if "eval/accuracy" in r]
    assert evaluations == [0, 2] and result.eval_after["eval/accuracy"] >= 0  # logged once
    again = _trainer(run_dir, *end).fit()
    assert "already finished at step 2; nothing to do" in capsys.readouterr().out
    assert again.eval_after == {k: v for k, v in records[-1].items() if k.startswith("eval/")}


@pytest.mark.slow
def test_a_rewind_sets_the_abandoned_trajectory_aside(run_copy, caplog):
    """Resuming an older checkpoint left the newer ones (and the finished mark) in place: a
    later auto-resume continued the abandoned trajectory."""
    older = run_copy / "checkpoints" / "step-000001"
    with caplog.at_level("WARNING", logger="advantage"):
        trainer = _trainer(run_copy, f"checkpoint.resume={older}", "train.lr=0.5")
    trainer.close()
    assert f"resuming step 1 of {run_copy}, which had gone further" in caplog.text
    (aside,) = run_copy.glob("abandoned-*")
    kept = ["finished.json", "metrics.jsonl", "samples.jsonl", "step-000002"]
    assert sorted(p.name for p in aside.iterdir()) == kept

    def steps(path):
        return [json.loads(line)["step"] for line in path.read_text().splitlines()]

    assert max(steps(aside / "metrics.jsonl")) == 2 and max(steps(run_copy / "metrics.jsonl")) == 1
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step-000001"]
    assert _trainer(run_copy, "train.lr=0.5").step == 1  # auto: the new trajectory's newest


def test_a_rank_the_checkpoint_has_no_rng_state_for_keeps_its_own(tmp_path):
    """A 1-process checkpoint resumed in 2: rank 1 took rank 0's RNG state, so both ranks drew
    the same sampling noise. Now it keeps its own (the trainer seeds it from its rank)."""
    model = torch.nn.Linear(2, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, {"policy": model}, {}, {"step": 1}, rank=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ckpt.load_checkpoint(path, {"policy": model}, {}, rank=1)
    assert torch.equal(torch.rand(3), expected)  # untouched (the trainer seeds it by rank)
    torch.manual_seed(5)
    ckpt.load_checkpoint(path, {"policy": model}, {}, rank=0)
    restored = torch.rand(3)  # the saved stream's, not seed 5's
    torch.manual_seed(5)
    assert not torch.equal(restored, torch.rand(3))
