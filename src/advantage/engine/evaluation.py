"""Held-out evaluation: greedy accuracy and pass@k, judged by the run's reward functions."""

from __future__ import annotations

import torch

from .rewards import score_samples
from .rollout import SamplingParams


def _scores(sampler, rows, rewards, prompt_field, params, n) -> tuple[torch.Tensor, ...]:
    """`[rows, n]` scores and scored-masks (a sample no source scored is out of every figure,
    as in training), and the completions."""
    sampled = sampler.sample(rows, [r[prompt_field] for r in rows], n, params)
    scored = score_samples(rewards, rows, prompt_field, n, sampled)
    shape = (len(rows), n)
    return scored.scores.view(shape), scored.score_mask.view(shape), sampled.completions


def _calls_tools(completion) -> bool:
    return isinstance(completion, list) and any(m.get("role") == "tool" for m in completion)


@torch.no_grad()
def evaluate(
    sampler,
    rows: list[dict],
    rewards,
    *,
    prompt_field: str = "prompt",
    max_new_tokens: int = 64,
    pass_k: int = 0,
    threshold: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
) -> dict[str, float]:
    """{"eval/accuracy": greedy accuracy, "eval/pass@k": fraction of prompts with a correct
    sample among k, "eval/reward": mean greedy score; for episodes "eval/tool_call_rate": the
    share of greedy episodes with a tool call}.

    With several ranks each evaluates every world_size-th row and `reduce` (a sum over ranks)
    combines the counts; shards are padded to equal length so every rank runs the same passes.
    """
    shard = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    n_real = len(shard)
    shard = shard + [rows[0]] * (per_rank - n_real)  # padding rows are not counted
    greedy = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    correct = total_score = passed = calls = scored = k_scored = 0.0
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        real = max(0, min(len(chunk), n_real - start))
        scores, mask, completions = _scores(sampler, chunk, rewards, prompt_field, greedy, 1)
        scores, mask = scores[:real, 0], mask[:real, 0]
        correct += float(((scores >= threshold) & mask).sum())
        calls += sum(_calls_tools(c) for c in completions[:real])
        total_score += float(scores[mask].sum())
        scored += float(mask.sum())
        if pass_k:
            sampled = SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start
            )
            k_scores, k_mask, _ = _scores(sampler, chunk, rewards, prompt_field, sampled, pass_k)
            k_scores, k_mask = k_scores[:real], k_mask[:real]
            passed += float(((k_scores >= threshold) & k_mask).any(-1).sum())
            k_scored += float(k_mask.any(-1).sum())
    if reduce is not None:
        sums = reduce([correct, total_score, passed, calls, scored, k_scored])
        correct, total_score, passed, calls, scored, k_scored = sums
    n = max(len(rows), 1)
    out = {"eval/accuracy": correct / max(scored, 1), "eval/reward": total_score / max(scored, 1)}
    if pass_k:
        out[f"eval/pass@{pass_k}"] = passed / max(k_scored, 1)
    if scored < len(rows):  # over the scored samples only; how many were not
        out["eval/unscored_frac"] = 1 - scored / n
    if getattr(sampler, "episodic", False):
        out["eval/tool_call_rate"] = calls / n
    return out
