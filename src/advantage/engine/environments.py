"""The environments of multi-turn episodes, in TRL's shape and gym's (SPEC §7).

TRL's `environment_factory`: one instance per episode, `reset(**row)` (its text, if any, is
appended to the prompt), its public methods are tools, an optional `get_reward()` (sync or
async) scores the episode. Gym-style: `reset(row)` and `step(text) -> (reply, reward, done)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .configlib import short
from .reward_call import in_thread, run_awaitable

REWARD_ARGUMENT = "environments"
"""The reward functions' keyword argument with each sample's environment instance (TRL's)."""


class EpisodeError(RuntimeError):
    """An environment failed; the message names the environment, the episode and its row."""


def is_gym(factory) -> bool:
    """Whether an environment factory is gym-style (`step`), not TRL-style (methods as tools)."""
    return factory is not None and hasattr(factory, "step")


def failure(env, index: int, row: dict, method: str, error: Exception) -> str:
    """The message of an environment method that raised: the class, the method, the episode
    and its row."""
    return (
        f"environment {type(env).__name__}.{method} raised {type(error).__name__} in "
        f"episode {index} (row {short(row)}): {error}"
    )


def env_call(env, method: str, index: int, row: dict, timeout: float | None, work: Callable):
    """`work()` (a call of `env.method`) bounded by `timeout` seconds (`rollout.tool_timeout`;
    None: unbounded): its result, or an EpisodeError naming the environment, the method, the
    episode and its row when it raised or did not return in time (its thread is abandoned)."""
    try:
        return work() if timeout is None else in_thread(work, timeout, f"{type(env).__name__}")
    except TimeoutError:
        raise EpisodeError(
            f"environment {type(env).__name__}.{method} did not return within "
            f"rollout.tool_timeout={timeout:g}s in episode {index} (row {short(row)})"
        ) from None
    except Exception as e:
        raise EpisodeError(failure(env, index, row, method, e)) from e


def append_to_prompt(prompt, text: str):
    """A prompt with `text` appended (to the last user message of a conversation)."""
    if isinstance(prompt, str):
        return prompt + text
    messages = [dict(m) for m in prompt]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    messages[last]["content"] = f"{messages[last]['content']}{text}"
    return messages


def callable_tools(tools, environment) -> list[Callable]:
    """What a model may call: `tools`, then a TRL-style environment's public methods (unbound
    when `environment` is its class, for the prompt's schemas; bound when it is an episode's
    instance). A gym-style environment (`step`) adds none."""
    functions = list(tools or [])
    if environment is not None and not is_gym(environment):
        if isinstance(environment, type):
            functions += class_tools(environment)
        else:
            functions += environment_tools(environment)
    return functions


def class_tools(cls: type) -> list[Callable]:
    """The tools of a TRL-style environment class: its public methods other than reset and
    get_reward (unbound; `environment_tools` binds them to an episode's instance)."""
    skip = {"reset", "get_reward", "step"}
    return [
        member
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in skip
    ]


def environment_tools(env) -> list[Callable]:
    """The tools of one environment instance: its public methods, bound."""
    return [getattr(env, f.__name__) for f in class_tools(type(env))]


def environment_reward(prompts, completions, environments, **kwargs) -> list[float | None]:
    """A reward function that asks each episode's environment (`get_reward()`, sync or async;
    TRL's environment reward, weight 1)."""
    out = []
    for env in environments:
        value = env.get_reward()
        if inspect.isawaitable(value):
            # on a loop of its own in a helper thread (safe inside a running loop)
            value = in_thread(lambda v=value: run_awaitable(v), None, "environment")
        out.append(value)
    return out
