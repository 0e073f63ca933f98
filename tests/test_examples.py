"""The example that trains with TRL-style reward functions runs unchanged."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_trl_reward_function_example(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "trl_reward_function.py"),
            "train.steps=3",
            f"log.run_dir={tmp_path}",
            "eval.size=20",
            "log.tensorboard=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out accuracy:" in out.stdout
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"reward/reward_len"' in metrics and '"reward/reverse_accuracy"' in metrics


@pytest.mark.slow
def test_own_toy_task_example(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "own_toy_task.py"),
            "sft.train.steps=5",
            "train.steps=2",
            "eval.size=20",
            "log.tensorboard=false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out accuracy:" in out.stdout
    assert (tmp_path / "runs" / "own_toy_task" / "init" / "config.json").is_file()
    metrics = (tmp_path / "runs" / "own_toy_task" / "grpo" / "metrics.jsonl").read_text()
    assert '"reward/upper_correct"' in metrics
