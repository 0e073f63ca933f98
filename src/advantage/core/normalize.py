"""Normalisation scopes of the advantages: `none`, `group`, `batch` (SPEC §3, seed 000).

- `group` (GRPO, arXiv:2402.03300 §4.1.2): divide sequence advantages `[B]` by the std of the
  scores of their group plus ε: `Â_i = (s_i - b_i) / (σ_g(s) + ε)`.
- `batch` (REINFORCE++, arXiv:2501.03262): masked whitening of token advantages `[B, T]` over
  every valid token of the global batch: `Â = (A - μ) / sqrt(σ² + ε)`. Under torch.distributed
  the sums and counts are all-reduced (two passes: Σx and n, then Σ(x-μ)²), so N ranks holding
  slices of a batch give exactly what one process gives on the whole batch.
"""

from __future__ import annotations

import torch

from .baselines import as_groups, constant_groups
from .distributed import all_reduce_sum

SCOPES = ("none", "group", "batch_std", "batch")


def group_std(
    scores: torch.Tensor,
    group_size: int,
    valid_mask: torch.Tensor | None = None,
    unbiased: bool = True,
) -> torch.Tensor:
    """Std of each group's valid scores, broadcast back to `[B]`.

    `unbiased=True` divides by n-1 (Bessel, as `torch.std`); a group with n ≤ 1 valid scores has
    std 0 (its advantages are then 0 or unchanged, never NaN), and so has a group whose valid
    scores are all equal (exactly 0, not the rounding residue of its mean: `constant_groups`).
    """
    valid = as_groups(
        torch.ones_like(scores, dtype=torch.bool) if valid_mask is None else valid_mask.bool(),
        group_size,
    )
    # in float64: squares of fp32 scores of ~1e20 overflow fp32 (σ = inf, every advantage 0)
    s = torch.where(valid, as_groups(scores, group_size).double(), 0.0)  # [P, G]
    n = valid.sum(-1, keepdim=True)
    mean = s.sum(-1, keepdim=True) / n.clamp(min=1)
    sq_dev = torch.where(valid, (s - mean).square(), 0.0).sum(-1, keepdim=True)
    dof = (n - 1) if unbiased else n
    var = torch.where((dof > 0) & ~constant_groups(s, valid), sq_dev / dof.clamp(min=1), 0.0)
    return var.sqrt().expand_as(s).reshape(-1).to(scores.dtype)


def group_normalize(
    advantages: torch.Tensor,
    scores: torch.Tensor,
    group_size: int,
    valid_mask: torch.Tensor | None = None,
    eps: float = 1e-4,
    unbiased: bool = True,
) -> torch.Tensor:
    """`advantages / (σ_g(scores) + ε)` — the `group` scope. All `[B]`.

    A group whose scores are all equal has σ = 0: its (zero) advantages stay 0, with no NaN,
    ε = 0 included (where σ + ε = 0 the advantages are left as they are).
    """
    scale = group_std(scores, group_size, valid_mask, unbiased) + eps
    return advantages / torch.where(scale > 0, scale, 1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, global_stats: bool = True) -> torch.Tensor:
    """`Σ x·m / Σ m` over all valid elements (all-reduced across ranks when `global_stats`).

    Returns 0 when nothing is valid. Accumulates in float64.
    """
    mask = mask.bool()
    stats = torch.stack([torch.where(mask, x, 0.0).sum().double(), mask.sum().double()])
    if global_stats:
        stats = all_reduce_sum(stats)
    return stats[0] / stats[1].clamp(min=1)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    unbiased: bool = True,
    shift_mean: bool = True,
    global_stats: bool = True,
) -> torch.Tensor:
    """Masked whitening — the `batch` scope.

        μ = Σ x·m / n,   σ² = Σ (x-μ)²·m / (n-1 if unbiased else n),   x̂ = (x - μ)/sqrt(σ² + ε)

    x `[B, T]` (or any shape), mask bool of the same shape → same shape, 0 where masked.
    With `shift_mean=False` the mean is added back (`x̂ + μ`). With `global_stats` and an
    initialised process group, n, Σx and Σ(x-μ)² are all-reduced (two sync points).
    """
    mask = mask.bool()
    stats = torch.stack([torch.where(mask, x, 0.0).sum().double(), mask.sum().double()])
    if global_stats:
        stats = all_reduce_sum(stats)
    total, n = stats[0], stats[1]
    mean = total / n.clamp(min=1)
    sq_dev = torch.where(mask, (x.double() - mean).square(), 0.0).sum()
    if global_stats:
        sq_dev = all_reduce_sum(sq_dev)
    dof = n - 1 if unbiased else n
    var = torch.where(dof > 0, sq_dev / dof.clamp(min=1), torch.zeros_like(sq_dev))
    whitened = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, 0.0).to(x.dtype)


