"""Test helpers: small configs on the locally built tiny models (nothing downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def length_reward(prompts, completions, **kwargs):
    """A reward with variance even for an untrained model: longer completions score higher."""
    return [len(c) / 8.0 for c in completions]


def small_config(run_dir, *overrides: str, model: str = "builtin:tiny-random") -> list[str]:
    """Overrides for a fast run on the built-in task: 2 prompts × 4 completions, 6 new tokens,
    no eval."""
    return [
        f"model.name_or_path={model}",
        "data.train=builtin:reverse",
        f"log.run_dir={run_dir}",
        "log.progress=false",
        "log.tensorboard=false",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=4",
        "rollout.max_new_tokens=6",
        "train.steps=3",
        "train.lr=1e-3",
        "train.critic_lr=1e-3",
        "eval.size=0",
        "checkpoint.save_final=false",
        "data.eval=null",
        *overrides,
    ]
