"""The fixed workload of `bench_grpo.py` (the default): 8 prompts of the `reverse` task (~8
tokens) × 8 completions × exactly NEW_TOKENS new tokens, EOS ignored in every system, one
forward/backward over the whole batch; the untrained `builtin:{size}-random` models."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

from bench_utils import (
    BETA,
    GENERATIONS,
    PROMPTS,
    advantage_api,
    builtin_model_folder,
    forward_flops,
)

NEW_TOKENS = 16


def distinct_letters(prompts, completions, **kwargs):
    """A cheap reward with variance: the number of distinct characters of the completion."""
    return [float(len(set(c))) for c in completions]


def bench_rows() -> list[dict]:
    return advantage_api().get_task("reverse").train_rows()[: PROMPTS * 64]


def matmul_flops_per_step(config, prompt_len: float) -> float:
    """FLOPs of the step's matrix products (linear layers, attention, LM head on completion
    positions): generation (prefill + 16 decode steps), the reference forward, and the policy's
    forward + backward (3× a forward)."""
    Tp, Tc = prompt_len, NEW_TOKENS
    generation = forward_flops(config, Tp, 0, 1) + forward_flops(config, Tc - 1, Tp, Tc - 1)
    full = forward_flops(config, Tp + Tc, 0, Tc + 1)
    per_sequence = generation + full + 3 * full
    return per_sequence * PROMPTS * GENERATIONS


def settings(size: str) -> dict:
    """Model folder, prompt rows, reward, and each system's options for this workload."""
    return dict(
        model=builtin_model_folder(size), rows=bench_rows(), reward=distinct_letters,
        advantage=[f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.ignore_eos=true",
                   "reward.functions=[fixed:distinct_letters]"],
        trl=dict(per_device_train_batch_size=PROMPTS * GENERATIONS, max_completion_length=NEW_TOKENS,
                 generation_kwargs={"min_new_tokens": NEW_TOKENS}),
    )  # fmt: skip


def summarise(results: dict, peaks: dict) -> tuple[list[dict], str]:
    rows = []
    for (system, size, precision), runs in results.items():
        steps = [s for r in runs for s in r["step_s"]]
        med = statistics.median(steps)
        phases = {k: statistics.median(r["phases_s"][k] for r in runs if k in r["phases_s"])
                  for k in runs[0]["phases_s"]}  # fmt: skip
        rows.append({"system": system, "size": size, "precision": precision, "step_s": med,
                     "steps_timed": len(steps), "phases_s": phases,
                     "peak_rss_mb": max(r["peak_rss"] for r in runs) / 2**20,
                     "top_ops": runs[0]["top_ops"], "logprob_gap": runs[0].get("logprob_gap")})  # fmt: skip
    # FLOPs from the advantage run of the same size (same model and work)
    flops = {}
    for (system, size, _), runs in results.items():
        if system.startswith("advantage") and "prompt_len" in runs[0]:
            cfg = SimpleNamespace(**runs[0]["config"])
            flops[size] = matmul_flops_per_step(cfg, runs[0]["prompt_len"])
    for row in rows:
        trl = next((r for r in rows if r["system"] == "trl" and r["size"] == row["size"]
                    and r["precision"] == row["precision"]), None)  # fmt: skip
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
    return "\n".join(lines)
