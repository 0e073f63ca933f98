"""The training configuration: nested dataclasses, one docstring per field, validated once.

`load_config(path, overrides)` reads a YAML file and `key=value` overrides
(`algorithm=rloo rollout.num_generations=4 algo.clip_high=0.28`) and returns a validated `Config`.
Each section (sections.py) checks its own fields when it is built; `Config` checks what spans
sections and resolves the preset and the `algo.*` overrides to a core `Algorithm` once
(`Config.algorithm_spec()`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.algorithm import Algorithm
from ..core.presets import PRESETS, resolve_axes
from ..engine import config_files
from ..engine.configlib import ConfigError
from .rollout_sections import RewardConfig, RolloutConfig
from .sections import (
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
)


@dataclass
class AlgoConfig:
    """Overrides of the preset's axes; null keeps the preset's value (to turn off what a preset
    sets: `value_clip: .inf`, unclipped; `overlong_fraction: 0`). The meaning of each field,
    and every preset's value, are on the algorithm card (`advantage card PRESET`) and in
    `advantage.core.algorithm.Algorithm`."""

    baseline: str | None = None
    """none | moving_average | ema | group_mean | leave_one_out | critic."""
    scope: str | None = None
    """Normalisation scope: none | group | batch."""
    kl_placement: str | None = None
    """Where β·KL goes: reward | loss | none."""
    kl_estimator: str | None = None
    """k1 | k2 | k3."""
    kl_coef: float | None = None
    """β, the initial KL coefficient (0: no reference model is loaded)."""
    kl_controller: str | None = None
    """fixed | adaptive."""
    kl_target: float | None = None
    """Target KL per sequence of the adaptive controller."""
    kl_horizon: float | None = None
    """Horizon (samples) of the adaptive controller."""
    gamma: float | None = None
    """Discount γ of return-to-go and GAE."""
    lam: float | None = None
    """GAE λ."""
    group_std_eps: float | None = None
    """ε of the group scope."""
    group_std_unbiased: bool | None = None
    """Bessel's correction in the group std."""
    whiten_eps: float | None = None
    """ε of the batch scope."""
    whiten_unbiased: bool | None = None
    """Bessel's correction in the batch variance."""
    aggregation: str | None = None
    """token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm."""
    clip_low: float | None = None
    """ε_low of the ratio clip."""
    clip_high: float | None = None
    """ε_high of the ratio clip (> ε_low: clip-higher)."""
    dual_clip: float | None = None
    """Dual-clip c > 1."""
    value_clip: float | None = None
    """ε_v of the value loss (.inf: unclipped)."""
    value_coef: float | None = None
    """Weight of the critic loss."""
    entropy_coef: float | None = None
    """Weight of the entropy bonus."""
    ema_alpha: float | None = None
    """α of the ema baseline."""
    objective: str | None = None
    """ppo_clip | cispo | pg."""
    ratio_level: str | None = None
    """token | sequence (GSPO) | sequence_token (GSPO-token)."""
    correction: str | None = None
    """Engine/trainer off-policy correction: none | tis | mis."""
    correction_level: str | None = None
    """token | sequence | sequence_mean."""
    correction_low: float | None = None
    """Lower ratio bound of the correction."""
    correction_high: float | None = None
    """Upper ratio bound (cap) of the correction."""
    dynamic_sampling: bool | None = None
    """Drop groups of equal scores and refill (DAPO)."""
    overlong_fraction: float | None = None
    """DAPO's overlong shaping over this fraction of rollout.max_new_tokens (episodes: of
    rollout.max_episode_tokens, against each episode's tokens after the prompt); 0: off."""


@dataclass
class Config:
    algorithm: str = "grpo"
    """A preset of `core.presets.PRESETS` (`advantage presets` prints them): ppo | grpo | dr_grpo |
    rloo | reinforce | reinforce_pp | reinforce_pp_baseline | gspo | cispo | dapo."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Axis overrides of the preset (see the algorithm card)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.algorithm not in PRESETS:
            raise ConfigError(
                f"algorithm: unknown preset {self.algorithm!r}; valid: {', '.join(PRESETS)}"
            )
        try:
            self._algorithm = resolve_axes(self.algorithm, dataclasses.asdict(self.algo))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._check_batch()
        self._check_algorithm(self._algorithm)

    def algorithm_spec(self) -> Algorithm:
        """The preset with the `algo.*` overrides, resolved once when the config was built."""
        return self._algorithm

    def _check_batch(self) -> None:
        """The rollout batch splits into minibatches of whole groups."""
        r, t = self.rollout, self.train
        batch = r.prompts_per_step * r.num_generations
        if batch % t.minibatches:
            raise ConfigError(
                f"train.minibatches={t.minibatches} must divide the rollout batch "
                f"rollout.prompts_per_step × rollout.num_generations = {batch}"
            )
        if (batch // t.minibatches) % r.num_generations:
            raise ConfigError(
                f"each minibatch ({batch // t.minibatches} sequences) must hold whole groups of "
                f"rollout.num_generations={r.num_generations}; change train.minibatches"
            )

    def _check_algorithm(self, algo: Algorithm) -> None:
        """What the resolved algorithm asks of the other sections."""
        G = self.rollout.num_generations
        if algo.baseline == "leave_one_out" and G < 2:
            raise ConfigError(
                f"leave_one_out baseline needs rollout.num_generations >= 2 (got {G})"
            )
        if algo.scope == "group" and G < 2:
            raise ConfigError(f"the group scope needs rollout.num_generations >= 2 (got {G})")
        if algo.baseline == "group_mean" and G < 2:
            raise ConfigError(
                f"group_mean baseline needs rollout.num_generations >= 2 (got {G}: each sample "
                "is its own group's mean, every advantage 0, nothing trains)"
            )
        if algo.scope == "group" and algo.baseline not in GROUP_BASELINES:
            raise ConfigError(
                f"the group scope divides by the std of each group's scores, so it needs a "
                f"baseline centred on the group ({' or '.join(GROUP_BASELINES)}), not "
                f"algo.baseline={algo.baseline}: a group of equal scores would get (s - b)/ε "
                "(~1e4 with ε = 1e-4); use algo.scope=batch_std or none with this baseline"
            )


GROUP_BASELINES = ("group_mean", "leave_one_out")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Config from an optional YAML file, then `key=value` overrides (applied in order)."""
    return config_files.load_config(Config, path, overrides, base)


def config_from(
    obj: Config | dict | str | Path | None, overrides: list[str] | None = None
) -> Config:
    """Accept a Config, a dict, or a YAML path (the Python API's `train(config)`)."""
    if isinstance(obj, Config):
        if overrides:
            return load_config(None, overrides, base=dataclasses.asdict(obj))
        return obj
    if obj is None or isinstance(obj, dict):
        return load_config(None, overrides, base=obj)
    return load_config(obj, overrides)


__all__ = [
    "AlgoConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainConfig",
    "config_from",
    "load_config",
]
