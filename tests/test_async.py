"""Asynchronous rollouts (SPEC §7 "Overlap"): staleness 0 is the synchronous run bit for bit,
staleness k bounds (and fixes) every batch's lag, a killed run resumes exactly, and a worker
that dies gives one clear error while the checkpoints stay."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advantage.rl.async_rollout import WorkerError
from advantage.rl.config import load_config
from advantage.rl.trainer import Trainer
from helpers import length_reward, small_config

pytestmark = pytest.mark.slow
VOLATILE = ("time", "tokens_per_s/", "async/")


def _config(run_dir, *extra):
    return load_config(
        None,
        small_config(
            run_dir, "train.steps=4", "train.deterministic=true", "distributed.rollout_threads=1",
            "log.report=false", *extra,
        ),
    )  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(VOLATILE)} for line in lines
    ]


def _weights(run_dir: Path, step: int = 4) -> str:
    path = run_dir / "checkpoints" / f"step-{step:06d}" / "policy.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker uses one thread: the same kernels on both sides
    yield
    torch.set_num_threads(threads)


def test_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path):
    Trainer(_config(tmp_path / "sync"), [length_reward]).fit()
    result = Trainer(_config(tmp_path / "k0", "train.max_staleness=0"), [length_reward]).fit()
    assert [m["async/staleness"] for m in result.metrics] == [0.0] * 4
    assert _records(tmp_path / "sync") == _records(tmp_path / "k0")
    assert _weights(tmp_path / "sync") == _weights(tmp_path / "k0")


def test_staleness_k_bounds_and_fixes_every_lag(tmp_path):
    config = _config(tmp_path / "k2", "train.max_staleness=2", "train.steps=5")
    result = Trainer(config, [length_reward]).fit()
    lags = [m["async/staleness"] for m in result.metrics]
    assert lags == [0.0, 1.0, 2.0, 2.0, 2.0]  # batch i is sampled by version max(0, i - 2)
    # a stale batch: the proximal forward differs from the engine's (behaviour) log-probs
    assert result.metrics[-1]["rollout/logprob_gap"] > 1e-4


def _cli(run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "advantage", "train", "model.name_or_path=builtin:tiny-random",
        "data.train=builtin:reverse", f"log.run_dir={run_dir}", "log.progress=false",
        "log.tensorboard=false", "log.report=false", "rollout.prompts_per_step=2",
        "rollout.num_generations=4", "rollout.max_new_tokens=6", "train.steps=5", "train.lr=1e-3",
        "train.deterministic=true", "eval.size=0", "checkpoint.save_final=false",
        "checkpoint.every=1", "reward.functions=[helpers:length_reward]",
        "train.max_staleness=1", "distributed.rollout_threads=1", *extra,
    ]  # fmt: skip


def _env() -> dict:
    tests = str(Path(__file__).parent)
    return {**os.environ, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_a_killed_asynchronous_run_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_cli(whole), env=_env(), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300

    def saved_step_2() -> bool:  # step-000002 or a later one: with keep=2 step 2 is pruned soon
        done = (killed / "checkpoints").glob("step-*/trainer_state.json")
        return any(int(p.parent.name[5:]) >= 2 for p in done)

    while not saved_step_2():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # the worker follows its trainer
    proc.wait()
    out = subprocess.run(_cli(killed), env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout
    assert _weights(whole, 5) == _weights(killed, 5)
    assert _records(whole) == _records(killed)


def dies_once(prompts, completions, **kwargs):
    """A reward that kills its process (the rollout worker) the second time it runs, once."""
    flag = Path(os.environ["ADVANTAGE_TEST_FLAG"])
    count = int(flag.read_text()) if flag.exists() else 0
    flag.write_text(str(count + 1))
    if count == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return length_reward(prompts, completions)


def test_a_dead_worker_is_one_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVANTAGE_TEST_FLAG", str(tmp_path / "flag"))
    config = _config(tmp_path / "run", "train.max_staleness=0", "checkpoint.every=1")
    with pytest.raises(
        WorkerError,
        match=r"the rollout worker \(pid \d+\) was killed by SIGKILL; checkpoints .* resume",
    ):
        Trainer(config, [dies_once]).fit()
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").exists()
    result = Trainer(config, [dies_once]).fit()  # the rerun resumes from step 1
    assert len(result.metrics) == 3


def test_a_worker_that_dies_before_connecting_is_an_error_not_a_wait(tmp_path):
    # an adversarial probe: a script training without `if __name__ == "__main__":` had its
    # worker (spawn: it imports the script) fail before connecting; the trainer waited 30 min
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import advantage\n"
        "advantage.train({'model': {'name_or_path': 'builtin:tiny-random'},\n"
        "                 'data': {'train': 'builtin:reverse'}, 'eval': {'size': 0},\n"
        f"                 'log': {{'run_dir': {str(tmp_path / 'run')!r}, 'progress': False}},\n"
        "                 'train': {'steps': 2, 'max_staleness': 1},\n"
        "                 'reward': {'functions': ['exact_match']}})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 1
    assert re.search(
        r"WorkerError: the rollout worker \(pid \d+\) exited with code 1 before it connected "
        r"\(its error is printed above; .* under `if __name__ == '__main__':`",
        out.stderr,
    ), out.stderr[-2000:]
    assert "is in use by another run" in out.stderr  # the worker's own error, printed above


def test_a_worker_started_separately_connects_to_its_trainer(tmp_path):
    """`advantage rollout-worker CONFIG --connect HOST:PORT` (another machine's worker) is the
    same worker: staleness 0 still gives the synchronous run's weights."""
    from advantage.engine.link import free_port

    port = free_port()
    address = f"127.0.0.1:{port}"
    remote = _cli(
        tmp_path / "remote", "train.max_staleness=0", f"distributed.rollout_address={address}"
    )
    trainer = subprocess.Popen(
        remote, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    worker_cmd = [
        sys.executable,
        "-m",
        "advantage",
        "rollout-worker",
        *remote[4:],
        "--connect",
        address,
    ]
    worker = subprocess.run(worker_cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert trainer.wait(timeout=600) == 0, trainer.stderr.read()[-2000:]
    assert worker.returncode == 0, worker.stderr[-2000:]
    local = tmp_path / "local"
    subprocess.run(
        _cli(local, "train.max_staleness=0"), env=_env(), check=True, capture_output=True
    )
    assert _weights(tmp_path / "remote", 5) == _weights(local, 5)


def raises_on_training(prompts, completions, **kwargs):
    """A reward function with a bug that shows at the second training batch."""
    flag = Path(os.environ["ADVANTAGE_TEST_FLAG"])
    count = int(flag.read_text()) if flag.exists() else 0
    flag.write_text(str(count + 1))
    if count == 1:
        raise ZeroDivisionError("a bug in the reward")
    return length_reward(prompts, completions)


def test_an_error_in_the_worker_is_raised_as_the_synchronous_loop_raises_it(tmp_path, monkeypatch):
    """It reached the user as `WorkerError: ... exited with code 1 ... run the same command
    again to resume` (which fails the same way), exit code 1: now the reward function's own
    RewardError, the CLI's one line and exit code 2."""
    from advantage.engine.reward_call import RewardError

    monkeypatch.setenv("ADVANTAGE_TEST_FLAG", str(tmp_path / "flag"))
    config = _config(tmp_path / "run", "train.max_staleness=1")
    with pytest.raises(RewardError, match=r"reward function 'raises_on_training' raised Zero"):
        Trainer(config, [raises_on_training]).fit()


def test_ctrl_c_in_a_terminal_stops_an_asynchronous_run_with_a_checkpoint(tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the worker died of it, and the
    trainer could not receive the batches its stop checkpoint holds (a traceback, exit 1, the
    step lost). The worker leaves signals to its trainer."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(run_dir, "train.steps=1000", "checkpoint.every=0"), env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(_records(run_dir)) < 2:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGINT after step" in stderr
    step = max(r["step"] for r in _records(run_dir))
    assert (run_dir / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").exists()


def test_a_resume_line_says_which_queued_batches_keep_the_old_settings():
    """A probe: resumed with `rollout.temperature` and `reward.functions` changed, steps 3–4
    trained batches sampled at the old temperature and scored by the old function, unsaid."""
    from types import SimpleNamespace

    from advantage.rl.config_changes import Change
    from advantage.rl.resuming import _queued_note

    state = SimpleNamespace(step=2, pending={"queue": [{}, {}]})
    changes = [Change("rollout.temperature", 1.0, 0.5), Change("train.lr", 1e-3, 1e-4)]
    assert _queued_note(state, changes) == (
        " (steps 3–4 train the 2 batch(es) sampled and scored before the checkpoint, under the "
        "old rollout.temperature)"
    )
    assert _queued_note(state, changes[1:]) == ""
    assert _queued_note(SimpleNamespace(step=2, pending=None), changes) == ""
