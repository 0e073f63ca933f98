"""Baselines: what is subtracted from the sequence score `s_i` (SPEC §3, seed 001).

Scores are `[B]` with `B = P·G`, prompt-major: sequence `i` belongs to group `i // G`
(the layout `repeat_interleave(G)` gives). `valid_mask` (bool `[B]`, optional) marks the
samples that have a score; the others are left out of every statistic and get 0.

Every baseline is an object `baseline(scores, group_size, valid_mask) -> centred [B]` with
`state_dict()` / `load_state_dict()` (empty for the stateless ones), registered in BASELINES.
The stateless ones are also plain functions: `group_mean_advantages`, `leave_one_out_advantages`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .distributed import all_reduce_sum
from .registry import Registry


class Baseline(Protocol):
    def __call__(
        self, scores: torch.Tensor, group_size: int, valid_mask: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


BASELINES: Registry = Registry("baseline")


def as_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View `[B]` as `[P, G]` (prompt-major); clear error when B is not a multiple of G."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.shape[0] % group_size:
        raise ValueError(
            f"batch of {x.shape[0]} sequences is not a multiple of the group size {group_size}"
        )
    return x.view(-1, group_size)


def _valid(scores: torch.Tensor, valid_mask: torch.Tensor | None) -> torch.Tensor:
    if valid_mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    return valid_mask.bool()


def constant_groups(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[P, 1]` bool: the groups of `scores` `[P, G]` whose valid members (`valid` `[P, G]`) are
    all equal, exactly. Their mean in floating point need not be that value (eight scores of
    0.1 in fp32 average to 0.1 ± 1 ulp), so the baselines and the group std treat them
    explicitly: a constant group's centred scores and std are 0, not rounding residue that
    division by σ + ε would blow up."""
    top = torch.where(valid, scores, float("-inf")).amax(-1, keepdim=True)
    bottom = torch.where(valid, scores, float("inf")).amin(-1, keepdim=True)
    return top == bottom


def group_mean_advantages(
    scores: torch.Tensor, group_size: int, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`s_i - mean_g(s)`, the mean over the valid members of i's group (GRPO).

    scores `[B]` → `[B]`; invalid samples get 0, and so does every member of a group whose
    valid scores are all equal (exactly 0, `constant_groups`).
    """
    valid = as_groups(_valid(scores, valid_mask), group_size)
    s = torch.where(valid, as_groups(scores, group_size), 0.0)  # [P, G]
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = s.sum(-1, keepdim=True) / count
    return torch.where(valid & ~constant_groups(s, valid), s - mean, 0.0).view(-1)


def leave_one_out_advantages(
    scores: torch.Tensor, group_size: int, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 21):

        s_i - (Σ_{k∈g} s_k - s_i)/(n-1)  =  n/(n-1)·(s_i - mean_g(s))

    with n the group's valid members (n = G when all are scored). scores `[B]` → `[B]`.
    A sample whose group has no other valid member gets 0, and so does every member of a group
    whose valid scores are all equal (`constant_groups`). Raises if `group_size < 2`.
    """
    if group_size < 2:
        raise ValueError(
            "leave_one_out baseline needs at least 2 completions per prompt "
            f"(group_size={group_size}); raise num_generations or use another baseline"
        )
    valid = as_groups(_valid(scores, valid_mask), group_size)
    s = torch.where(valid, as_groups(scores, group_size), 0.0)  # [P, G]
    others = valid.sum(-1, keepdim=True) - 1  # n - 1 per group
    baseline = (s.sum(-1, keepdim=True) - s) / others.clamp(min=1)
    counted = valid & (others > 0) & ~constant_groups(s, valid)
    return torch.where(counted, s - baseline, 0.0).view(-1)


def global_mean(
    scores: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> tuple[float, float]:
    """(Σ s, n) over the valid scores of the global batch (all-reduced across ranks)."""
    valid = _valid(scores, valid_mask)
    stats = torch.stack([torch.where(valid, scores, 0.0).sum().double(), valid.sum().double()])
    total, count = all_reduce_sum(stats).tolist()
    return total, count


@BASELINES.register("none")
class NoBaseline:
    """`b = 0`: plain REINFORCE."""

    def __call__(self, scores, group_size, valid_mask=None):
        return torch.where(_valid(scores, valid_mask), scores, 0.0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@BASELINES.register("critic")
class CriticBaseline(NoBaseline):
    """PPO: the scores pass through unchanged; the critic's values enter later through GAE."""


@BASELINES.register("group_mean")
class GroupMeanBaseline(NoBaseline):
    """`b_i = mean_g(s)` (GRPO)."""

    def __call__(self, scores, group_size, valid_mask=None):
        return group_mean_advantages(scores, group_size, valid_mask)


@BASELINES.register("leave_one_out")
class LeaveOneOutBaseline(NoBaseline):
    """`b_i = mean of the other members of i's group` (RLOO)."""

    def __call__(self, scores, group_size, valid_mask=None):
        return leave_one_out_advantages(scores, group_size, valid_mask)


@BASELINES.register("moving_average")
class MovingAverageBaseline:
    """`b = (1/N)·Σ s` over every score seen so far, the current batch included (seed 001).

    Updated with the current (global) batch first, then subtracted. With equal batch sizes
    this is the mean over steps of the batch means, `b = (1/S)·Σ_s R̄_s`.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def __call__(self, scores, group_size, valid_mask=None):
        total, count = global_mean(scores, valid_mask)
        self.total += total
        self.count += count
        return torch.where(_valid(scores, valid_mask), scores - self.value, 0.0)

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])


@BASELINES.register("ema")
class EMABaseline:
    """`b ← α·b + (1-α)·mean(s_batch)`, then `s_i - b` (seed 001). α = 0.9 by default.

    The first batch initialises `b = mean(s_batch)` (no bias towards 0). The batch mean is
    global (all-reduced across ranks).
    """

    def __init__(self, alpha: float = 0.9) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"ema baseline: alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha
        self.value: float | None = None

    def __call__(self, scores, group_size, valid_mask=None):
        total, count = global_mean(scores, valid_mask)
        if count:
            batch_mean = total / count
            if self.value is None:
                self.value = batch_mean
            else:
                self.value = self.alpha * self.value + (1.0 - self.alpha) * batch_mean
        b = self.value if self.value is not None else 0.0
        return torch.where(_valid(scores, valid_mask), scores - b, 0.0)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.alpha, self.value = float(state["alpha"]), state["value"]


def make_baseline(name: str, *, ema_alpha: float = 0.9) -> Baseline:
    """A fresh baseline object by name (only `ema` takes a parameter, its α)."""
    cls = BASELINES[name]
    return cls(alpha=ema_alpha) if cls is EMABaseline else cls()
