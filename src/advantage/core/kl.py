"""KL estimators between the policy and the reference, per token (SPEC §2, seeds 002–003).

With `lr = logp - ref_logp` clamped to ±20 (so `exp` never overflows):

    k1 = lr                  unbiased, can be negative per token
    k2 = lr² / 2             biased, always ≥ 0
    k3 = exp(-lr) - 1 + lr   unbiased and always ≥ 0 (Schulman, "Approximating KL divergence", 2020)

All three estimate KL(π ‖ π_ref) from samples of π. Shapes: inputs `[B, T]` (any shape works,
elementwise), output the same shape.
"""

from __future__ import annotations

import torch

from .registry import Registry

LOG_RATIO_CLAMP = 20.0

KL_ESTIMATORS: Registry = Registry("KL estimator")


def log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """`lr = logp - ref_logp`, clamped to ±LOG_RATIO_CLAMP."""
    return (logprobs - ref_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = lr."""
    return log_ratio(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = lr² / 2."""
    return 0.5 * log_ratio(logprobs, ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(-lr) - 1 + lr  (computed as expm1(-lr) + lr, exact near lr = 0)."""
    lr = log_ratio(logprobs, ref_logprobs)
    return torch.expm1(-lr) + lr


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token KL estimate by name: `KL_ESTIMATORS[estimator](logprobs, ref_logprobs)`."""
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL estimates and their per-sequence sums, zero where `mask` is False.

    logprobs, ref_logprobs `[B, T]`, mask bool `[B, T]` → (per_token `[B, T]`, per_seq `[B]`),
    `per_seq[i] = Σ_t k(logp, ref_logp)[i, t]·m[i, t]`. The adaptive controller (Ziegler et al.
    2019) is fed the mean over sequences of `per_seq`, the KL of a whole sequence. (verl feeds
    the mean over sequences of each sequence's per-token mean instead: the same `kl_target`
    means a per-token KL there, a per-sequence KL here.)
    """
    per_token = torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, estimator), 0.0)
    return per_token, per_token.sum(-1)
