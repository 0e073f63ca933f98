"""Synchronous against asynchronous rollouts on this machine, the demo recipe's work.

    .venv/bin/python benchmarks/async_bench.py [--steps 30] [--warmup 3]

- `sync`: one process with every core: each step samples, then trains.
- `async k=1`: the trainer with half the cores and the rollout worker with the other half:
  batch i is sampled by the weights of update i - 1 while update i - 1 ... i trains.

Per system: median seconds per step (after `--warmup` steps), rollout tokens per second of wall
time, and each side's utilisation (the share of the wall time it computes: the trainer's
no-grad passes + update; the worker's sampling + scoring). Then the gain to expect where each
side has a device of its own (GPUs): sync step = R + U, async step = max(R, U), with R (rollout)
and U (the rest of a step) measured in the synchronous run. Results go to
benchmarks/results/async-latest.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_utils import bf16_flags, cpu_name

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "advantage" / "recipes" / "demo.yaml"


def run(system: str, steps: int, out: Path) -> list[dict]:
    cores = os.cpu_count() or 2
    extra = {
        "sync": [],
        "async": ["train.max_staleness=1", f"distributed.rollout_threads={cores // 2}"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(cores if system == "sync" else cores - cores // 2)}
    cmd = [sys.executable, "-m", "advantage", "train", str(RECIPE), f"train.steps={steps}",
           f"log.run_dir={out}", "log.tensorboard=false", "log.report=false", "eval.size=0",
           "checkpoint.save_final=false", *extra[system]]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(system: str, records: list[dict], warmup: int) -> dict:
    timed = [r for r in records if r.get("step", 0) > warmup and "time/step" in r]
    med = lambda key: statistics.median(r.get(key, 0.0) for r in timed)  # noqa: E731
    rollout, train = med("time/rollout") + med("time/reward"), med("time/train")
    if system == "sync":
        step = med("time/step")
        trainer_busy, worker_busy = train / step, rollout / step
    else:  # the trainer's step waits for the batch; the worker's for weights
        step = med("time/step") + med("async/trainer_wait")
        trainer_busy = train / step
        worker_busy = rollout / max(rollout + med("async/worker_wait"), 1e-9)
    tokens = med("completion/length") * 128  # 16 prompts × 8 completions
    return {
        "system": system, "s_per_step": step, "rollout_tokens_per_s": tokens / step,
        "trainer_utilisation": trainer_busy, "worker_utilisation": worker_busy,
        "rollout_s": rollout, "train_s": train,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in ("sync", "async"):
            records = run(system, args.steps, Path(tmp) / system)
            rows.append(summarise(system, records, args.warmup))
    sync = rows[0]
    R, U = sync["rollout_s"], sync["s_per_step"] - sync["rollout_s"]
    gpu_gain = (R + U) / max(R, U)
    lines = [
        f"# sync vs async rollouts ({datetime.date.today()}, {cpu_name()} ({bf16_flags()}), "
        f"{os.cpu_count()} cores, {args.steps} steps, median after {args.warmup})",
        "",
        "| system | s/step | × vs sync | rollout tok/s | trainer busy | worker busy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['s_per_step']:.3f} | {sync['s_per_step'] / r['s_per_step']:.2f} "
            f"| {r['rollout_tokens_per_s']:.0f} | {r['trainer_utilisation']:.0%} "
            f"| {r['worker_utilisation']:.0%} |"
        )
    lines += [
        "",
        f"Synchronous phases: rollout R = {R:.3f} s, the rest U = {U:.3f} s per step. With a "
        f"device per side, async takes max(R, U): expected gain (R + U) / max(R, U) = "
        f"{gpu_gain:.2f}×.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    results = ROOT / "benchmarks" / "results"
    (results / "async-latest.md").write_text(text)
    (results / "async-latest.json").write_text(
        json.dumps({"rows": rows, "gpu_gain": gpu_gain}, indent=1)
    )


if __name__ == "__main__":
    main()
