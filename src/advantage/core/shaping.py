"""Score shaping before the advantages (SPEC §4 "overlong penalty")."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv:2503.14476 eq. 13), per sequence:

        R(n) = 0                          n ≤ L_max - L_cache
             = ((L_max - L_cache) - n) / L_cache    L_max - L_cache < n ≤ L_max
             = -1                         n > L_max

    lengths `[B]` (completion tokens), `max_len` = L_max, `buffer` = L_cache > 0 (tokens; a
    float is allowed, e.g. a fraction of the budget) → `[B]` float32, added to the score.
    """
    start = max_len - buffer
    n = lengths.float()
    ramp = (start - n) / buffer
    return torch.where(n <= start, 0.0, torch.where(n <= max_len, ramp, -1.0))
