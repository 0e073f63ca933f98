"""Combining several reward functions into one score per sample (SPEC §1, seed 004).

`values [F, B]` holds what each of F functions returned for each of B samples (prompt-major,
groups of `group_size`), `present [F, B]` (bool) whether it returned a number (TRL's `None` →
False); absent values are never read. Weights `w [F]`. A sample no function scored has
`score_mask` False and score 0. Modes, by name in `REWARD_COMBINATIONS`:

- `sum_then_normalize`: `s_i = Σ_f w_f·r_f(i)` over the present f; the advantage pipeline
  normalises afterwards (TRL's default `multi_objective_aggregation`).
- `normalize_then_sum` (ours; seed 004's tip): each function normalised within its group first,
  `r̂_f(i) = (r_f(i) - mean_g r_f) / (σ_g(r_f) + ε)` (Bessel, ε = 1e-4, over the group's present
  values; a group with one present value gives 0), then `s_i = Σ_f w_f·r̂_f(i)`.
- `trl_normalize_then_sum` (TRL's `normalize_then_sum`, GDPO): the same sum, then re-normalised
  over every scored sample of the whole batch, `s_i ← (s_i - μ_B) / (σ_B + 1e-4)` (Bessel,
  all-reduced across ranks as TRL gathers the batch). The result is already TRL's advantage:
  pair it with no further centring or scaling (TRL ignores `scale_rewards` in this mode).
"""

from __future__ import annotations

import torch

from .baselines import group_mean_advantages
from .normalize import batch_std_normalize, group_normalize, masked_mean
from .registry import Registry

REWARD_COMBINATIONS: Registry = Registry("multi-reward combination")


@REWARD_COMBINATIONS.register("sum_then_normalize")
def sum_then_normalize(values, present, weights, group_size, *, global_stats=True):
    """`s_i = Σ_f w_f·r_f(i)` over the functions present for i. `[F, B]` → `[B]`."""
    return (weights.unsqueeze(-1) * torch.where(present, values, 0.0)).sum(0)


@REWARD_COMBINATIONS.register("normalize_then_sum")
def normalize_then_sum(values, present, weights, group_size, *, global_stats=True):
    """`s_i = Σ_f w_f·(r_f(i) - mean_g r_f)/(σ_g(r_f) + 1e-4)` over the present f. `[F, B]` → `[B]`."""
    F, B = values.shape
    # [F, B] → [F·B]: B is a multiple of G, so no group straddles two functions; in float64,
    # so that rewards near float32's limit (|r| <= 3.4e38) do not overflow the group's sums
    flat = torch.where(present, values, 0.0).reshape(F * B).double()
    flat_present = present.reshape(F * B)
    centred = group_mean_advantages(flat, group_size, flat_present)
    normalized = group_normalize(centred, flat, group_size, flat_present).view(F, B)
    return sum_then_normalize(normalized.to(values.dtype), present, weights, group_size)


@REWARD_COMBINATIONS.register("trl_normalize_then_sum")
def trl_normalize_then_sum(values, present, weights, group_size, *, global_stats=True):
    """TRL's `normalize_then_sum`: `normalize_then_sum`, then `(s - μ_B)/(σ_B + 1e-4)` over the
    scored samples of the global batch (Bessel). `[F, B]` → `[B]`."""
    scores = normalize_then_sum(values, present, weights, group_size)
    scored = present.any(0)
    centred = scores - masked_mean(scores, scored, global_stats).to(scores.dtype)
    return batch_std_normalize(centred, scores, scored, eps=1e-4, global_stats=global_stats)


def combine_rewards(
    values: torch.Tensor,
    present: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    mode: str = "sum_then_normalize",
    clip: float | None = None,
    *,
    global_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One score per sample from F reward functions (modes in the module docstring).

    values `[F, B]` (anything where absent), present bool `[F, B]`, weights `[F]` →
    (scores `[B]`, 0 where no function scored; score_mask bool `[B]`). The optional clip to
    `[-c, c]` applies to the combined score, in every mode.
    """
    fn = REWARD_COMBINATIONS[mode]
    present = present.bool()
    weights = weights.to(values.dtype)
    scores = fn(values, present, weights, group_size, global_stats=global_stats)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    score_mask = present.any(0)
    return torch.where(score_mask, scores, 0.0), score_mask
