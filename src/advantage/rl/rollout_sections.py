"""The `rollout` and `reward` sections of the RL configuration: what is sampled (one turn or
multi-turn episodes with tools or an environment) and how it is scored. As in sections.py, one
dataclass each, one docstring per field, each checking its own fields when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.scores import REWARD_COMBINATIONS
from ..engine.configlib import (
    ConfigError,
    check_at_least,
    check_choice,
    check_finite,
    check_fraction,
    check_positive,
)
from ..engine.reward_call import ON_TIMEOUT
from .sections import check_temperature


@dataclass
class RolloutConfig:
    backend: str = "transformers"
    """Generation engine: transformers | vllm."""
    num_generations: int = 8
    """G, completions per prompt (a group)."""
    prompts_per_step: int = 8
    """P, prompts per step; B = P·G sequences per rollout batch."""
    max_new_tokens: int = 64
    """Generation budget per completion (also T_max of seq_mean_token_sum_norm)."""
    temperature: float = 1.0
    """Sampling temperature, >= 0.01; log-probs are computed on logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (generation also stops at EOS)."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens, ignoring EOS (for benchmarks: equal work everywhere)."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens without EOS out of the loss (DAPO)."""
    max_sampling_tries: int = 4
    """Cap on rollout rounds per step under dynamic sampling (`algo.dynamic_sampling`)."""
    tools: list[str] = field(default_factory=list)
    """Tools of multi-turn episodes (TRL's `tools=`): `module:function` / `file.py:function`
    (type hints and a docstring give the schema), `python` (the sandboxed interpreter), or
    `builtin` (the built-in task's). Empty, and no environment: single-turn rollouts."""
    environment: str | None = None
    """A class per episode (TRL's `environment_factory`): `reset(**row)` and public methods as
    tools (optional `get_reward()`), or gym-style `reset(row)` + `step(message) -> (reply,
    reward, done)`. Given as `module:Class` / `file.py:Class`."""
    max_turns: int = 4
    """Model turns per episode at most (episodes only). Calls made in the last one do not run
    (as in TRL's tool loop: no turn would read their reply); the episode is then truncated."""
    max_episode_tokens: int | None = None
    """Tokens after the prompt per episode at most, the model's and the environment's
    (null = max_turns × max_new_tokens plus the replies); `max_new_tokens` bounds each turn.
    Never past the model's max_position_embeddings: an episode that reaches them ends there,
    truncated (`episode/truncated`)."""
    tool_call_format: str = "hermes"
    """How tool calls are read from a turn: hermes (`<tool_call>{"name": ..., "arguments":
    {...}}</tool_call>`, Qwen's) or a regex with the groups `arguments` (JSON or the one
    argument as text) and optionally `name`."""
    tool_call_stop: str | None = None
    """Text that ends a model turn which makes a call (e.g. `</calc>`; hermes: none, the turn
    ends with the model's end-of-turn token)."""
    reply_template: str = "{content}"
    """Without a chat template: how a tool result / environment reply is written into the
    episode (fields: role, content, name)."""
    tool_timeout: float | None = 10.0
    """Seconds a tool call may take, then its reply is an error text; and an environment's
    reset or step, then the run stops with an error naming it (null = no limit). Each
    episode's calls run one after the other: a turn of B episodes whose tools all hang takes
    B × this."""
    tool_max_output: int = 4000
    """Characters of a tool's output kept in the reply."""
    vllm: dict = field(default_factory=dict)
    """Extra arguments of the vLLM engine (gpu_memory_utilization, dtype, ...)."""

    def __post_init__(self) -> None:
        check_choice("rollout.backend", self.backend, ("transformers", "vllm"))
        for name in (
            "num_generations",
            "prompts_per_step",
            "max_new_tokens",
            "max_sampling_tries",
            "max_turns",
            "max_episode_tokens",
            "tool_max_output",
        ):
            check_at_least(f"rollout.{name}", getattr(self, name), 1)
        check_positive("rollout.tool_timeout", self.tool_timeout)
        check_temperature("rollout.temperature", self.temperature)
        check_fraction("rollout.top_p", self.top_p, False, True)
        check_at_least("rollout.top_k", self.top_k, 0)
        for i, stop in enumerate(self.stop):
            if not stop:
                raise ConfigError(
                    f"rollout.stop[{i}] is an empty string, which would end every completion at "
                    "its first token; remove it"
                )


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["builtin"])
    """Reward functions: dotted paths `module:function` / `module.function`, `file.py:function`,
    built-in names (exact_match, format_regex, length_penalty, ...), or `builtin` (the task's)."""
    weights: list[float] | None = None
    """One weight per reward source (functions, then the reward model); default all 1."""
    multi_reward: str = "sum_then_normalize"
    """sum_then_normalize | normalize_then_sum (normalise each function within its group first)
    | trl_normalize_then_sum (TRL's: then re-normalise the weighted sum over the whole batch;
    its result is already TRL's advantage: use it with algo.baseline=none algo.scope=none)."""
    clip: float | None = None
    """Clip the combined score to [-clip, clip]."""
    model: str | None = None
    """Reward model folder (AutoModelForSequenceClassification, one label)."""
    model_batch_size: int = 32
    """Sequences per reward-model forward."""
    model_normalize: bool = False
    """Normalise reward-model scores with running statistics ((r - mean)/std of all scores seen)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that hit max_new_tokens without EOS (episodes:
    of truncated episodes, `episode/truncated`)."""
    timeout: float | None = None
    """Seconds allowed for one call of a reward function (null = no limit)."""
    on_timeout: str = "error"
    """A call longer than reward.timeout: error (stop the run with a RewardError) | skip (that
    function scores the batch None, with a warning; the abandoned call may keep running in a
    background thread)."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments passed to every reward function."""

    def __post_init__(self) -> None:
        check_choice("reward.multi_reward", self.multi_reward, tuple(REWARD_COMBINATIONS))
        for i, w in enumerate(self.weights or []):
            check_finite(f"reward.weights[{i}]", w)
        check_positive("reward.clip", self.clip)
        check_at_least("reward.model_batch_size", self.model_batch_size, 1)
        check_finite("reward.missing_eos_penalty", self.missing_eos_penalty)
        check_positive("reward.timeout", self.timeout)
        check_choice("reward.on_timeout", self.on_timeout, ON_TIMEOUT)
        # (reward.weights is checked against the sources when they are built: the Python API
        # can pass reward functions that the config does not name)
