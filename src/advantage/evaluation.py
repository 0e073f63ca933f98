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
def evaluate(backend, tokenizer, rows: list[dict], rewards, *, prompt_field: str = "prompt",
             max_new_tokens: int = 64, pass_k: int = 0, threshold: float = 1.0,
             temperature: float = 1.0, system_prompt: str | None = None,
             batch_size: int = 256, seed: int = 0, rank: int = 0, world_size: int = 1,
             reduce=None) -> dict[str, float]:  # fmt: skip
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


def evaluate_model(model_path: str, dataset: str, *, reward_functions: list[str] | None = None,
                   prompt_field: str = "prompt", max_new_tokens: int = 64, pass_k: int = 0,
                   size: int | None = None, threshold: float = 1.0, temperature: float = 1.0,
                   trust_remote_code: bool = False, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """`advantage eval MODEL DATASET`: greedy accuracy and pass@k of any model on any dataset,
    judged by reward functions (default: the built-in task's verifier for `builtin:` data,
    else `exact_match` against an `answer` column)."""
    from .data import check_rows, load_rows
    from .models import load_causal_lm, load_tokenizer, quiet_transformers, resolve_model_path
    from .rewards import RewardComputer, load_function
    from .rollout import TransformersBackend
    from .tasks import get_task

    quiet_transformers()
    path = resolve_model_path(model_path, "MODEL")
    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, trust_remote_code).eval()
    rows = load_rows(dataset, "DATASET")
    check_rows(rows, prompt_field, "DATASET")
    rows = rows[:size] if size else rows
    task_reward = (
        get_task(dataset.split(":")[1]).reward_fn if dataset.startswith("builtin:") else None
    )
    specs = reward_functions or (["builtin"] if task_reward else ["exact_match"])
    rewards = RewardComputer(
        [load_function(s, task_reward) for s in specs], "sum_then_normalize", None, None
    )
    rewards.check_columns(set(rows[0]) - {prompt_field})
    torch.manual_seed(seed)
    return evaluate(TransformersBackend(model, tokenizer), tokenizer, rows, rewards, prompt_field=prompt_field,
                    max_new_tokens=max_new_tokens, pass_k=pass_k, threshold=threshold,
                    temperature=temperature, seed=seed)  # fmt: skip
