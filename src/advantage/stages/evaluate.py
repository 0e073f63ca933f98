"""`advantage eval MODEL DATASET`: held-out accuracy and pass@k of any model on any dataset."""

from __future__ import annotations

import torch

from ..engine.configlib import ConfigError, check_at_least, check_finite, check_seed
from ..engine.data import check_prompts_fit, check_reward_columns, check_rows, encode_prompt
from ..engine.evaluation import evaluate
from ..engine.models import load_causal_lm, load_tokenizer, quiet_transformers
from ..engine.rewards import RewardComputer, load_function
from ..engine.rollout import TransformersBackend
from ..engine.sampling import SingleTurn
from ..rl.sections import check_temperature
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
    else `exact_match` against an `answer` column).

    Completions get `max_new_tokens` (`--max-new-tokens`, default 64) whatever a training run
    used: a run's own evaluation gives them `eval.max_new_tokens`, by default its
    `rollout.max_new_tokens`, so pass the same number to compare with it. Prompts are not cut
    (a run's are, to `data.max_prompt_tokens`): a prompt that does not fit in the model's
    positions with `max_new_tokens` is refused before evaluating, as `train` refuses it."""
    check_at_least("--pass-k", pass_k, 0)
    check_at_least("--size", size, 1)
    check_at_least("--max-new-tokens", max_new_tokens, 1)
    check_temperature("--temperature", temperature)
    check_finite("--threshold", threshold)
    check_seed("seed", seed)
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
        check_reward_columns(rewards, rows, prompt_field, "DATASET", dataset)
    except ConfigError as e:
        if reward_functions:
            raise
        raise ConfigError(f"{e}; the default judge is exact_match: give --reward FN") from None
    path = model_path(model, "MODEL")
    tokenizer = load_tokenizer(path, trust_remote_code)
    policy = load_causal_lm(path, trust_remote_code).eval()
    context = getattr(policy.config, "max_position_embeddings", None)
    if context is not None:  # as `train` checks its held-out prompts (rl/rows.py check_context)
        check_prompts_fit(
            tokenizer, rows, prompt_field, None, context=context, new_tokens=max_new_tokens,
            new_field="--max-new-tokens", cut_field=None, field="DATASET",
        )  # fmt: skip
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
