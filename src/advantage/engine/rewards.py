"""Scores (SPEC §1, seed 004): TRL-compatible reward functions, a reward model, their weighted
combination, `None` for "not applicable", and errors that name the function and the sample.

A reward function is `f(prompts, completions, completion_ids, **columns) -> list[float | None]`
(sync or `async def`), exactly as for TRL's `GRPOTrainer`; `columns` are the dataset's other
fields, one value per completion. Calling one function (threads, timeouts, checking what it
returns) is `reward_call.py`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..core.scores import combine_rewards
from .configlib import ConfigError, import_object
from .reward_call import (
    ON_TIMEOUT,
    RewardError,
    RewardSource,
    call_reward_function,
    fits_float32,
    short_repr,
)

log = logging.getLogger("advantage")

RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids")
"""The arguments every reward call passes itself; a dataset column or a `reward.kwargs` key of
the same name would replace them (TRL leaves such columns out; we refuse them)."""


def load_function(
    spec: str, task_reward: Callable | None = None, field: str = "reward.functions"
) -> RewardSource:
    """A reward function from `builtin` (the task's), a helper name, `module:fn`, `module.fn`
    or `path/to/file.py:fn`; `field` names the setting in errors."""
    from . import reward_helpers

    if spec == "builtin":
        if task_reward is None:
            raise ConfigError(f"{field}: 'builtin' needs a built-in task in data.train")
        return RewardSource(task_reward.__name__, task_reward, origin=spec)
    if spec in reward_helpers.HELPERS:
        return RewardSource(spec, reward_helpers.HELPERS[spec], origin=spec)
    if ":" not in spec and "." not in spec:
        raise ConfigError(
            f"{field}: {spec!r} is neither a helper ({', '.join(reward_helpers.HELPERS)}) "
            "nor a dotted path like my_module:my_reward"
        )
    fn = import_object(spec, field)
    return RewardSource(spec.replace(":", ".").rsplit(".", 1)[1], fn, origin=spec)


def required_arguments(fn: Callable) -> list[str]:
    """Names a function cannot be called without (no default, not *args / **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def refuse_unaccepted(source: RewardSource, names, what: str) -> None:
    """A ConfigError when `source.fn` cannot take every one of `names` as a keyword argument
    (it has no `**kwargs` and does not name them all); `what` says what the names are. Every
    call passes them, so it would fail only at the first scoring, after the models load."""
    try:
        params = list(inspect.signature(source.fn).parameters.values())
    except (TypeError, ValueError):  # cannot be inspected (some builtins): left to the call
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in params if p.kind in kinds}
    unaccepted = [name for name in names if name not in named]
    if unaccepted:
        shown = [str(p.replace(annotation=inspect.Parameter.empty)) for p in params]
        fix = (
            f"def {getattr(source.fn, '__name__', source.name)}({', '.join([*shown, '**kwargs'])})"
        )
        raise ConfigError(
            f"reward function '{source.name}' does not take {what} {', '.join(unaccepted)} that "
            f"every reward call passes; add **kwargs to its parameters, as TRL's reward "
            f"functions have: {fix}"
        )


def distinct_names(sources: list[RewardSource]) -> list[RewardSource]:
    """The sources, a repeated name suffixed `_2`, `_3`, ... (`fa/r.py:score` and
    `fb/r.py:score` would share one metric `reward/score`), with a warning naming them."""
    taken = {s.name for s in sources}
    out: list[RewardSource] = []
    groups: dict[str, list[RewardSource]] = {}  # a name as given → the sources given it
    for s in sources:
        group = groups.setdefault(s.name, [])
        if group:
            k = 2
            while f"{s.name}_{k}" in taken:
                k += 1
            taken.add(f"{s.name}_{k}")
            s = replace(s, name=f"{s.name}_{k}")
        group.append(s)
        out.append(s)
    for group in groups.values():
        if len(group) > 1:
            log.warning(
                "reward sources %s had one name; their metrics are %s, and messages name them so",
                _and([f"'{s.name}' ({s.origin or _qualified(s.fn)})" for s in group]),
                _and([f"reward/{s.name}" for s in group]),
            )
    return out


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


@dataclass
class Scores:
    """The scores of one rollout batch (B completions, prompt-major) from F reward sources."""

    scores: torch.Tensor
    """`[B]` combined score s_i (0 where no source scored the sample)."""
    score_mask: torch.Tensor
    """`[B]` bool: at least one source scored the sample."""
    per_source: torch.Tensor
    """`[F, B]` raw reward of each source (0 where that source returned None)."""
    per_source_mask: torch.Tensor
    """`[F, B]` bool: the source scored the sample (it did not return None)."""
    names: list[str]
    """The F sources' names."""

    def select(self, rows: torch.Tensor) -> Scores:
        """The samples `rows` (indices `[n]`)."""
        return Scores(
            self.scores[rows],
            self.score_mask[rows],
            self.per_source[:, rows],
            self.per_source_mask[:, rows],
            self.names,
        )

    @staticmethod
    def concat(parts: list[Scores]) -> Scores:
        return Scores(
            torch.cat([p.scores for p in parts]),
            torch.cat([p.score_mask for p in parts]),
            torch.cat([p.per_source for p in parts], dim=1),
            torch.cat([p.per_source_mask for p in parts], dim=1),
            parts[0].names,
        )


class RewardComputer:
    """All reward sources of a run, called in order, combined into one score per sample."""

    def __init__(
        self,
        sources: list[RewardSource],
        mode: str = "sum_then_normalize",
        clip: float | None = None,
        timeout: float | None = None,
        extra: dict | None = None,
        on_timeout: str = "error",
        sampler_arguments: tuple[str, ...] = (),
    ) -> None:
        """`sampler_arguments`: names the sampler adds to every call (`environments` for
        episodes with environments). A weight beyond float32's range, or a function that
        cannot take the call's keyword arguments, is a ConfigError here, before any model
        loads; sources of one name get distinct ones (`distinct_names`)."""
        if on_timeout not in ON_TIMEOUT:
            raise ValueError(f"on_timeout: {on_timeout!r} is not one of {', '.join(ON_TIMEOUT)}")
        self.sources = distinct_names(sources)
        self.mode = mode
        self.clip = clip
        self.timeout = timeout
        self.extra = extra or {}
        self.on_timeout = on_timeout
        self.sampler_arguments = tuple(sampler_arguments)
        self.arguments = (*RESERVED_ARGUMENTS, *sampler_arguments)
        for i, s in enumerate(self.sources):
            if not fits_float32(s.weight):  # 1e39 passes check_finite, but is inf as a float32
                raise ConfigError(
                    f"reward.weights[{i}]: {s.weight:g} (the weight of '{s.name}') is beyond "
                    "float32's range, |w| <= 3.4e38 (rewards are combined in float32)"
                )
            refuse_unaccepted(s, [*self.arguments, *self.extra], "the keyword argument(s)")

    def check_columns(self, columns: set[str], field: str = "data.train") -> None:
        """Fail before training when a column or a `reward.kwargs` key would replace an argument
        of the reward call, or when a function asks for a column the dataset lacks."""
        reserved = ", ".join(self.arguments)
        clash = sorted(set(columns) & set(self.arguments))
        if clash:
            raise ConfigError(
                f"{field}: column(s) {clash} have the names of arguments every reward function "
                f"receives ({reserved}) and would replace the model's outputs; rename the column(s)"
            )
        clash = sorted(set(self.extra) & (set(self.arguments) | set(columns)))
        if clash:
            raise ConfigError(
                f"reward.kwargs: key(s) {clash} collide with the reward call's own arguments "
                f"({reserved}) or the dataset's columns; rename them"
            )
        given = set(columns) | set(self.extra) | set(self.arguments)
        for source in self.sources:
            missing = [name for name in required_arguments(source.fn) if name not in given]
            if missing:
                raise ConfigError(
                    f"reward function '{source.name}' needs the dataset column(s) {missing}, "
                    f"which the dataset does not have (columns: {', '.join(sorted(columns)) or 'none'})"
                )
            refuse_unaccepted(source, sorted(columns), "the dataset column(s)")

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: list,
        columns: dict,
        group_size: int,
        extra: dict | None = None,
    ) -> Scores:
        """Every source on the batch (`extra`: more keyword arguments, after `reward.kwargs`)."""
        kwargs = {**self.extra, **(extra or {})}
        raw = [
            call_reward_function(
                s,
                prompts,
                completions,
                completion_ids,
                columns,
                self.timeout,
                kwargs,
                self.on_timeout,
            )
            for s in self.sources
        ]
        per_source = torch.tensor(
            [[0.0 if v is None else v for v in values] for values in raw], dtype=torch.float32
        )
        present = torch.tensor([[v is not None for v in values] for values in raw])
        weights = torch.tensor([s.weight for s in self.sources], dtype=torch.float32)
        scores, score_mask = combine_rewards(
            per_source, present, weights, group_size, self.mode, self.clip
        )
        overflow = score_mask & ~torch.isfinite(scores)  # each reward fits float32, their sum not
        if overflow.any():
            i = int(overflow.nonzero()[0])
            raise RewardError(self._not_finite(i, float(scores[i]), raw, prompts[i]))
        names = [s.name for s in self.sources]
        return Scores(scores, score_mask, per_source, present, names)

    def _not_finite(self, i: int, score: float, raw: list[list], prompt) -> str:
        """The message for sample i, whose rewards `raw[f][i]` combine to a non-finite score."""
        parts = [
            f"'{s.name}' (weight {s.weight:g}, returned {values[i]:g})"
            for s, values in zip(self.sources, raw, strict=True)
            if values[i] is not None
        ]
        how = (
            "weighted sum"
            if self.mode == "sum_then_normalize"
            else f"{self.mode} combination (reward.multi_reward)"
        )
        return (
            f"the {how} of reward functions {_and(parts)} is {score:g} for sample {i} (prompt "
            f"{short_repr(prompt)}); combined rewards must stay within float32's range, "
            "|s| <= 3.4e38: scale these rewards or reward.weights down"
        )


def score_samples(
    rewards: RewardComputer, rows: list[dict], prompt_field: str, group_size: int, sampled
) -> Scores:
    """Score the G samples of each row (prompt-major, a `engine.sampling.Sampled`) with TRL's
    arguments: prompts as the dataset has them, the completions (text, or messages), their
    token ids, every other column repeated per sample, and the sampler's extra arguments
    (`environments` for episodes)."""
    prompts = [r[prompt_field] for r in rows for _ in range(group_size)]
    columns = {
        k: [r.get(k) for r in rows for _ in range(group_size)] for k in rows[0] if k != prompt_field
    }
    return rewards(
        prompts,
        sampled.completions,
        sampled.completion_ids,
        columns,
        group_size=group_size,
        extra=sampled.reward_kwargs,
    )


__all__ = [
    "RESERVED_ARGUMENTS",
    "RewardComputer",
    "RewardError",
    "RewardSource",
    "Scores",
    "call_reward_function",
    "distinct_names",
    "load_function",
    "refuse_unaccepted",
    "required_arguments",
    "score_samples",
]
