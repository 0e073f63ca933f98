"""Calling one reward function on a batch: sync or `async def`, with a timeout, and checking what
it returns. Errors name the function and the sample.

Threads. An `async def` function runs on its own event loop in a helper thread, so it works when
the caller already runs a loop (a notebook), and a coroutine that blocks its loop (`time.sleep`)
is still caught by the timeout, which this thread waits for. With a timeout, sync functions run
in a helper thread too. Helper threads are daemons: a call that never returns is abandoned (a
thread cannot be killed) and does not keep the process alive at exit.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("advantage")

ON_TIMEOUT = ("error", "skip")


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the sample."""


@dataclass
class RewardSource:
    name: str
    """In messages and metrics (`reward/<name>`); unique within a `RewardComputer`."""
    fn: Callable
    weight: float = 1.0
    origin: str = ""
    """Where it came from, for messages (the config's `fa/r.py:score`; empty: the function's
    module and name)."""


def run_awaitable(awaitable) -> object:
    """Its result, awaited on an event loop of its own (`asyncio.run` takes only coroutines)."""

    async def awaited():
        return await awaitable

    return asyncio.run(awaited())


def in_thread(work: Callable[[], object], timeout: float | None, name: str) -> object:
    """`work()` in a daemon thread: its result, its exception re-raised, or TimeoutError."""
    done = threading.Event()
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = work()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=run, name=f"reward {name}", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["value"]


def _call(source: RewardSource, timeout: float | None, kwargs: dict) -> object:
    """Call one reward function (sync or async), with an optional timeout in seconds."""
    fn = source.fn
    if inspect.iscoroutinefunction(fn):
        return in_thread(lambda: asyncio.run(fn(**kwargs)), timeout, source.name)
    out = fn(**kwargs) if timeout is None else in_thread(lambda: fn(**kwargs), timeout, source.name)
    if inspect.iscoroutine(out):  # e.g. an object with `async def __call__`
        return in_thread(lambda: asyncio.run(out), timeout, source.name)
    return out


def _locate_failure(
    source: RewardSource, kwargs: dict, n: int, timeout: float | None
) -> int | None:
    """Index of the first sample on which `source` raises alone (None if none does)."""
    for i in range(n):
        one = {
            k: (v[i : i + 1] if isinstance(v, list) and len(v) == n else v)
            for k, v in kwargs.items()
        }
        try:
            _call(source, timeout, one)
        except TimeoutError:
            return None
        except Exception:
            return i
    return None


def call_reward_function(
    source: RewardSource,
    prompts: list,
    completions: list,
    completion_ids: list,
    columns: dict,
    timeout: float | None = None,
    extra: dict | None = None,
    on_timeout: str = "error",
) -> list[float | None]:
    """Run `source` on a batch and validate what it returns (length, numbers, finiteness).

    A call longer than `timeout` seconds raises a RewardError (`on_timeout="error"`) or scores
    the batch None for this function (`"skip"`, with a warning)."""
    n = len(completions)
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids)
    kwargs.update(columns)
    kwargs.update(extra or {})
    try:
        values = _call(source, timeout, kwargs)
    except TimeoutError:
        late = (
            f"reward function '{source.name}' took longer than reward.timeout={timeout}s on a "
            f"batch of {n} completions"
        )
        if on_timeout == "skip":
            log.warning("%s; its scores of this batch are None (reward.on_timeout=skip)", late)
            return [None] * n
        raise RewardError(late) from None
    except Exception as e:
        index = _locate_failure(source, kwargs, n, timeout)
        where = (
            f" on sample {index} (prompt {short_repr(prompts[index])})" if index is not None else ""
        )
        raise RewardError(
            f"reward function '{source.name}' raised {type(e).__name__}{where}: {e}"
        ) from e
    returned, values = values, _as_list(values)
    if values is None:
        got = "None" if returned is None else f"{short_repr(returned)} ({type(returned).__name__})"
        raise RewardError(
            f"reward function '{source.name}' returned {got}; expected a list of {n} floats, one "
            "per completion, with None in the list for a completion it does not score"
        )
    if len(values) != n:
        raise RewardError(
            f"reward function '{source.name}' returned {len(values)} values for {n} completions"
        )
    out: list[float | None] = []
    for i, v in enumerate(values):
        value = as_float(v)
        if value is None and v is not None:
            raise RewardError(
                f"reward function '{source.name}' returned {v!r} ({type(v).__name__}) for sample "
                f"{i}; expected a float or None"
            )
        if value is not None and not fits_float32(value):
            raise RewardError(
                f"reward function '{source.name}' returned "
                f"{short_repr(v) if isinstance(v, int) else value} for sample {i} "
                f"(prompt {short_repr(prompts[i])}); rewards must be finite numbers within float32's "
                "range, |r| <= 3.4e38 (use None to skip a sample)"
            )
        out.append(value)
    return out


# What a function may return is what TRL's GRPOTrainer accepts: it builds
# `torch.tensor([nan if r is None else r for r in output], dtype=float32)`
# (trl/trainer/grpo_trainer.py, `_calculate_rewards`), so any sequence (a list, a tuple, a
# 1-d NumPy array or tensor, a generator) of Python or NumPy numbers, bools (1.0 / 0.0) or 0-d
# tensors. (TRL also takes NaN, as its own "None"; here NaN is an error: return None.)


def _as_list(values) -> list | None:
    """The values of a returned sequence, or None when it is not one (a string, a scalar)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist() if values.ndim == 1 else None
    if isinstance(values, (list, tuple)):
        return list(values)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        return None
    return list(values)  # a generator, a map, ...


def fits_float32(value: float) -> bool:
    """A finite number that stays finite as a float32 (scores are float32 tensors)."""
    return abs(value) <= FLOAT32_MAX


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def as_float(v) -> float | None:
    """One value as a float (bools as 1.0 / 0.0; an int too large for a float as inf); None for
    None and for what is not a number."""
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, numbers.Real):
        try:
            return float(v)
        except OverflowError:
            return math.inf
    return None


def short_repr(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."
