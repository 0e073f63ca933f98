"""Token rewards, return-to-go and GAE (SPEC §2–§3, seed 002).

Shapes: `B` sequences (prompts × group size, prompt-major), `T` completion positions.
`mask` is bool `[B, T]`, True on completion tokens that count. Completions are right-padded,
so the last True of a row is its last completion token.
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
    rewards = torch.where(last_token_mask(mask), scores.unsqueeze(-1).to(torch.float32), 0.0)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * torch.where(mask.bool(), kl, 0.0)
    return rewards


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Return-to-go `G_t = r_t + γ·G_{t+1}` (REINFORCE), zero on masked positions.

    rewards `[B, T]`, mask bool `[B, T]` → `[B, T]`. The loop runs over the T time steps,
    vectorised over the B sequences.
    """
    mask = mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
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

        δ_t = r_t + γ·V_{t+1} - V_t        (V = 0 after the last valid token)
        A_t = Σ_l (γλ)^l · δ_{t+l}         computed as A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                    (the critic's regression target)

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
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = torch.where(mask, advantages, 0.0)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns
