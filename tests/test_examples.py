"""The examples run unchanged: TRL-style reward functions, and a toy task of your own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, cwd: Path, *overrides: str) -> str:
    """Run examples/NAME with `key=value` overrides in `cwd`; its stdout (it must succeed)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *overrides, "log.tensorboard=false"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},  # this checkout's package
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_trl_reward_function_example(tmp_path):
    out = run_example(
        "trl_reward_function.py",
        tmp_path,
        "train.steps=3",
        f"log.run_dir={tmp_path}",
        "eval.size=20",
    )
    assert "held-out accuracy:" in out
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"reward/reward_len"' in metrics and '"reward/reverse_accuracy"' in metrics


@pytest.mark.slow
def test_own_toy_task_example(tmp_path):
    out = run_example(
        "own_toy_task.py", tmp_path, "sft.train.steps=5", "train.steps=2", "eval.size=20"
    )
    assert "held-out accuracy:" in out
    work = tmp_path / "runs" / "own_toy_task"
    assert (work / "init" / "config.json").is_file()
    assert '"reward/upper_correct"' in (work / "grpo" / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tools", "environment"])
def test_trl_tools_example(tmp_path, shape):
    """A TRL-style tool function and a TRL-style environment class train unchanged."""
    flags = ["--environment"] if shape == "environment" else []
    out = run_example(
        "trl_tools.py",
        tmp_path,
        *flags,
        "train.steps=2",
        "rollout.prompts_per_step=4",
        f"log.run_dir={tmp_path}",
        "eval.size=16",
    )
    assert "held-out accuracy:" in out and "tool-call rate" in out
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"tools/call_rate"' in metrics and '"reward/correct"' in metrics
    if shape == "environment":  # the environment's get_reward() is a reward source
        assert '"reward/environment"' in metrics


def test_trl_tools_example_scores_the_models_last_turn():
    """An episode cut inside a tool's reply ends on it; scoring the last message credited the
    tool's output as the answer (a probe: held-out "accuracy" = the tool-call rate)."""
    import runpy

    correct = runpy.run_path(str(ROOT / "examples" / "trl_tools.py"))["correct"]
    answered = [{"role": "assistant", "content": "<calc>2+3</calc>"},
                {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]  # fmt: skip
    cut = answered[:2]
    assert correct(["2+3="] * 2, [answered, cut], ["5", "5"]) == [1.0, 0.0]
