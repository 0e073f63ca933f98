"""GRPO step time: `advantage` against TRL's GRPOTrainer, same machine, same models, same work.

    make bench                                   # both workloads, every size, precision, system
    make bench BENCH_ARGS="--systems advantage trl --steps 3"     # the README's tables
    make bench BENCH_ARGS="--workload fixed --sizes tiny --precisions fp32 --steps 3"

`--workload both` (the default) runs `fixed`, then `realistic`. `fixed`, per step in every system: 8 prompts × 8 completions × exactly
16 new tokens (EOS ignored), β = 0.04 (a reference forward pass), one epoch, one minibatch, on
locally built Qwen2 models: `tiny` (hidden 256, 4 layers, 4 heads, 2 KV heads, MLP 512) and
`small` (512, 8, 8, 4, 1408). `--workload realistic`: the same models with an EOS rate in their
weights, prompts of 64–256 tokens, completions that stop at EOS (lengths ~1 to 256), the
positions each system processes counted against those the work needs (see realistic.py).
Each (system, size, precision) runs in its own subprocess so peak RSS is its own; the systems
alternate over rounds, and step times are the median over every timed step of every round.

Writes benchmarks/results/latest.json and latest.md (realistic: realistic-latest.*), and dated
copies.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fixed
import realistic
from bench_utils import (
    BETA,
    GENERATIONS,
    PROMPTS,
    advantage_api,
    bf16_flags,
    cpu_name,
    matmul_peak,
    peak_rss_bytes,
    profile_top_ops,
    top_ops_lines,
    version,
    vllm_version,
)

HERE = Path(__file__).resolve().parent
WORKLOADS = {"fixed": fixed, "realistic": realistic}
SYSTEMS = ("advantage", "advantage-vllm", "advantage-native", "trl")
# advantage-native: bf16 with PyTorch's own bf16 GEMM kernels (model.bf16_matmul=native), the
# kernels TRL's autocast uses; `advantage` itself picks fp32 GEMMs of the bf16 operands on CPUs
# without bf16 matrix units (advantage/precision.py). In fp32 it is `advantage`: not run.


# ---------------------------------------------------------------------------------------------
# workers: one (system, size, precision) per process; print one JSON line


def worker_advantage(system: str, size: str, precision: str, opts: argparse.Namespace) -> dict:
    steps, warmup, workload = opts.steps, opts.warmup, opts.workload
    api = advantage_api()
    settings = WORKLOADS[workload].settings(size)
    counter = realistic.PositionCounter() if workload == "realistic" else None
    rows_path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in settings["rows"]))
    overrides = [
        f"model.name_or_path={settings['model']}", f"data.train={rows_path}", "data.eval=null",
        f"log.run_dir={tempfile.mkdtemp()}", "log.progress=false", "log.tensorboard=false",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.num_generations={GENERATIONS}",
        f"model.precision={precision}", f"algo.kl_coef={BETA}", f"train.steps={warmup + steps + 1}",
        "train.lr=1e-6", "eval.size=0", "checkpoint.save_final=false", "log.samples=0",
        *settings["advantage"],
    ]  # fmt: skip
    if system == "advantage-native":
        overrides.append("model.bf16_matmul=native")
    if system == "advantage-vllm":
        overrides += ["rollout.backend=vllm",
                      "rollout.vllm={max_model_len: 128, kv_cache_memory_bytes: 67108864}"]  # fmt: skip
    t0 = time.perf_counter()
    trainer = api.Trainer(api.load_config(None, overrides))
    setup = time.perf_counter() - t0
    metrics, counted = [], []
    for _ in range(warmup + steps):
        metrics.append(trainer.train_step())
        if counter:
            counted.append(counter.take_step())
    timed = metrics[warmup:]
    phases = {
        name: statistics.median(m[f"time/{key}"] for m in timed)
        for name, key in [("rollout", "rollout"), ("reward", "reward"), ("ref_logprobs", "logprobs"),
                          ("update", "update")]
    }  # fmt: skip
    top = profile_top_ops(trainer.train_step) if opts.profile else []
    prompts = [r["prompt"] for r in settings["rows"]]
    prompt_len = sum(len(trainer.tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    return {
        "step_s": [m["time/step"] for m in timed], "phases_s": phases, "setup_s": setup,
        "prompt_len": prompt_len, "config": trainer.policy.config.to_dict(), "top_ops": top,
        "peak_rss": peak_rss_bytes(), "steps": counted[warmup:],
        "logprob_gap": statistics.median(m.get("rollout/logprob_gap", float("nan")) for m in timed),
    }  # fmt: skip


def worker_trl(size: str, precision: str, opts: argparse.Namespace) -> dict:
    import datasets
    import torch
    from transformers import AutoConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from advantage.engine.models import load_tokenizer

    steps, warmup, workload = opts.steps, opts.warmup, opts.workload
    settings = WORKLOADS[workload].settings(size)
    counter = realistic.PositionCounter() if workload == "realistic" else None
    folder = settings["model"]
    # the folder's own tokenizer, as advantage loads it (AutoTokenizer rebuilds these
    # character-level tokenizers as Qwen2's byte-level one, which drops spaces: fewer tokens)
    tokenizer = load_tokenizer(folder)
    ends: list[float] = []
    counted: list[dict] = []
    phase_log: dict[str, list[float]] = {"rollout": [], "reward": [], "ref_logprobs": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            if counter:
                counted.append(counter.take_step())

    total_steps = warmup + steps
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), num_generations=GENERATIONS, beta=BETA, num_iterations=1,
        learning_rate=1e-6, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
        bf16=precision == "bf16", max_steps=total_steps, temperature=1.0, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **settings["trl"],
    )  # fmt: skip
    dataset = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "answer"}
                                          for r in settings["rows"]])  # fmt: skip
    reward = settings["reward"]
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=folder, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimer()])  # fmt: skip
    setup = time.perf_counter() - t0

    def timed(name, fn):
        def wrapper(*a, **kw):
            if name == "ref_logprobs" and torch.is_grad_enabled():
                return fn(*a, **kw)  # the policy's own forward in the loss: part of "update"
            start = time.perf_counter()
            out = fn(*a, **kw)
            phase_log[name].append(time.perf_counter() - start)
            return out

        return wrapper

    trainer._generate_single_turn = timed("rollout", trainer._generate_single_turn)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = timed(
        "ref_logprobs", trainer._get_per_token_logps_and_entropies
    )
    trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(ends)][warmup:]
    phases = {k: statistics.median(v[warmup:]) for k, v in phase_log.items() if len(v) > warmup}
    phases["update"] = statistics.median(step_s) - sum(phases.values())
    top = []
    if opts.profile:  # one more step under the profiler
        args.max_steps = 1
        prof_trainer = GRPOTrainer(model=folder, reward_funcs=reward, args=args,
                                   train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
        top = profile_top_ops(prof_trainer.train)
    return {
        "step_s": step_s, "phases_s": phases, "setup_s": setup, "top_ops": top,
        "peak_rss": peak_rss_bytes(), "steps": counted[warmup:total_steps],
        "config": AutoConfig.from_pretrained(folder).to_dict(),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the parent: peaks, rounds, report


def run_worker(
    system: str, size: str, precision: str, steps: int, opts: argparse.Namespace
) -> dict:
    path = os.pathsep.join([str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__)), "--worker", system, size, precision,
           "--steps", str(steps), "--warmup", str(opts.warmup), "--workload", opts.workload,
           *([] if opts.profile else ["--no-profile"])]  # fmt: skip
    out = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=path), capture_output=True,
                         text=True, timeout=3 * 3600)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {size} {precision} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SIZE", "PRECISION"))
    parser.add_argument(
        "--workload",
        choices=("both", "fixed", "realistic"),
        default="both",
        help="both: the fixed workload, then the realistic one, in one run",
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--bf16-rounds", type=int, default=1, help="bf16 is slow on CPUs without native bf16"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the profiled step (top operators) after the timed ones",
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.worker:
        system, size, precision = args.worker
        if system == "trl":
            result = worker_trl(size, precision, args)
        else:
            result = worker_advantage(system, size, precision, args)
        print(json.dumps(result))
        return
    if args.workload != "fixed" and "advantage-vllm" in args.systems:
        print("the realistic workload counts the positions of transformers' Qwen2Model forwards, "
              "which vLLM does not call: advantage-vllm runs in the fixed one only", flush=True)  # fmt: skip
    peaks = matmul_peak()
    print(
        f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    for workload in ("fixed", "realistic") if args.workload == "both" else (args.workload,):
        run_workload(workload, peaks, args)


def run_workload(workload: str, peaks: dict, args: argparse.Namespace) -> None:
    """Every (size, precision, system) of `workload`, the systems alternating over rounds; the
    results table written to `args.out`."""
    opts = argparse.Namespace(**{**vars(args), "workload": workload})
    systems = [s for s in args.systems if workload == "fixed" or s != "advantage-vllm"]
    for size in args.sizes:  # build the models once, before the workers
        WORKLOADS[workload].settings(size)
    print(f"workload {workload}", flush=True)
    results: dict = {}
    for size in args.sizes:
        for precision in args.precisions:
            for r in range(args.rounds if precision == "fp32" else args.bf16_rounds):
                k = r % len(systems)
                for system in systems[k:] + systems[:k]:
                    if system == "advantage-native" and precision != "bf16":
                        continue
                    steps = args.steps if precision == "fp32" else max(2, args.steps // 2)
                    res = run_worker(system, size, precision, steps, opts)
                    results.setdefault((system, size, precision), []).append(res)
                    print(f"  {size} {precision} round {r + 1} {system}: median "
                          f"{statistics.median(res['step_s']):.3f} s/step", flush=True)  # fmt: skip
    rows, table = WORKLOADS[workload].summarise(results, peaks)
    table = "\n".join([table, *top_ops_lines(rows)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_name()} ({bf16_flags()})"
    header = (f"Run {stamp} on {machine}; torch {version('torch')}, transformers {version('transformers')}, "
              f"trl {version('trl')}, {vllm_version()}; `{' '.join(sys.argv[1:])}`.\n\n")  # fmt: skip
    record = {"date": stamp, "machine": machine, "workload": workload, "argv": sys.argv[1:],
              "peaks_gflops": peaks, "rows": rows}  # fmt: skip
    prefix = "" if workload == "fixed" else f"{workload}-"
    for name in ("latest", stamp):
        (out / f"{prefix}{name}.json").write_text(json.dumps(record, indent=1))
        (out / f"{prefix}{name}.md").write_text(header + table + "\n")
    print(header + table, flush=True)


if __name__ == "__main__":
    main()
