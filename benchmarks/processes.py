"""The demo task with 1 process (2 threads) against 2 processes (torchrun, gloo, 1 thread each)
on the same machine: seconds per step, tokens per second, held-out accuracy.

    .venv/bin/python benchmarks/processes.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "src" / "advantage" / "recipes" / "demo.yaml"


def run(processes: int, steps: int, strategy: str) -> dict:
    run_dir = tempfile.mkdtemp(prefix=f"procs{processes}-")
    args = [
        "train",
        str(RECIPE),
        f"train.steps={steps}",
        f"log.run_dir={run_dir}",
        "log.tensorboard=false",
        "log.report=false",
        "eval.pass_k=0",
        f"distributed.strategy={strategy}",
    ]
    env = dict(os.environ)
    if processes == 1:
        cmd = [sys.executable, "-m", "advantage", *args]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // processes))
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            "-m",
            "advantage",
            *args,
        ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    records = [
        json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps_ = [r for r in records if "time/step" in r][3:]  # skip warm-up steps
    evals = [r for r in records if "eval/accuracy" in r]
    return {
        "processes": processes,
        "strategy": strategy,
        "s_per_step": statistics.median(r["time/step"] for r in steps_),
        "train_tok_s": statistics.median(r["tokens_per_s/train"] for r in steps_),
        "rollout_tok_s": statistics.median(r["tokens_per_s/rollout"] for r in steps_),
        "accuracy": (evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = [run(1, args.steps, "ddp"), run(2, args.steps, "ddp"), run(2, args.steps, "fsdp2")]
    base = rows[0]["s_per_step"]
    print(
        "| processes | strategy | s/step | × vs 1 process | rollout tok/s (per rank) | train tok/s (per rank) | held-out accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['processes']} | {r['strategy'] if r['processes'] > 1 else '–'} | {r['s_per_step']:.3f} | "
            f"{base / r['s_per_step']:.2f} | {r['rollout_tok_s']:.0f} | {r['train_tok_s']:.0f} | "
            f"{100 * r['accuracy'][0]:.1f}% → {100 * r['accuracy'][1]:.1f}% |"
        )


if __name__ == "__main__":
    main()
