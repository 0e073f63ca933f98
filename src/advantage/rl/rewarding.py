"""The run's judges: the reward computer of training (functions, the environment's reward, a
reward model, weights) and the one of held-out evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..engine.configlib import ConfigError
from ..engine.environments import REWARD_ARGUMENT, environment_reward
from ..engine.reward_model import RewardModel
from ..engine.rewards import RewardComputer, RewardSource, load_function
from ..tasks import model_path, task_of
from .config import Config

log = logging.getLogger("advantage")


def task_reward(cfg: Config) -> Callable | None:
    """The built-in task's verifier when `data.train` is a built-in task (for `builtin`)."""
    task = task_of(cfg.data.train)
    return None if task is None else task.reward_fn


def make_reward_computer(
    cfg: Config, reward_funcs: list[Callable] | None, environment_factory=None
) -> RewardComputer:
    r = cfg.reward
    if reward_funcs is not None:  # the Python API's, [] included: none but the model's
        if r.functions != ["builtin"]:  # the default: nothing to say
            log.warning(
                "reward_funcs given to the Python API replace reward.functions=%s of the "
                "config; list every function in reward_funcs to use them together",
                r.functions,
            )
        sources = [
            RewardSource(getattr(f, "__name__", f"reward_{i}"), f)
            for i, f in enumerate(reward_funcs)
        ]
    else:
        builtin = task_reward(cfg)
        sources = [load_function(spec, builtin) for spec in r.functions]
    if environment_factory is not None and hasattr(environment_factory, "get_reward"):
        sources.append(RewardSource("environment", environment_reward))  # TRL: weight 1
    if r.model:
        path = model_path(r.model, "reward.model")
        rm = RewardModel(path, r.model_batch_size, cfg.model.trust_remote_code, r.model_normalize)
        sources.append(RewardSource(rm.__name__, rm))
    if not sources:
        raise ConfigError(
            f"no reward: {'reward_funcs=[]' if reward_funcs is not None else 'reward.functions=[]'}"
            " and neither reward.model nor an environment's get_reward; give a reward function"
        )
    if r.weights is not None:
        if len(r.weights) != len(sources):
            raise ConfigError(
                f"reward.weights has {len(r.weights)} entries for {len(sources)} reward sources "
                f"({', '.join(s.name for s in sources)})"
            )
        for s, w in zip(sources, r.weights, strict=True):
            s.weight = w
    return RewardComputer(
        sources,
        r.multi_reward,
        r.clip,
        r.timeout,
        r.kwargs,
        r.on_timeout,
        sampler_arguments=(REWARD_ARGUMENT,) if environment_factory is not None else (),
    )


def make_eval_rewards(
    cfg: Config, rewards: RewardComputer, eval_funcs: list[Callable] | None = None
) -> RewardComputer:
    """The judge of held-out evaluation: `eval_funcs` (callables, from the Python API), else
    `eval.functions`, else the training rewards."""
    if eval_funcs:
        sources = [
            RewardSource(getattr(f, "__name__", f"eval_{i}"), f) for i, f in enumerate(eval_funcs)
        ]
    elif cfg.eval.functions:
        judge = task_reward(cfg)
        sources = [load_function(spec, judge, "eval.functions") for spec in cfg.eval.functions]
    else:
        return rewards
    return RewardComputer(
        sources,
        timeout=cfg.reward.timeout,
        on_timeout=cfg.reward.on_timeout,
        sampler_arguments=rewards.sampler_arguments,
    )
