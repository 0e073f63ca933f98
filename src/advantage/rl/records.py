"""The typed records one training step hands from stage to stage (SPEC §1–§5).

    RunSizes      G, P, local P and B: derived once at setup
    ScoredRollout step 1–2: the rollout, its dataset rows and its scores
    NoGradPasses  step 3: old-policy and reference log-probs, critic values (no gradient)
    TokenBatch    step 4→5: everything the update needs per token, `.select(rows)` for pieces

Layout everywhere: B sequences, prompt-major (the G completions of a prompt are neighbours),
T completion positions (right-padded); masks are bool, True = counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..engine.rewards import Scores
from ..engine.rollout import Rollout


@dataclass(frozen=True)
class RunSizes:
    """The batch arithmetic of a run, computed once from the config and the world size."""

    G: int
    """Completions per prompt (a group)."""
    P: int
    """Prompts per step, over all ranks."""
    world: int
    """Data-parallel processes."""

    @property
    def P_local(self) -> int:
        """Prompts per step on this rank (whole groups only)."""
        return self.P // self.world

    @property
    def B_local(self) -> int:
        """Sequences per step on this rank, `P_local·G`."""
        return self.P_local * self.G


@dataclass
class ScoredRollout:
    """One rank's scored rollout batch: B = P_local·G sequences, prompt-major."""

    rollout: Rollout
    rows: list[dict]
    """The P_local dataset rows, one per group."""
    scores: Scores
    completions: list[str]
    """Decoded completion texts `[B]`."""
    conversations: list[list[dict]] | None = None
    """`[B]` the episodes' messages after the prompt (multi-turn), else None."""
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    tries: int = 1
    """Rollout rounds this step (dynamic sampling)."""
    dropped_groups: int = 0
    """Groups set aside by dynamic sampling because all their scores were equal."""
    version: int | None = None
    """The policy version (updates done) whose weights sampled it (asynchronous rollouts);
    None: the current weights."""

    def to_state(self) -> dict:
        """Plain data (tensors, numbers, strings, lists, dicts) for a checkpoint's `extra.pt`."""
        return {
            "rollout": {f.name: getattr(self.rollout, f.name) for f in fields(self.rollout)},
            "scores": {f.name: getattr(self.scores, f.name) for f in fields(self.scores)},
            **{
                name: getattr(self, name)
                for name in (
                    "rows",
                    "completions",
                    "conversations",
                    "rollout_seconds",
                    "reward_seconds",
                    "tries",
                    "dropped_groups",
                    "version",
                )
            },
        }

    @staticmethod
    def from_state(state: dict) -> ScoredRollout:
        rest = {k: v for k, v in state.items() if k not in ("rollout", "scores")}
        return ScoredRollout(
            rollout=Rollout(**state["rollout"]), scores=Scores(**state["scores"]), **rest
        )

    def select_groups(self, groups: list[int], G: int) -> ScoredRollout:
        """The groups `groups` (indices into `rows`), with their G sequences each."""
        rows_idx = torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long)
        return ScoredRollout(
            rollout=self.rollout.select(rows_idx),
            rows=[self.rows[g] for g in groups],
            scores=self.scores.select(rows_idx),
            completions=[self.completions[i] for i in rows_idx.tolist()],
            conversations=None
            if self.conversations is None
            else [self.conversations[i] for i in rows_idx.tolist()],
        )

    def split_constant_groups(self, G: int) -> tuple[ScoredRollout | None, ScoredRollout | None]:
        """Dynamic sampling (DAPO, arXiv:2503.14476): (groups with at least two different
        scores, the other groups); None for an empty part."""
        present = self.scores.score_mask.view(-1, G)  # [P, G]
        s = self.scores.scores.view(-1, G)
        hi = torch.where(present, s, -math.inf).amax(-1)
        lo = torch.where(present, s, math.inf).amin(-1)
        varied = (present.sum(-1) >= 2) & (hi > lo)  # [P]
        parts = []
        for keep in (varied, ~varied):
            groups = keep.nonzero().flatten().tolist()
            parts.append(self.select_groups(groups, G) if groups else None)
        return parts[0], parts[1]

    @staticmethod
    def concat(parts: list[ScoredRollout], pad_id: int, keep_groups: int, G: int) -> ScoredRollout:
        """The first `keep_groups` groups of `parts`, in order, as one batch."""
        if len(parts) == 1 and len(parts[0].rows) <= keep_groups:
            return parts[0]
        merged = ScoredRollout(
            rollout=Rollout.concat([p.rollout for p in parts], pad_id),
            rows=[r for p in parts for r in p.rows],
            scores=Scores.concat([p.scores for p in parts]),
            completions=[c for p in parts for c in p.completions],
            conversations=None
            if parts[0].conversations is None
            else [c for p in parts for c in p.conversations],
        )
        if len(merged.rows) > keep_groups:
            merged = merged.select_groups(list(range(keep_groups)), G)
        return merged


@dataclass
class NoGradPasses:
    """Step 3: what the models say about the rollout before the update (all `[B, T]`, or None
    when the algorithm does not need it)."""

    old_logprobs: torch.Tensor | None
    """The generating policy's log-probs, from a forward pass (μ > 1, several minibatches, or
    a KL in the reward that the engine's log-probs cannot serve)."""
    ref_logprobs: torch.Tensor | None
    """The reference's log-probs (β > 0)."""
    old_values: torch.Tensor | None
    """The critic's values (baseline `critic`)."""
    behaviour_logprobs: torch.Tensor | None
    """The log-probs of the policy that sampled, for the KL in the reward: `old_logprobs`, or
    the engine's own when they are exact."""


@dataclass
class TokenBatch:
    """Everything the update needs per token (B sequences, T positions)."""

    rollout: Rollout
    mask: torch.Tensor
    """`[B, T]` bool: tokens that count (completion tokens of scored samples, minus truncated
    completions under `rollout.mask_truncated`)."""
    advantages: torch.Tensor
    """`[B, T]`."""
    returns: torch.Tensor | None
    """`[B, T]` the critic's targets (GAE only)."""
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None

    @property
    def engine_logprobs(self) -> torch.Tensor | None:
        """`[B, T]` the rollout engine's log-probs of the sampled tokens."""
        return self.rollout.logprobs

    def select(self, rows: torch.Tensor) -> TokenBatch:
        """Rows `rows`, trimmed to their own longest prompt and completion."""
        part = self.rollout.select(rows)
        T = part.completion_ids.shape[1]

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows, :T]

        return TokenBatch(
            rollout=part,
            mask=pick(self.mask),
            advantages=pick(self.advantages),
            returns=pick(self.returns),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            old_values=pick(self.old_values),
        )


@dataclass
class TrainState:
    """What changes from step to step besides weights and optimizers (saved in checkpoints)."""

    step: int = 0
    """Training steps completed."""
    nonfinite_in_a_row: int = 0
    """Consecutive updates skipped for a non-finite loss or gradient."""
    pending: dict | None = None
    """Asynchronous rollouts: the queue and worker state saved with the checkpoint resumed."""
