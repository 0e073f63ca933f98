"""Token rewards, return-to-go and GAE (SPEC §2–§3, §7; seed 002).

Shapes: `B` sequences (prompts × group size, prompt-major), `T` completion positions.
`mask` is bool `[B, T]`, True on the tokens that are actions (the model's tokens that count).
Positions where the mask is False are **not time steps**: right padding, and in multi-turn
episodes the environment's tokens between two model turns. Return-to-go and GAE skip them —
the next state of a model token is the next model token — so γ and λ discount per action, and an
episode's returns do not depend on how many tokens the environment wrote in between.
"""

from __future__ import annotations

import torch


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool `[B, T]`: True only at the last True position of each row of `mask` (none if empty)."""
    mask = mask.bool()
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device)
    # index of the last valid token; -1 for an empty row, which then matches nothing
    last = torch.where(mask, positions, -1).amax(dim=-1, keepdim=True)  # [B, 1]
    return positions == last


def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Shape sequence scores into per-token rewards.

        r[i, t] = -β·kl[i, t]·m[i, t] + s_i·[t = last token of i]

    scores `[B]`, mask bool `[B, T]`, kl `[B, T]` or None (no KL in the reward) → `[B, T]`.
    A row with an empty mask gets all-zero rewards.
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)  # fp64 scores stay fp64
    rewards = torch.where(last_token_mask(mask), scores.unsqueeze(-1).to(dtype), 0.0)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * torch.where(mask.bool(), kl, 0.0)
    return rewards


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Return-to-go `G_t = r_t + γ·G_{t'}` (REINFORCE), t' the next action after t; zero on
    masked positions, which are skipped (not time steps).

    rewards `[B, T]`, mask bool `[B, T]` → `[B, T]`. The loop runs over the T positions,
    vectorised over the B sequences.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return torch.where(mask, returns, 0.0)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv:1506.02438, eq. 16).

        δ_t = r_t + γ·V_{t'} - V_t         (t' the next action after t; V = 0 after the last)
        A_t = Σ_l (γλ)^l · δ_{t+l}         computed as A_t = δ_t + γλ·A_{t'}
        R_t = A_t + V_t                    (the critic's regression target)

    Masked positions are skipped: an environment's tokens between two model turns are not
    time steps, so the value that bootstraps a turn's last token is the next turn's first.
    rewards, values `[B, T]`, mask bool `[B, T]` → (advantages `[B, T]`, returns `[B, T]`),
    both zero on masked positions.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        step = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(step, delta + gamma * lam * next_advantage, next_advantage)
        advantages[:, t] = next_advantage
        next_value = torch.where(step, values[:, t], next_value)
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