class RunningMoments:
    """Running mean and variance of a stream of scores (Chan et al. parallel update), global
    across ranks; `state_dict()` / `load_state_dict()` for checkpoints.

    `normalize(x)` first adds the batch `x` `[N]` to the statistics, then returns
    `(x - mean) / (std + eps)` with the updated statistics (std with Bessel's correction).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.eps = eps
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0  # Σ (x - mean)²

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n_b, total = all_reduce_sum(
            torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum()])
        ).tolist()
        if n_b == 0:
            return
        mean_b = total / n_b
        m2_b = float(all_reduce_sum((x - mean_b).square().sum()))
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self.update(x)
        return (x - self.mean) / (self.std + self.eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = (
            float(state["count"]),
            float(state["mean"]),
            float(state["m2"]),
        )


def masked_std(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, global_stats: bool = True
) -> torch.Tensor:
    """Std of the valid elements of `x`: `sqrt(Σ (x-μ)²·m / (n-1 if unbiased else n))`.

    x, mask bool of the same shape → 0-dim float64; 0 when n ≤ 1 (n - 1 ≤ 0 with Bessel).
    With `global_stats` μ, the mean square deviation and n are all-reduced across ranks
    (three sync points), so N ranks give exactly the single-process std of the whole batch.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask, global_stats)
    biased_var = masked_mean((x.double() - mean).square(), mask, global_stats)
    n = mask.sum().double()
    if global_stats:
        n = all_reduce_sum(n)
    dof = n - 1 if unbiased else n
    var = torch.where(dof > 0, biased_var * n / dof.clamp(min=1), torch.zeros_like(biased_var))
    return var.sqrt()


def batch_std_normalize(
    advantages: torch.Tensor,
    scores: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
    eps: float = 1e-4,
    unbiased: bool = True,
    global_stats: bool = True,
) -> torch.Tensor:
    """`advantages / (σ_batch(scores) + ε)` — the `batch_std` scope, all `[B]`.

    With the `group_mean` baseline this is "group mean, batch std": `Â_i = (s_i - mean_g(s)) /
    (σ(s over the whole batch) + ε)` (TRL `scale_rewards="batch"`; "Tricks or Traps",
    arXiv:2508.08221, the normalisation of its Lite PPO). The std is over the valid scores of
    the global batch (all-reduced across ranks, see `masked_std`), Bessel by default, ε outside
    the square root, as TRL (`nanstd`, 1e-4). Unlike the `batch` scope (`masked_whiten`), it
    does not re-centre and it works on sequence scores, not on token advantages.
    Invalid samples get 0.
    """
    valid = torch.ones_like(scores, dtype=torch.bool) if valid_mask is None else valid_mask.bool()
    scale = masked_std(scores, valid, unbiased, global_stats) + eps
    scaled = advantages / scale if scale > 0 else advantages  # ε = 0, all scores equal: as is
    return torch.where(valid, scaled, 0.0).to(advantages.dtype)
