"""Policy objectives: the per-token policy loss of the update, by name (SPEC §7, objective axis).

Every objective in `OBJECTIVES` has one signature,

    fn(logprobs, old_logprobs, advantages, mask, *, clip_low, clip_high, dual_clip=None)
        -> (loss [B, T], 0 where masked; dict of detached metric tensors)

with logprobs, old_logprobs `[B, T]` (B = prompts × group size, T completion positions),
advantages `[B, T]` or `[B]` (broadcast over T), mask bool `[B, T]` (True = counts). The loss is
per token; `core.losses.aggregate` reduces it. Log-ratios are clamped to ±LOG_RATIO_CLAMP (20)
before `exp`, as everywhere in core. Every objective reports `approx_kl`, the k3 estimate of
KL(old ‖ new) per token, averaged over valid tokens (the same number whatever the objective).

| name | ratio | loss per token |
|---|---|---|
| `ppo_clip` | token ρ_t | `max(-ρ_t·A, -clip(ρ_t)·A)`, optional dual clip |
| `gspo` | sequence s_i | `max(-s_i·A, -clip(s_i)·A)`, gradient through s_i |
| `gspo_token` | sg[s_i]·π_t/sg[π_t] | same value as `gspo`, per-token gradient |
| `cispo` | token ρ_t | `-sg(clip(ρ_t))·A·log π_t` |
| `pg` | none | `-A·log π_t` |
"""

from __future__ import annotations

import torch

from .kl import LOG_RATIO_CLAMP, kl_penalty
from .losses import approx_kl, masked_fraction, policy_loss, token_advantages
from .offpolicy import rollout_correction
from .registry import Registry

OBJECTIVES: Registry = Registry("policy objective")


def token_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`log ρ_t = logp - old_logp`, clamped to ±20, 0 where masked. `[B, T]` → `[B, T]`."""
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(mask.bool(), log_ratio, 0.0)


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio (arXiv:2507.18071 eq. 7):

        log s_i = (1/|y_i|)·Σ_t m[i,t]·(logp - old_logp)[i,t]

    `[B, T]` → `[B]`, clamped to ±20; 0 for a row with no valid token. The gradient flows to
    every valid token of the sequence, none to the masked ones.
    """
    mask = mask.bool()
    total = torch.where(mask, logprobs - old_logprobs, 0.0).sum(-1)
    length = mask.sum(-1).clamp(min=1)
    return (total / length).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _no_dual_clip(name: str, dual_clip: float | None) -> None:
    if dual_clip is not None:
        raise ValueError(
            f"objective {name!r}: dual_clip={dual_clip} applies only to the clipped surrogates "
            "(ppo_clip, gspo, gspo_token); set dual_clip to null"
        )


