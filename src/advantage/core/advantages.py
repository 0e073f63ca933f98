"""The one advantage pipeline every preset runs (SPEC §3, "order of operations").

    1. scores s → subtract the baseline
    2. `group` scope: divide by the group's std + ε (`batch_std`: the whole batch's std + ε)
    3. token rewards: the result of 2 on the last completion token, -β·KL on every token
       when the KL is in the reward, and an episode's per-turn rewards where they fell
    4. return-to-go with γ, or GAE with the critic's values
    5. `batch` scope: masked whitening over the global batch

Each step is a no-op when its axis says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithm import Algorithm
from .baselines import Baseline, as_groups
from .kl import kl_penalty
from .normalize import (
    batch_std_normalize,
    group_normalize,
    group_std,
    masked_mean,
    masked_whiten,
)
from .returns import discounted_returns, gae, token_rewards


@dataclass
class AdvantageInputs:
    """Tensors of one rollout batch (B = P·G sequences, prompt-major; T completion positions)."""

    scores: torch.Tensor
    """`[B]` sequence scores `s_i` (any value where `score_mask` is False)."""
    mask: torch.Tensor
    """`[B, T]` bool: completion tokens that count in the loss and in batch statistics."""
    group_size: int
    """G, completions per prompt."""
    score_mask: torch.Tensor | None = None
    """`[B]` bool: samples that have a score. The others get advantage 0 and do not train."""
    old_logprobs: torch.Tensor | None = None
    """`[B, T]` log-probs of the generating policy (needed for KL in the reward)."""
    ref_logprobs: torch.Tensor | None = None
    """`[B, T]` log-probs of the reference (needed for KL in the reward)."""
    values: torch.Tensor | None = None
    """`[B, T]` critic values (needed when the baseline is `critic`)."""
    turn_rewards: torch.Tensor | None = None
    """`[B, T]` per-turn rewards of multi-turn episodes, already on the last token of their
    turn; added to the token rewards as they are (after the baseline and the score scope)."""


@dataclass
class AdvantageOutputs:
    advantages: torch.Tensor
    """`[B, T]`, zero where the (effective) mask is False."""
    returns: torch.Tensor | None
    """`[B, T]` critic targets `A + V` (GAE only)."""
    mask: torch.Tensor
    """`[B, T]` bool: the input mask with unscored samples removed."""
    metrics: dict[str, torch.Tensor]


@torch.no_grad()
def compute_advantages(
    inputs: AdvantageInputs, algo: Algorithm, baseline: Baseline, *, kl_coef: float
) -> AdvantageOutputs:
    """Run steps 1–5 for `algo`. `baseline` is the (possibly stateful) object of
    `algo.baseline`; `kl_coef` is the current β (the KL controller's value; `algo.kl_coef` is
    only its initial value), used when `algo.kl_in_reward`.
    """
    scores = inputs.scores.to(torch.promote_types(inputs.scores.dtype, torch.float32))
    score_mask = (
        torch.ones_like(scores, dtype=torch.bool)
        if inputs.score_mask is None
        else inputs.score_mask.bool()
    )
    scores = torch.where(score_mask, scores, 0.0)
    mask = inputs.mask.bool() & score_mask.unsqueeze(-1)
    G = inputs.group_size
    metrics: dict[str, torch.Tensor] = {}

    # 1. baseline
    centred = baseline(scores, G, score_mask)
    # 2. score scope: / (σ_g(s) + ε) of the group, or / (σ(s) + ε) of the whole batch
    if algo.scope == "group":
        centred = group_normalize(
            centred, scores, G, score_mask, algo.group_std_eps, algo.group_std_unbiased
        )
    elif algo.scope == "batch_std":
        centred = batch_std_normalize(
            centred, scores, score_mask, algo.group_std_eps, algo.group_std_unbiased
        )
    # 3. token rewards: centred score on the last token, -β·KL(old ‖ ref) on every token
    kl = None
    if algo.kl_in_reward:
        if inputs.old_logprobs is None or inputs.ref_logprobs is None:
            raise ValueError("KL in the reward needs old_logprobs and ref_logprobs")
        kl = kl_penalty(inputs.old_logprobs, inputs.ref_logprobs, algo.kl_estimator)
        metrics["kl_reward"] = masked_mean(kl, mask)
    rewards = token_rewards(centred, mask, kl, kl_coef)
    if inputs.turn_rewards is not None:
        rewards = rewards + torch.where(mask, inputs.turn_rewards.float(), 0.0)
    # 4. return-to-go, or GAE with the critic
    returns = None
    if algo.uses_critic:
        if inputs.values is None:
            raise ValueError(f"baseline 'critic' ({algo.name}) needs the critic's values")
        advantages, returns = gae(rewards, inputs.values.float(), mask, algo.gamma, algo.lam)
    else:
        advantages = discounted_returns(rewards, mask, algo.gamma)
    # 5. batch scope: masked whitening over the global batch
    if algo.scope == "batch":
        advantages = masked_whiten(
            advantages, mask, algo.whiten_eps, algo.whiten_unbiased, shift_mean=True
        )

    metrics["advantages/mean"] = masked_mean(advantages, mask)
    metrics["advantages/std"] = masked_mean(
        (advantages - metrics["advantages/mean"]).square(), mask
    ).sqrt()
    if G > 1:
        zero_std = as_groups(group_std(scores, G, score_mask) == 0, G)[:, 0]
        metrics["frac_zero_std_groups"] = zero_std.float().mean()
    return AdvantageOutputs(advantages=advantages, returns=returns, mask=mask, metrics=metrics)
