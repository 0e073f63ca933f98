"""A scored rollout batch, and the group-level selection of dynamic sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rewards import Scores
from .rollout import Rollout


@dataclass
class RolloutBatch:
    """One scored rollout batch: B = P·G sequences, prompt-major."""

    rollout: Rollout
    rows: list[dict]
    """The P dataset rows, one per group."""
    scores: Scores
    completions: list[str]
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    tries: int = 1
    dropped_groups: int = 0


def split_constant_groups(
    batch: RolloutBatch, G: int
) -> tuple[RolloutBatch | None, RolloutBatch | None]:
    """Dynamic sampling (DAPO): (groups with at least two different scores, the other groups)."""
    present = batch.scores.score_mask.view(-1, G)
    s = batch.scores.scores.view(-1, G)
    hi = torch.where(present, s, -math.inf).amax(-1)
    lo = torch.where(present, s, math.inf).amin(-1)
    varied = (present.sum(-1) >= 2) & (hi > lo)

    def pick(groups: list[int]) -> RolloutBatch | None:
        if not groups:
            return None
        return select_batch(
            batch, groups, torch.tensor([g * G + j for g in groups for j in range(G)])
        )

    return pick(varied.nonzero().flatten().tolist()), pick((~varied).nonzero().flatten().tolist())


def select_batch(batch: RolloutBatch, groups: list[int], rows_idx: torch.Tensor) -> RolloutBatch:
    s = batch.scores
    return RolloutBatch(
        rollout=batch.rollout.select(rows_idx),
        rows=[batch.rows[g] for g in groups],
        scores=Scores(
            s.scores[rows_idx], s.score_mask[rows_idx], s.per_source[:, rows_idx], s.names
        ),
        completions=[batch.completions[i] for i in rows_idx.tolist()],
    )


def concat_batches(
    parts: list[RolloutBatch], pad_id: int, keep_groups: int, group_size: int
) -> RolloutBatch:
    if len(parts) == 1 and len(parts[0].rows) <= keep_groups:
        return parts[0]
    rollout = Rollout.concat([p.rollout for p in parts], pad_id)
    rows = [r for p in parts for r in p.rows]
    scores = Scores(
        torch.cat([p.scores.scores for p in parts]),
        torch.cat([p.scores.score_mask for p in parts]),
        torch.cat([p.scores.per_source for p in parts], dim=1),
        parts[0].scores.names,
    )
    merged = RolloutBatch(rollout, rows, scores, [c for p in parts for c in p.completions])
    if len(rows) > keep_groups:
        keep = list(range(keep_groups))
        merged = select_batch(merged, keep, torch.arange(keep_groups * group_size))
    return merged
