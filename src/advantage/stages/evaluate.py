"""`advantage eval MODEL DATASET`: held-out accuracy and pass@k of any model on any dataset."""

from __future__ import annotations

import torch

from ..engine.configlib import ConfigError, check_at_least, check_finite, check_positive
from ..engine.data import check_rows, encode_prompt
from ..engine.evaluation import evaluate
from ..engine.models import load_causal_lm, load_tokenizer, quiet_transformers
from ..engine.rewards import RewardComputer, load_function
from ..engine.rollout import TransformersBackend
from ..engine.sampling import SingleTurn
from ..tasks import dataset_rows, model_path, task_of


def evaluate_model(
    model: str,
    dataset: str,
    *,
    reward_functions: list[str] | None = None,
    prompt_field: str = "prompt",
    max_new_tokens: int = 64,
    pass_k: int = 0,
    size: int | None = None,
    threshold: float = 1.0,
    temperature: float = 1.0,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """`advantage eval MODEL DATASET`: greedy accuracy and pass@k of any model on any dataset,
    judged by reward functions (default: the built-in task's verifier for `builtin:` data,
    else `exact_match` against an `answer` column)."""
    check_at_least("--pass-k", pass_k, 0)
    check_at_least("--size", size, 1)
    check_at_least("--max-new-tokens", max_new_tokens, 1)
    check_positive("--temperature", temperature)
    check_finite("--threshold", threshold)
    quiet_transformers()
    # the data and the judge first: a dataset the judge cannot score fails before any model loads
    rows = dataset_rows(dataset, "DATASET")
    check_rows(rows, prompt_field, "DATASET")
    rows = rows[:size] if size else rows
    task = task_of(dataset, "DATASET")
    task_reward = task.reward_fn if task is not None else None
    specs = reward_functions or (["builtin"] if task_reward else ["exact_match"])
    rewards = RewardComputer([load_function(s, task_reward, "--reward") for s in specs])
    try:
        rewards.check_columns(set(rows[0]) - {prompt_field}, "DATASET")
    except ConfigError as e:
        if reward_functions:
            raise
        raise ConfigError(f"{e}; the default judge is exact_match: give --reward FN") from None
    path = model_path(model, "MODEL")
    tokenizer = load_tokenizer(path, trust_remote_code)
    policy = load_causal_lm(path, trust_remote_code).eval()
    torch.manual_seed(seed)
    sampler = SingleTurn(
        TransformersBackend(policy, tokenizer), tokenizer, lambda p: encode_prompt(tokenizer, p)
    )
    return evaluate(
        sampler,
        rows,
        rewards,
        prompt_field=prompt_field,
        max_new_tokens=max_new_tokens,
        pass_k=pass_k,
        threshold=threshold,
        temperature=temperature,
        seed=seed,
    )
