"""The realistic workload of `bench_grpo.py --workload realistic`: long prompts, completions that
stop at EOS with lengths spread up to the budget, and counts of the work each system does.

The prompts: POOL strings of lowercase words, one token per character, PROMPT_TOKENS[0] to
PROMPT_TOKENS[1] tokens (with `<bos>`), lengths uniform; each step draws P = 8 of them, G = 8
completions each, at most BUDGET new tokens.

The model. An untrained model almost never samples EOS, and neither system has an EOS bias
both could be given identically, so the bias is in the weights: `with_stop_rate` turns the
untrained `builtin:{size}-random` model into one that samples EOS with probability ≈ STOP_P at
every position, whatever the context, and never samples `<pad>`, `<bos>` or `<unk>`. Residual
channel 0 holds a constant (every embedding has it, no layer writes it), so after the final
RMSNorm it is ≈ √H; an untied LM head reads only that channel for the EOS and special-token
biases. The other logits stay those of the random model (near uniform over the 83
characters). Both systems load the same folder, sample at temperature 1 without top-k/top-p, so
the completion lengths of both follow the same law: geometric with mean 1/STOP_P = 128, cut
at BUDGET (≈ 7% end within 10 tokens, ≈ 13% reach the budget, mean ≈ 111; observed in a first
run: means 105–127, 10–15% at the budget, `small` a little longer as its other logits spread
more). The matrix shapes are those of any Qwen2 of the size; only the weights' values are special.

The reward, `length_variety`, is |L − mean L of the group| / BUDGET: it favours spread within a
group and gives advantages that are not all zero. It also records each step's prompt and
completion lengths (the token ids both systems pass to a reward function).

The counts. `PositionCounter` wraps `Qwen2Model.forward` in the worker process and adds up the
positions (batch × length of the input) of every forward, with autograd on (a backward follows:
3× a forward's work) or off (sampling, reference and old-policy passes). The work the step
needs, N = Σ_groups Tp + Σ_completions (L − 1) positions per pass (the prompt once per group, a
completion's tokens but its last), is done 5× (sampling, reference forward, policy forward +
backward), so the padding share is 1 − 5N / (no_grad + 3·grad): positions spent on pads, on
repeated prompts, on finished rows still in a batch, on extra passes. A decoder that does not
call `Qwen2Model.forward` (vLLM, a compiled graph) would go uncounted: a count below 5N is an
error.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from pathlib import Path

from bench_utils import BETA, GENERATIONS, PROMPTS, builtin_model_folder, forward_flops

BUDGET = 256  # max new tokens per completion
PROMPT_TOKENS = (64, 256)  # prompt lengths with <bos>, uniform
POOL = 512  # distinct prompts
STOP_P = 1 / 128  # probability of EOS at each completion position
CONSTANT = 16.0  # value of residual channel 0: dominates the RMS of the residual stream
MICRO_BATCH = 8  # sequences per forward/backward in both systems (gradient accumulation)
# bump when the model surgery or its saved tokenizer changes (2: the character tokenizer as
# saved, not the byte-level one transformers' AutoTokenizer rebuilds for Qwen2 folders)
VERSION = 2


def prompt_rows(tokenizer) -> list[dict]:
    """POOL prompts of lowercase words, PROMPT_TOKENS long (the built-in character tokenizer
    drops spaces), with their token counts: a column both systems pass to the reward."""
    rng = random.Random(0)
    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    rows = []
    for _ in range(POOL):
        target = rng.randint(*PROMPT_TOKENS)
        text = ""
        while count(text) < target:
            text += " " * bool(text) + "".join(
                rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))
            )
        while count(text) > target:
            text = text[:-1].rstrip()
        rows.append({"prompt": text, "prompt_tokens": count(text)})
    return rows


def model_folder(size: str) -> str:
    """`builtin:{size}-random` with the stop rate in its weights; built once, cached beside it."""
    from transformers import AutoModelForCausalLM

    from advantage.engine.models import load_tokenizer
    from advantage.tasks import save_folder

    source = Path(builtin_model_folder(size))
    path = source.parent / f"bench-realistic-{size}-v{VERSION}-p{round(1 / STOP_P)}"
    if (path / "config.json").is_file():
        return str(path)
    tokenizer = load_tokenizer(str(source))
    model = AutoModelForCausalLM.from_pretrained(source)
    with_stop_rate(model, tokenizer, STOP_P)
    save_folder(model, tokenizer, path)
    return str(path)


def with_stop_rate(model, tokenizer, stop_p: float) -> None:
    """Make a Qwen2 model sample EOS with probability ≈ `stop_p` at every position and never
    sample another special token, whatever the context (see the module docstring)."""
    import torch

    with torch.no_grad():
        embed = model.get_input_embeddings().weight  # [V, H]
        head = embed.clone()  # the LM head, untied from here on
        embed[:, 0] = CONSTANT  # every position starts with channel 0 = CONSTANT ...
        for layer in model.model.layers:  # ... and no layer adds to it
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        # after the final RMSNorm channel 0 is ≈ √H · w_0; the head turns it into logit biases
        unit = math.sqrt(embed.shape[1]) * float(model.model.norm.weight[0])
        eos = tokenizer.eos_token_id
        specials = [i for i in tokenizer.all_special_ids if i != eos]
        # the other logits stay ≈ 0 (near uniform): p(EOS) = e^b / (e^b + others)
        others = embed.shape[0] - 1 - len(specials)
        head[:, 0] = 0
        head[eos, 0] = math.log(stop_p / (1 - stop_p) * others) / unit
        head[specials, 0] = -30.0 / unit
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)


# ---------------------------------------------------------------------------------------------
# in the worker: the reward (which records the lengths) and the position counter

CALLS: list[list[tuple[int, list[int]]]] = []  # per reward call: (prompt tokens, [L]) per group


def length_variety(prompts, completions, completion_ids, prompt_tokens, **kwargs) -> list[float]:
    """|L − mean L of the group| / BUDGET, L = completion tokens with EOS (TRL's signature)."""
    lengths = [len(ids) for ids in completion_ids]
    groups: dict[str, tuple[int, list[int]]] = {}
    for p, tp, n in zip(prompts, prompt_tokens, lengths, strict=True):
        groups.setdefault(p, (tp, []))[1].append(n)
    CALLS.append(list(groups.values()))
    mean = {p: statistics.fmean(ls) for p, (_, ls) in groups.items()}
    return [abs(n - mean[p]) / BUDGET for p, n in zip(prompts, lengths, strict=True)]


class PositionCounter:
    """Counts the positions every forward of this process embeds (`nn.Embedding.forward`: the
    model's forward and advantage's own decode step, `engine/rollout/decode_step.py`, both
    embed their input ids; the benchmark's models have no other embedding)."""

    def __init__(self) -> None:
        import torch

        self.grad = self.no_grad = 0
        self._taken = (0, 0, 0)
        original = torch.nn.Embedding.forward

        @functools.wraps(original)
        def counted(module, ids):
            if torch.is_grad_enabled():
                self.grad += ids.numel()
            else:
                self.no_grad += ids.numel()
            return original(module, ids)

        torch.nn.Embedding.forward = counted

    def take_step(self) -> dict:
        """The last step's lengths (its one reward call) and positions since the last call."""
        calls, grad, no_grad = self._taken
        if len(CALLS) != calls + 1:
            raise RuntimeError(f"expected one reward call per step, got {len(CALLS) - calls}")
        self._taken = (len(CALLS), self.grad, self.no_grad)
        step = {"groups": CALLS[-1], "grad": self.grad - grad, "no_grad": self.no_grad - no_grad}
        processed, needed = step["no_grad"] + 3 * step["grad"], 5 * needed_positions(step["groups"])
        if processed < needed:
            raise RuntimeError(f"counted {processed} positions, fewer than the {needed} of the "
                               "sampling, reference and policy passes the step needs: a forward "
                               "bypassed the embedding, or a pass was left out")  # fmt: skip
        return step


def needed_positions(groups) -> int:
    """N: positions one pass needs, the prompt once per group, each completion but its last token."""
    return sum(tp + sum(n - 1 for n in ls) for tp, ls in groups)


def needed_flops(config, groups) -> float:
    """Matrix-product FLOPs of the work a step needs: per group the prompt once, then each
    completion on its cache; sampling (prefill + L − 1 decode steps, logits of each), the
    reference forward, and the policy's forward + backward (3× a forward)."""
    total = 0.0
    for tp, lengths in groups:
        total += forward_flops(config, tp, 0, 1) + 4 * forward_flops(config, tp, 0, 0)
        for n in lengths:
            total += forward_flops(config, n - 1, tp, n - 1)  # decode steps
            total += 4 * forward_flops(config, n - 1, tp, n)  # training passes: L log-probs
    return total


# ---------------------------------------------------------------------------------------------
# the settings of each system


def settings(size: str) -> dict:
    """Model folder, prompt rows, reward, and each system's options for this workload: sampling
    at temperature 1 without top-k/top-p up to BUDGET tokens, stopping at EOS; training in
    micro-batches of MICRO_BATCH sequences (TRL: gradient accumulation, one generation of all
    P·G sequences per optimizer step)."""
    from advantage.engine.models import load_tokenizer

    model = model_folder(size)
    advantage = [f"rollout.max_new_tokens={BUDGET}", "rollout.ignore_eos=false", "rollout.top_k=0",
                 "rollout.top_p=1.0", f"train.micro_batch_size={MICRO_BATCH}",
                 "reward.functions=[realistic:length_variety]"]  # fmt: skip
    trl = dict(max_completion_length=BUDGET, top_k=0, top_p=1.0,
               per_device_train_batch_size=MICRO_BATCH,
               gradient_accumulation_steps=PROMPTS * GENERATIONS // MICRO_BATCH)  # fmt: skip
    rows = prompt_rows(load_tokenizer(model))
    return dict(model=model, rows=rows, reward=length_variety, advantage=advantage, trl=trl)


# ---------------------------------------------------------------------------------------------
# in the parent: the table


def summarise(results: dict, peaks: dict) -> tuple[list[dict], str]:
    from types import SimpleNamespace

    rows = []
    for (system, size, precision), runs in results.items():
        config = SimpleNamespace(**runs[0]["config"])
        steps = [s for r in runs for s in r["steps"]]
        times = [t for r in runs for t in r["step_s"]]
        real = [sum(GENERATIONS * tp + sum(ls) for tp, ls in s["groups"]) for s in steps]
        flops = [needed_flops(config, s["groups"]) for s in steps]
        needed = sum(5 * needed_positions(s["groups"]) for s in steps)
        processed = sum(s["no_grad"] + 3 * s["grad"] for s in steps)
        lengths = [n for s in steps for _, ls in s["groups"] for n in ls]
        peak = peaks["fp32"] if precision == "fp32" else max(peaks.values())
        gflops = statistics.median(f / t / 1e9 for f, t in zip(flops, times, strict=True))
        rows.append({
            "system": system, "size": size, "precision": precision, "steps_timed": len(times),
            "step_s": statistics.median(times),
            "real_tok_s": statistics.median(n / t for n, t in zip(real, times, strict=True)),
            "prompt_tokens_mean": statistics.fmean(tp for s in steps for tp, _ in s["groups"]),
            "completion_tokens": {"mean": statistics.fmean(lengths), "min": min(lengths),
                                  "max": max(lengths), "clipped": sum(n >= BUDGET for n in lengths) / len(lengths)},
            "positions_processed": processed / len(steps), "positions_needed": needed / len(steps),
            "padding_share": 1 - needed / processed, "needed_gflop_per_step": statistics.fmean(flops) / 1e9,
            "needed_gflops": gflops, "peak_fraction": gflops / peak,
            "phases_s": {k: statistics.median(r["phases_s"][k] for r in runs if k in r["phases_s"])
                         for k in runs[0]["phases_s"]},
            "peak_rss_mb": max(r["peak_rss"] for r in runs) / 2**20, "top_ops": runs[0]["top_ops"],
        })  # fmt: skip
    for row in rows:
        trl = next((r for r in rows if r["system"] == "trl" and r["size"] == row["size"]
                    and r["precision"] == row["precision"]), None)  # fmt: skip
        row["speedup_vs_trl"] = row["real_tok_s"] / trl["real_tok_s"] if trl else None
        row["rss_vs_trl"] = row["peak_rss_mb"] / trl["peak_rss_mb"] if trl else None
    return rows, markdown(rows, peaks)


def markdown(rows: list[dict], peaks: dict) -> str:
    fmt = lambda v, f="{:.2f}": "–" if v is None else f.format(v)  # noqa: E731
    lines = [
        f"GRPO step, realistic workload: {PROMPTS} prompts of {PROMPT_TOKENS[0]}–{PROMPT_TOKENS[1]} tokens × "
        f"{GENERATIONS} completions that stop at EOS (p = 1/{round(1 / STOP_P)} per token, budget "
        f"{BUDGET}), β = {BETA}, micro-batches of {MICRO_BATCH} sequences, 1 epoch. Real tokens = "
        "prompt + completion of every sequence, no pads. Padding share = 1 − needed / processed "
        "positions (fwd + 3× fwd/bwd; needed: the prompt once per group, no pads). Needed GFLOP: "
        "matrix products of that needed work.",
        f"Matmul peak measured in this run: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
        f"{peaks['bf16']:.0f} GFLOP/s (bf16 rows: the faster of the two).",
        "",
        "| size | precision | system | s/step | real tok/s | × vs TRL | prompt tok | completion tok mean (min–max, clipped) | positions processed / needed per step | padding share | needed GFLOP/step | GFLOP/s | of peak | peak RSS MB | RSS vs TRL | phases: rollout / reward / ref / update (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["size"] != "tiny", r["precision"], r["system"])):
        c, p = r["completion_tokens"], r["phases_s"]
        phases = " / ".join(
            fmt(p.get(k), "{:.2f}") for k in ("rollout", "reward", "ref_logprobs", "update")
        )
        lines.append(
            f"| {r['size']} | {r['precision']} | {r['system']} | {r['step_s']:.2f} | {r['real_tok_s']:.0f} | "
            f"{fmt(r['speedup_vs_trl'])} | {r['prompt_tokens_mean']:.0f} | {c['mean']:.0f} ({c['min']}–{c['max']}, "
            f"{100 * c['clipped']:.0f}%) | {r['positions_processed'] / 1e3:.0f}k / {r['positions_needed'] / 1e3:.0f}k | "
            f"{100 * r['padding_share']:.0f}% | {r['needed_gflop_per_step']:.0f} | {r['needed_gflops']:.1f} | "
            f"{100 * r['peak_fraction']:.0f}% | {r['peak_rss_mb']:.0f} | {fmt(r['rss_vs_trl'])} | {phases} |"
        )  # fmt: skip
    return "\n".join(lines)