@OBJECTIVES.register("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clip with clip-higher and dual clip: `core.losses.policy_loss`
    (PPO arXiv:1707.06347 eq. 7; clip-higher DAPO arXiv:2503.14476; dual clip arXiv:1912.09729 eq. 5).
    """
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip)


def _sequence_ratio_loss(
    log_s: torch.Tensor,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clip on a given log-ratio `[B, T]`: `policy_loss(log_s, 0, ...)` computes exactly
    `max(-exp(log_s)·A, -clip(exp(log_s))·A)` (and the dual clip), gradient through `log_s`."""
    mask = mask.bool()
    loss, metrics = policy_loss(
        log_s, torch.zeros_like(log_s), advantages, mask, clip_low, clip_high, dual_clip
    )
    metrics["approx_kl"] = approx_kl(token_log_ratio(logprobs, old_logprobs, mask), mask)
    return loss, metrics


@OBJECTIVES.register("gspo")
def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv:2507.18071 eqs. 5 and 7), per token:

        s_i = exp((1/|y_i|)·Σ_t log ρ_{i,t})                 (length-normalised sequence ratio)
        L[i,t] = max(-s_i·A[i,t], -clip(s_i, 1-ε_low, 1+ε_high)·A[i,t])   on every valid t

    The clip is per sequence: every token of a sequence shares one clip decision. With a
    sequence advantage (`[B]`, or constant over t) each valid token carries the sequence's loss,
    so the `seq_mean_token_mean` aggregation gives the paper's `(1/G)·Σ_i min(...)` exactly
    (verl forces that aggregation for GSPO); `token_mean` weights sequences by their length.
    The gradient of s_i reaches every valid token: `∇s_i = s_i·(1/|y_i|)·Σ_t ∇log π_t`.
    Token advantages `[B, T]` are used per token with the sequence ratio (as verl does).

    Clip range: the paper's experiments use ε_low = 3e-4, ε_high = 4e-4 in eq. 5, far smaller than PPO's 0.2,
    because s_i is a per-token geometric mean; the values given here are used as they are.
    Optional dual clip as in `policy_loss` (OpenRLHF applies it to GSPO too). Clip fractions
    count valid tokens whose sequence was clipped. Shapes as in the module docstring.
    """
    log_s = sequence_log_ratio(logprobs, old_logprobs, mask).unsqueeze(-1).expand_as(logprobs)
    return _sequence_ratio_loss(
        log_s, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
    )


@OBJECTIVES.register("gspo_token")
def gspo_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token (arXiv:2507.18071, eq. 14), per token:

        s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)]      i.e. log s_{i,t} = sg[log s_i] + logp_t - sg[logp_t]
        L[i,t] = max(-s_{i,t}·A[i,t], -clip(s_{i,t}, 1-ε_low, 1+ε_high)·A[i,t])

    Same value and clip decision as `gspo` (s_{i,t} = s_i numerically), but each token's
    gradient is `s_i·∇log π_t` (times -A where unclipped), so token advantages `[B, T]` steer
    each token; with a sequence advantage and `seq_mean_token_mean` its gradient equals GSPO's.
    This is what verl's `compute_policy_loss_gspo` computes. Clip range: see `gspo`.
    """
    mask = mask.bool()
    seq = sequence_log_ratio(logprobs, old_logprobs, mask).detach().unsqueeze(-1)
    # logp - sg[logp] is 0 in value, 1 in gradient; where() keeps masked tokens out of the graph
    log_s = seq + torch.where(mask, logprobs - logprobs.detach(), 0.0)
    return _sequence_ratio_loss(
        log_s, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip
    )


@OBJECTIVES.register("cispo")
def cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax-M1, arXiv:2506.13585 eqs. 4–5), per token:

        ρ = exp(logp - old_logp),   r̂ = clip(ρ, 1-ε_low, 1+ε_high)
        L[i,t] = -sg(r̂)·A·logp            gradient  -r̂·A·∇logp

    Every token keeps a gradient (the weight is clipped, not the update). The paper sets no
    lower bound (ε_low large: `clip_low=1` gives a lower bound of 0, a no-op since ρ > 0) and
    tunes ε_high. TRL's `loss_type="cispo"` caps ρ at `epsilon_high` itself (`min(ρ, ε_max)`,
    ScaleRL's ε_max ≈ 5): that is `clip_low=1, clip_high=ε_max - 1` here.
    The loss value is not comparable with PPO's (it carries `log π`). Clip fractions count
    valid tokens whose weight was clipped below / above, whatever the sign of A (as verl).
    No dual clip.
    """
    _no_dual_clip("cispo", dual_clip)
    mask = mask.bool()
    advantages = token_advantages(advantages, logprobs, mask)
    log_ratio = token_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()  # sg(r̂), eq. 5
    loss = -weight * advantages * logprobs  # eq. 4
    metrics = {
        "clip_frac/low": masked_fraction(ratio < 1.0 - clip_low, mask).detach(),
        "clip_frac/high": masked_fraction(ratio > 1.0 + clip_high, mask).detach(),
        "approx_kl": approx_kl(log_ratio, mask),
    }
    return torch.where(mask, loss, 0.0), metrics


@OBJECTIVES.register("pg")
def pg(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain policy gradient, no ratio (REINFORCE, Williams 1992; verl's
    `compute_policy_loss_reinforce` without IS weights), per token:

        L[i,t] = -A[i,t]·logp[i,t]          gradient  -A·∇logp

    On-policy this is PPO clip's gradient at ρ = 1. `clip_low` / `clip_high` are ignored;
    `old_logprobs` is read only for `approx_kl`. No dual clip.
    """
    _no_dual_clip("pg", dual_clip)
    mask = mask.bool()
    loss = -token_advantages(advantages, logprobs, mask) * logprobs
    metrics = {"approx_kl": approx_kl(token_log_ratio(logprobs, old_logprobs, mask), mask)}
    return torch.where(mask, loss, 0.0), metrics


