"""All-reduce helpers for statistics that must be global across data-parallel ranks.

When `torch.distributed` is not initialised every helper is the identity, so the same math
runs in one process and in many, and gives the same numbers (SPEC §3, seed 000).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over all ranks (returns a new tensor; `x` is left unchanged).

    This is a sync point: every rank must call it in the same order.
    """
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
