"""Exact resume: a run killed with SIGKILL at three different steps and resumed ends with the
same weights (bitwise) and the same metrics after the kill point as an uninterrupted run."""

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

pytestmark = pytest.mark.slow

STEPS = 8
VOLATILE = ("time", "time/", "tokens_per_s/")  # wall-clock figures differ run to run


def _command(run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "advantage",
        "train",
        "algorithm=reinforce",
        "model.name_or_path=builtin:tiny-random",
        f"log.run_dir={run_dir}",
        "log.progress=false",
        "log.tensorboard=false",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=6",
        f"train.steps={STEPS}",
        "train.lr=1e-3",
        "train.epochs=2",
        "train.minibatches=2",
        "train.deterministic=true",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "eval.size=0",
        "checkpoint.save_final=false",
        "reward.functions=[helpers:length_reward]",
    ]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {
            k: v for k, v in rec.items() if not k.startswith(VOLATILE) and k != "time"
        }
    return out


def _weights_hash(run_dir: Path) -> str:
    last = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert last.name == f"step-{STEPS:06d}"
    return hashlib.sha256((last / "policy.safetensors").read_bytes()).hexdigest()


def _run_to_end(run_dir: Path) -> int | None:
    """Run to the last step; return the step it resumed from (None for a fresh start)."""
    out = subprocess.run(_command(run_dir), env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"resumed from .*step-\d+ \(step (\d+)\)", out.stdout)
    return int(found.group(1)) if found else None


def _run_and_kill(run_dir: Path, kill_after_step: int) -> int:
    """Start a run and SIGKILL it as soon as `kill_after_step` is logged; return the last step
    logged at the moment of the kill."""
    proc = subprocess.Popen(
        _command(run_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if max(_records(run_dir), default=0) >= kill_after_step:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return max(_records(run_dir))


def test_sigkill_and_resume_is_exact(tmp_path):
    reference = tmp_path / "uninterrupted"
    _run_to_end(reference)
    expected_hash, expected = _weights_hash(reference), _records(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    report = []
    for kill_at in (2, 4, 7):
        run_dir = tmp_path / f"killed-at-{kill_at}"
        killed = _run_and_kill(run_dir, kill_at)
        resumed = _run_to_end(run_dir)  # checkpoint.resume=auto: the newest complete checkpoint
        assert resumed is not None and killed - 1 <= resumed <= killed
        got_hash, got = _weights_hash(run_dir), _records(run_dir)
        report.append((killed, resumed, got_hash[:16], expected_hash[:16]))
        assert got_hash == expected_hash, f"weights differ after a kill at step {killed}"
        for step in range(killed + 1, STEPS + 1):
            assert got[step] == expected[step], (
                f"metrics of step {step} differ (killed at {killed})"
            )
        assert sorted(got) == list(range(1, STEPS + 1))  # no step lost or logged twice
    print("\nSIGKILL after step | resumed from checkpoint | sha256(final weights) | uninterrupted")
    for killed, resumed, got, exp in report:
        print(f"  {killed} | step {resumed} | {got}… | {exp}…")
