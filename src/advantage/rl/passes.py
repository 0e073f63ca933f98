"""Step 3 of the loop: forward passes without gradient over the whole rollout, in micro-batches:
the old policy's log-probs, the reference's, the critic's values — each only when the algorithm
needs it. `micro_batch_rows` is also how step 5 cuts a minibatch."""

from __future__ import annotations

import torch

from ..engine.models import completion_logprobs, completion_values
from ..engine.packing import micro_batches
from ..engine.parallel import global_max
from ..engine.rollout import Rollout
from .records import NoGradPasses
from .setup import Run


def no_grad_passes(run: Run, rollout: Rollout, stale: bool = False) -> NoGradPasses:
    """`stale`: sampled by older weights (asynchronous rollouts). Then the current weights'
    log-probs are the proximal `old_logprobs` of the ratio, and the engine's (the sampling
    version's) stay the behaviour policy: of the correction and of the KL in the reward."""
    cfg, algo = run.config, run.algo
    # KL in the reward uses the generating policy: with μ = 1 and the transformers engine in
    # fp32, its own log-probs (same weights, same arithmetic) instead of another forward pass
    exact_engine = getattr(run.backend, "exact_logprobs", False) and rollout.logprobs is not None
    needs_old = stale or algo.needs_old_logprobs(cfg.train.epochs, cfg.train.minibatches)
    old_pass = needs_old or (algo.kl_in_reward and not exact_engine)
    pieces = (
        micro_batch_rows(run, rollout, torch.arange(rollout.completion_ids.shape[0]))
        if old_pass or run.ref is not None or algo.uses_critic
        else []
    )
    old = None
    if old_pass:
        old = forward_no_grad(run, run.policy, rollout, pieces, "logprobs")
    ref = (
        forward_no_grad(run, run.ref, rollout, pieces, "logprobs") if run.ref is not None else None
    )
    values = (
        forward_no_grad(run, run.critic, rollout, pieces, "values") if algo.uses_critic else None
    )
    return NoGradPasses(
        old_logprobs=old,
        ref_logprobs=ref,
        old_values=values,
        behaviour_logprobs=old if old is not None and not stale else rollout.logprobs,
    )


@torch.no_grad()
def forward_no_grad(
    run: Run, model: torch.nn.Module, rollout: Rollout, pieces: list[torch.Tensor], what: str
) -> torch.Tensor:
    """Log-probs (on logits / temperature) or values `[B, T]` of the whole rollout, micro-batch
    by micro-batch (`pieces`: `micro_batch_rows`)."""
    cfg = run.config
    out = torch.zeros(rollout.completion_ids.shape)
    for rows in pieces:
        part = rollout.select(rows)
        if what == "logprobs":
            values, _ = completion_logprobs(
                model, part, cfg.rollout.temperature, precision=cfg.model.precision
            )
        else:
            values = completion_values(model, part, cfg.model.precision)
        out[rows, : values.shape[1]] = values.float().cpu()
    return out


def micro_batch_rows(run: Run, rollout: Rollout, rows: torch.Tensor) -> list[torch.Tensor]:
    """`rows` cut into micro-batches (`train.micro_batch_size`, `train.max_tokens_per_micro_batch`).
    Every rank runs as many as the rank with the most (FSDP2 gathers the weights in every
    forward): the largest micro-batches are halved until the counts match."""
    train = run.config.train
    pieces = micro_batches(rollout, rows, train.micro_batch_size, train.max_tokens_per_micro_batch)
    if not run.dist.enabled:
        return pieces
    target = global_max(len(pieces))
    while len(pieces) < target:  # every rank holds >= target rows: each piece keeps one
        i = max(range(len(pieces)), key=lambda i: len(pieces[i]))
        half = (len(pieces[i]) + 1) // 2
        pieces[i : i + 1] = [pieces[i][:half], pieces[i][half:]]
    return pieces
