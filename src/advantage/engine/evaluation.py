"""Held-out evaluation: greedy accuracy and pass@k, judged by the run's reward functions."""

from __future__ import annotations

import torch

from .data import encode_prompt
from .rewards import score_rollout
from .rollout import SamplingParams


def _scores(backend, tokenizer, rows, rewards, prompt_field, params, n, system_prompt):
    prompts = [encode_prompt(tokenizer, r[prompt_field], system_prompt) for r in rows]
    rollout = backend.generate(prompts, n, params)
    scored, texts = score_rollout(rewards, tokenizer, rollout, rows, prompt_field, n)
    return scored.scores.view(len(rows), n), texts


@torch.no_grad()
def evaluate(
    backend,
    tokenizer,
    rows: list[dict],
    rewards,
    *,
    prompt_field: str = "prompt",
    max_new_tokens: int = 64,
    pass_k: int = 0,
    threshold: float = 1.0,
    temperature: float = 1.0,
    system_prompt: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce=None,
) -> dict[str, float]:
    """{"eval/accuracy": greedy accuracy, "eval/pass@k": fraction of prompts with a correct
    sample among k, "eval/reward": mean greedy score}.

    With several ranks each evaluates every world_size-th row and `reduce` (a sum over ranks)
    combines the counts; shards are padded to equal length so every rank runs the same passes.
    """
    shard = rows[rank::world_size]
    per_rank = -(-len(rows) // world_size)
    n_real = len(shard)
    shard = shard + [rows[0]] * (per_rank - n_real)  # padding rows are not counted
    greedy = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    correct = total_score = passed = 0.0
    for start in range(0, len(shard), batch_size):
        chunk = shard[start : start + batch_size]
        real = max(0, min(len(chunk), n_real - start))
        scores, _ = _scores(
            backend, tokenizer, chunk, rewards, prompt_field, greedy, 1, system_prompt
        )
        correct += float((scores[:real, 0] >= threshold).sum())
        total_score += float(scores[:real].sum())
        if pass_k:
            sampled = SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start
            )
            k_scores, _ = _scores(
                backend, tokenizer, chunk, rewards, prompt_field, sampled, pass_k, system_prompt
            )
            passed += float((k_scores[:real] >= threshold).any(-1).sum())
    if reduce is not None:
        correct, total_score, passed = reduce([correct, total_score, passed])
    n = max(len(rows), 1)
    out = {"eval/accuracy": correct / n, "eval/reward": total_score / n}
    if pass_k:
        out[f"eval/pass@{pass_k}"] = passed / n
    return out
