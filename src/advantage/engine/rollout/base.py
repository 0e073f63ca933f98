"""The generation-backend interface and the rollout batch it returns.

Layout: `B = P·G` sequences, prompt-major (the G completions of prompt p are rows p·G..p·G+G-1).
Prompts are left-padded `[B, Tp]`, completions right-padded `[B, Tc]`, so `[prompt; completion]`
is one `[B, Tp + Tc]` sequence whose completion occupies the last Tc positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch

from ..diverged import DivergedError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    ignore_eos: bool = False
    """Always generate max_new_tokens (benchmarks: equal work in every engine)."""
    seed: int | None = None
    """Seed for this call's sampling (engines that support it)."""


@dataclass
class Rollout:
    prompt_ids: torch.Tensor
    """`[B, Tp]` left-padded prompt tokens."""
    prompt_mask: torch.Tensor
    """`[B, Tp]` bool, True on real prompt tokens."""
    completion_ids: torch.Tensor
    """`[B, Tc]` right-padded completion tokens (EOS included when generated)."""
    completion_mask: torch.Tensor
    """`[B, Tc]` bool, True on generated tokens."""
    truncated: torch.Tensor
    """`[B]` bool: the completion hit max_new_tokens without EOS or a stop string."""
    logprobs: torch.Tensor | None = None
    """`[B, Tc]` the engine's log-probs of the sampled tokens under π/temperature (or None);
    0 on the environment's tokens."""
    action_mask: torch.Tensor | None = None
    """`[B, Tc]` bool: tokens the model sampled. Multi-turn episodes interleave the model's
    turns with the environment's replies, which are context, not actions (False here).
    None: every completion token is the model's (single turn)."""
    turn_rewards: torch.Tensor | None = None
    """`[B, Tc]` rewards an environment gave after a turn, on the last token of that turn
    (0 elsewhere); None when there are none."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted from each row's first real token (left padding does not shift them)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def model_mask(self) -> torch.Tensor:
        """`[B, Tc]` bool: the model's own completion tokens (the actions)."""
        if self.action_mask is None:
            return self.completion_mask
        return self.completion_mask & self.action_mask

    @property
    def completion_lengths(self) -> torch.Tensor:
        """`[B]` the model's tokens per sequence (environment tokens not counted)."""
        return self.model_mask.sum(-1)

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """The rows `rows` (indices or a slice), trimmed to their own longest prompt/completion."""
        picked = {
            f.name: (getattr(self, f.name)[rows] if getattr(self, f.name) is not None else None)
            for f in fields(self)
        }
        return replace(self, **picked).trimmed()

    def trimmed(self) -> Rollout:
        """Drop all-padding columns: prompt columns on the left, completion columns on the right."""
        p_keep = int(self.prompt_mask.sum(-1).max().item()) if self.prompt_mask.numel() else 0
        c_keep = (
            int(self.completion_mask.sum(-1).max().item()) if self.completion_mask.numel() else 0
        )
        c_keep = max(c_keep, 1)
        Tp = self.prompt_ids.shape[1]
        return replace(
            self,
            prompt_ids=self.prompt_ids[:, Tp - p_keep :],
            prompt_mask=self.prompt_mask[:, Tp - p_keep :],
            completion_ids=self.completion_ids[:, :c_keep],
            completion_mask=self.completion_mask[:, :c_keep],
            logprobs=None if self.logprobs is None else self.logprobs[:, :c_keep],
            action_mask=None if self.action_mask is None else self.action_mask[:, :c_keep],
            turn_rewards=None if self.turn_rewards is None else self.turn_rewards[:, :c_keep],
        )

    @staticmethod
    def concat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Stack rollouts of different widths (re-padding prompts left, completions right)."""
        Tp = max(p.prompt_ids.shape[1] for p in parts)
        Tc = max(p.completion_ids.shape[1] for p in parts)

        def left(x, width, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        def stacked(name: str, value, missing) -> torch.Tensor | None:
            """Field `name` of every part, right-padded with `value` (`missing(part)` stands in
            for a part that lacks it); None when no part has it."""
            tensors = [getattr(p, name) for p in parts]
            if all(t is None for t in tensors):
                return None
            return torch.cat(
                [
                    right(t if t is not None else missing(p), Tc, value)
                    for t, p in zip(tensors, parts, strict=True)
                ]
            )

        has_lp = all(p.logprobs is not None for p in parts)
        return Rollout(
            prompt_ids=torch.cat([left(p.prompt_ids, Tp, pad_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, Tp, False) for p in parts]),
            completion_ids=torch.cat([right(p.completion_ids, Tc, pad_id) for p in parts]),
            completion_mask=torch.cat([right(p.completion_mask, Tc, False) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            logprobs=stacked("logprobs", 0.0, None) if has_lp else None,
            action_mask=stacked("action_mask", False, lambda p: p.completion_mask),
            turn_rewards=stacked(
                "turn_rewards", 0.0, lambda p: torch.zeros(p.completion_mask.shape)
            ),
        )


def pad_prompts(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists → (ids `[N, Tp]`, bool mask `[N, Tp]`)."""
    Tp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Tp), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), Tp), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, Tp - len(p) :] = torch.tensor(p)
            mask[i, Tp - len(p) :] = True
    return ids, mask


def pad_completions(
    completions: list[list[int]], pad_id: int, logprobs: list[list[float]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad token lists → (ids `[B, Tc]`, bool mask, log-probs `[B, Tc]` or None)."""
    Tc = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), Tc), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), Tc), dtype=torch.bool)
    lp = None if logprobs is None else torch.zeros((len(completions), Tc))
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = True
        if lp is not None:
            lp[i, : len(c)] = torch.tensor(logprobs[i], dtype=torch.float32)
    return ids, mask, lp


class NonFiniteLogitsError(DivergedError):
    """The policy's next-token logits are NaN or infinite: its weights or activations have
    overflowed (a diverged update, a broken checkpoint). Sampling from them would pick a token
    by accident (an argmax over NaN gives token 0), so generation stops instead."""


class GenerationBackend(Protocol):
    """What the trainer needs from a rollout engine."""

    def generate(
        self, prompts: list[list[int]], num_generations: int, params: SamplingParams
    ) -> Rollout:
        """G completions per prompt (prompt-major), with the engine's sampling log-probs."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine generate with `model`'s current weights."""
        ...