# The objective axis as (objective, ratio level) pairs → the registered loss.
RATIO_LEVELS = ("token", "sequence", "sequence_token")
_OBJECTIVE_BY_AXES = {
    ("ppo_clip", "token"): "ppo_clip",
    ("ppo_clip", "sequence"): "gspo",
    ("ppo_clip", "sequence_token"): "gspo_token",
    ("cispo", "token"): "cispo",
    ("pg", "token"): "pg",
}


def objective_name(objective: str, ratio_level: str = "token") -> str:
    """The registered loss of an (objective, ratio level) pair: ("ppo_clip", "sequence") → "gspo".

    `cispo` and `pg` are token-level only; a wrong pair raises naming the valid ones."""
    try:
        return _OBJECTIVE_BY_AXES[(objective, ratio_level)]
    except KeyError:
        valid = ", ".join(f"{o}/{r}" for o, r in _OBJECTIVE_BY_AXES)
        raise ValueError(
            f"algo.objective={objective!r} with algo.ratio_level={ratio_level!r} is not defined; "
            f"valid objective/ratio_level pairs: {valid}"
        ) from None


def policy_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str = "ppo_clip",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    engine_logprobs: torch.Tensor | None = None,
    correction: str = "none",
    correction_level: str = "token",
    correction_low: float | None = None,
    correction_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token loss the update aggregates (SPEC §2, §4, §7):

        L[i,t] = w[i,t]·L_obj[i,t] + β·k(logp, ref_logp)[i,t] - c_H·H[i,t]

    with `L_obj` the registered objective `OBJECTIVES[objective]`, the KL term only when
    `ref_logprobs` is given and β > 0 (KL in the loss; the gradient flows through it), the
    entropy bonus when `entropy_coef` > 0, and `w` the engine/trainer correction
    (`core.offpolicy.rollout_correction` of `old_logprobs` against `engine_logprobs`;
    w = 1 for `correction="none"`; `mis` gives w = 0 on dropped tokens, which keep their place
    in the aggregation's denominators). All tensors `[B, T]`.
    Returns (L `[B, T]`, detached metrics; `rollout/logprob_gap` = mean |old - engine|).
    """
    mask = mask.bool()
    per_token, metrics = OBJECTIVES[objective](
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    count = mask.sum().clamp(min=1)
    with torch.no_grad():
        metrics["loss/policy"] = (per_token * mask).sum() / count
    if engine_logprobs is not None:
        weights, _keep, correction_metrics = rollout_correction(
            old_logprobs,
            engine_logprobs,
            mask,
            mode=correction,
            level=correction_level,
            low=correction_low,
            high=correction_high,
        )
        if correction == "none":
            metrics["rollout/logprob_gap"] = correction_metrics["rollout/logprob_gap"]
        else:
            per_token = per_token * weights
            metrics.update(correction_metrics)
    if ref_logprobs is not None and kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        per_token = per_token + kl_coef * kl
        metrics["kl_loss"] = (torch.where(mask, kl, 0.0).sum() / count).detach()
    if entropy is not None:
        metrics["entropy"] = (torch.where(mask, entropy, 0.0).sum() / count).detach()
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    return torch.where(mask, per_token, 0.0), metrics
