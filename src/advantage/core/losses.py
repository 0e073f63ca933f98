"""Per-token log-probs and entropy, the clipped policy and value losses, and loss aggregation
(SPEC §4, seeds 002–003).

Shapes: `B` sequences, `T` completion positions, `V` vocabulary. Masks are bool, True = counts.
Losses are returned per token `[B, T]`; `aggregate` turns them into a scalar.
"""

from __future__ import annotations

import math

import torch

from .kl import LOG_RATIO_CLAMP
from .registry import Registry


def logprobs_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`log softmax(z)[y] = z_y - logsumexp(z)` without materialising the full log-softmax.

    logits `[B, T, V]` (any float dtype; computed in float32), token_ids `[B, T]` → `[B, T]`.
    """
    logits = logits.float()
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z): `H = -Σ_v p_v·log p_v` with `log p = log_softmax(z)`, in fp32 (fp64
    logits stay fp64). `[B, T, V]` → `[B, T]`. Equal in exact arithmetic to verl's
    `logsumexp(z) - Σ_v p_v·z_v`, which cancels two large terms in floating point (fp32,
    V = 32000, logits of scale 10: off by ~2e-5; this form ~1e-6)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_fraction(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (flags & mask).sum() / mask.sum().clamp(min=1)


def token_advantages(
    advantages: torch.Tensor, like: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`[B]` or `[B, T]` advantages → `[B, T]`, 0 where `mask` is False: a NaN there would
    reach valid tokens' gradients through a ratio they share (GSPO's per-sequence ratio: the
    backward of `-A·ρ` multiplies the masked 0 by it)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    return torch.where(mask, advantages.expand_as(like), 0.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped importance-sampled surrogate (PPO, arXiv:1707.06347 eq. 7), per token:

        ρ = exp(logp - old_logp)
        L = max(-ρ·A, -clip(ρ, 1-ε_low, 1+ε_high)·A)
        dual clip (c > 1, arXiv:1912.09729 eq. 5), for A < 0 only:  L = min(L, -c·A)

    `ε_high > ε_low` is DAPO's clip-higher (arXiv:2503.14476). The log-ratio is clamped to ±20.
    logprobs, old_logprobs `[B, T]`, advantages `[B, T]` or `[B]` (broadcast over T),
    mask bool `[B, T]` → (loss `[B, T]`, 0 where masked; detached metrics).
    """
    mask = mask.bool()
    advantages = token_advantages(advantages, logprobs, mask)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    metrics: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"policy_loss: dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        metrics["clip_frac/dual"] = masked_fraction(dual_clipped, mask).detach()
    with torch.no_grad():
        metrics["clip_frac/low"] = masked_fraction(
            (ratio < 1.0 - clip_low) & (advantages < 0), mask
        )
        metrics["clip_frac/high"] = masked_fraction(
            (ratio > 1.0 + clip_high) & (advantages > 0), mask
        )
        metrics["approx_kl"] = approx_kl(log_ratio, mask)
    return torch.where(mask, loss, 0.0), metrics


def approx_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(old ‖ new) per token, `expm1(lr) - lr` (the usual "approx_kl"
    diagnostic), mean over valid tokens (masked ones never enter it, NaN or not)."""
    with torch.no_grad():
        k3 = torch.expm1(log_ratio) - log_ratio
        return torch.where(mask, k3, 0.0).sum() / mask.sum().clamp(min=1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss (PPO as in OpenAI baselines), per token:

        V_clip = V_old + clip(V - V_old, -ε_v, ε_v)
        L_V = ½·max((V - R)², (V_clip - R)²)          (½·(V - R)² when clip is None)

    values, old_values, returns `[B, T]`, mask bool `[B, T]` → (loss `[B, T]`, metrics).
    """
    mask = mask.bool()
    unclipped = (values - returns).square()
    metrics: dict[str, torch.Tensor] = {}
    if clip is None or clip == math.inf:
        loss = 0.5 * unclipped
    else:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (v_clipped - returns).square()
        loss = 0.5 * torch.maximum(unclipped, clipped)
        metrics["value_clip_frac"] = masked_fraction(clipped > unclipped, mask).detach()
    return torch.where(mask, loss, 0.0), metrics


# ---------------------------------------------------------------------------------------------
# Aggregation of a per-token loss `L [B, T]` into a scalar. Every mode is "a sum over this piece
# divided by a global denominator", so splitting a batch into micro-batches (and ranks) and
# summing the pieces' gradients gives exactly the full-batch gradient when the caller supplies
# the global `num_tokens` / `num_seqs`. The registered functions receive the loss already zeroed
# where masked (`aggregate` does it with `where`, so a NaN under the mask cannot leak).

AGGREGATIONS: Registry = Registry("loss aggregation")


@AGGREGATIONS.register("token_mean")
def token_mean(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """`Σ L·m / N`, N = Σ m over the global batch (default: this batch's own count)."""
    n = mask.sum() if num_tokens is None else num_tokens
    return loss.sum() / max(float(n), 1.0)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """`(1/S)·Σ_i (Σ_t L·m / Σ_t m)`: each sequence's token mean, averaged over S sequences.

    S = num_seqs (global) or B. A row with an empty mask contributes 0 and still counts in S.
    """
    per_seq = loss.sum(-1) / mask.sum(-1).clamp(min=1)
    s = loss.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(s), 1.0)


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """`(1/S)·Σ_i Σ_t L·m`: per-sequence token sums averaged over S sequences."""
    s = loss.shape[0] if num_seqs is None else num_seqs
    return loss.sum() / max(float(s), 1.0)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """Dr. GRPO (arXiv:2503.20783): `Σ L·m / (S·T_max)`; T_max = max_len (the generation
    budget, so trimming padding does not change the scale) or this tensor's T."""
    s = loss.shape[0] if num_seqs is None else num_seqs
    t_max = loss.shape[-1] if max_len is None else max_len
    return loss.sum() / max(float(s) * float(t_max), 1.0)


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | torch.Tensor | None = None,
    num_seqs: float | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` with its bool mask `[B, T]` to a scalar, by name.

    `num_tokens` / `num_seqs`: the global token / sequence counts across micro-batches and
    ranks (default: this batch's own). `max_len`: T_max of `seq_mean_token_sum_norm`.
    """
    fn = AGGREGATIONS[mode]
    mask = mask.bool()
    loss = torch.where(mask, loss, 0.0)
    return fn(loss, mask, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Reward-model loss on preference pairs (Bradley–Terry; InstructGPT arXiv:2203.02155 eq. 1),
    with the optional margin of Llama 2 (arXiv:2307.09288 eq. 2):

        L = mean_i -log σ(r_c,i - r_r,i - m_i)

    chosen_rewards, rejected_rewards `[N]`, margin scalar or `[N]` → scalar. Computed as
    softplus(-(Δ - m)), exact for large |Δ|.
    """
    return torch.nn.functional.softplus(-(chosen_rewards - rejected_rewards - margin)).mean()
