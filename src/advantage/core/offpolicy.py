"""Off-policy correction between the sampling engine and the trainer (SPEC §7).

The engine (vLLM, or a stale policy) samples from a behaviour distribution μ whose log-probs
`engine_logprobs` differ from the trainer's `old_logprobs` (π_old: same weights, other kernels,
other precision). The policy objective is built on π_old; `rollout_correction` turns the gap
into importance weights `w ≈ π_old/μ` (detached) that multiply the per-token policy loss, and a
`keep_mask` that removes what is too far off-policy from the loss:

    log r = old_logp - engine_logp                      per token, clamped to ±20 (as all of core)
    level  token:          r_t = exp(log r_t)
           sequence:       r_i = exp(Σ_t m·log r_t)         (product of token ratios)
           sequence_mean:  r_i = exp((1/|y_i|)·Σ_t m·log r_t)  (geometric mean, length-normalised)
    mode   none: w = 1
           tis (truncated IS):  w = clip(r, low, high)        (low = None: no lower bound)
           mis (masked IS):     w = r·1[low ≤ r ≤ high],  keep = m·1[low ≤ r ≤ high]

At sequence levels the clamp applies to the sequence's log-ratio, and one weight (one keep
decision) covers every token of the sequence. References: truncated IS, Yao et al. 2025 "Your
efficient RL framework secretly brings you off-policy RL training" (fengyao.notion.site/off-policy-rl);
masked IS, Liu, Li et al. 2025 "When speed kills stability" (richardli.xyz/rl-collapse).

What the peers do (read in their code):
- TRL `GRPOTrainer._generate_and_score_completions` (trl/trainer/grpo_trainer.py),
  `vllm_importance_sampling_mode`: `token_truncate` / `sequence_truncate` = tis at token /
  sequence level with `low = vllm_importance_sampling_clip_min` (default None),
  `high = vllm_importance_sampling_clip_max` (default 3); `token_mask` / `sequence_mask` (the
  default) = mis. Sequence ratio = exp of the masked SUM. No log-ratio clamp.
- verl `compute_rollout_correction_weights` (verl/trainer/ppo/rollout_corr_helper.py),
  `rollout_is: token | sequence` = tis with `high = rollout_is_threshold` and no lower bound;
  sequence = exp of the masked SUM, clamped to ±20 like ours. Its rejection sampling
  `compute_rollout_rejection_mask` (`rollout_rs: token_k1 | seq_sum_k1 | seq_mean_k1`) drops
  tokens / sequences whose ratio leaves the bounds but keeps weight 1 unless `rollout_is` is
  also set; its k1 bounds apply to -log r, i.e. to 1/r (the same set when low = 1/high).
  verl's "Seq-MIS" recipe (rollout_is=sequence, rs=seq_sum_k1, bounds [1/C, C], cap C) is
  `mis` at `sequence` level with low = 1/C, high = C.
- OpenRLHF `PolicyLoss.forward` (openrlhf/models/loss.py), `is_correction_type`: `tis` = tis at
  token level with both bounds (default [0.5, 5]); `icepop` = mis at token level;
  `seq-mask-tis` keeps whole sequences by their GEOMETRIC mean (our `sequence_mean` keep_mask)
  and weighs kept tokens by their own token ratio (untruncated).
"""

from __future__ import annotations

import math

import torch

from .kl import LOG_RATIO_CLAMP
from .registry import Registry

CORRECTION_LEVELS: Registry = Registry("rollout correction level")
CORRECTION_MODES: Registry = Registry("rollout correction mode")


@CORRECTION_LEVELS.register("token")
def _token_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return log_ratio


@CORRECTION_LEVELS.register("sequence")
def _sequence_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True).expand_as(log_ratio)


@CORRECTION_LEVELS.register("sequence_mean")
def _sequence_mean_level(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True)
    return (total / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_ratio)


def _bounds(low: float | None, high: float | None) -> tuple[float, float]:
    """None → unbounded on that side."""
    return (-math.inf if low is None else low), (math.inf if high is None else high)


def _in_bounds(ratio: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    lo, hi = _bounds(low, high)
    return (ratio >= lo) & (ratio <= hi)


@CORRECTION_MODES.register("none")
def _no_correction(ratio, low, high):
    return torch.ones_like(ratio), torch.ones_like(ratio, dtype=torch.bool)


@CORRECTION_MODES.register("tis")
def _truncated_is(ratio, low, high):
    lo, hi = _bounds(low, high)
    return ratio.clamp(lo, hi), torch.ones_like(ratio, dtype=torch.bool)


@CORRECTION_MODES.register("mis")
def _masked_is(ratio, low, high):
    keep = _in_bounds(ratio, low, high)
    return torch.where(keep, ratio, 0.0), keep


def rollout_correction(
    old_logprobs: torch.Tensor,
    engine_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "none",
    level: str = "token",
    low: float | None = None,
    high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights and keep mask between the engine's and the trainer's log-probs.

    old_logprobs (trainer, π_old), engine_logprobs (sampler, μ) `[B, T]`, mask bool `[B, T]` →
    (weights `[B, T]` detached, 0 where not kept; keep_mask bool `[B, T]` = mask minus what
    `mis` drops; detached metrics). Equations, levels and modes in the module docstring;
    `low` / `high` are ratio bounds (None = unbounded on that side). Use: per-token policy
    loss × weights, aggregated over keep_mask.

    Metrics (means over valid tokens): `rollout/logprob_gap` = mean |old - engine|,
    `rollout/is_ratio_mean` (before correction), `rollout/is_weight_mean` (after; dropped
    tokens count 0); `tis`: `rollout/is_capped_frac` = tokens whose weight was truncated;
    `mis`: `rollout/is_masked_frac` = tokens dropped, `rollout/is_masked_seq_frac` = sequences
    (with a valid token) that lost at least one token.
    """
    level_fn = CORRECTION_LEVELS[level]
    mode_fn = CORRECTION_MODES[mode]
    if low is not None and high is not None and low > high:
        raise ValueError(f"rollout_correction: low={low} must not exceed high={high}")
    mask = mask.bool()
    with torch.no_grad():
        gap = torch.where(mask, old_logprobs - engine_logprobs, 0.0)
        log_ratio = level_fn(gap, mask).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)
        weights, keep = mode_fn(ratio, low, high)
        keep_mask = keep & mask
        weights = torch.where(keep_mask, weights, 0.0)

        count = mask.sum().clamp(min=1)

        def token_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x, 0.0).sum() / count

        metrics = {
            "rollout/logprob_gap": token_mean(gap.abs()),
            "rollout/is_ratio_mean": token_mean(ratio),
            "rollout/is_weight_mean": token_mean(weights),
        }
        if mode == "tis":
            metrics["rollout/is_capped_frac"] = token_mean((~_in_bounds(ratio, low, high)).float())
        if mode == "mis":
            dropped = mask & ~keep_mask
            metrics["rollout/is_masked_frac"] = token_mean(dropped.float())
            has_tokens = mask.any(-1)
            metrics["rollout/is_masked_seq_frac"] = (
                dropped.any(-1) & has_tokens
            ).sum() / has_tokens.sum().clamp(min=1)
    return weights, keep_mask, metrics
