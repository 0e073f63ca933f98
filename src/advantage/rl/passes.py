"""Step 3 of the loop: forward passes without gradient over the whole rollout, in micro-batches:
the old policy's log-probs, the reference's, the critic's values — each only when the algorithm
needs it."""

from __future__ import annotations

import torch

from ..engine.models import completion_logprobs, completion_values
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
    old = None
    if needs_old or (algo.kl_in_reward and not exact_engine):
        old = forward_no_grad(run, run.policy, rollout, "logprobs")
    ref = forward_no_grad(run, run.ref, rollout, "logprobs") if run.ref is not None else None
    values = forward_no_grad(run, run.critic, rollout, "values") if algo.uses_critic else None
    return NoGradPasses(
        old_logprobs=old,
        ref_logprobs=ref,
        old_values=values,
        behaviour_logprobs=old if old is not None and not stale else rollout.logprobs,
    )


@torch.no_grad()
def forward_no_grad(run: Run, model: torch.nn.Module, rollout: Rollout, what: str) -> torch.Tensor:
    """Log-probs (on logits / temperature) or values `[B, T]` of the whole rollout."""
    cfg = run.config
    B, T = rollout.completion_ids.shape
    size = cfg.train.micro_batch_size or B
    parts = []
    for start in range(0, B, size):
        part = rollout.select(slice(start, start + size))
        if what == "logprobs":
            out, _ = completion_logprobs(
                model, part, cfg.rollout.temperature, precision=cfg.model.precision
            )
        else:
            out = completion_values(model, part, cfg.model.precision)
        parts.append(torch.nn.functional.pad(out.float().cpu(), (0, T - out.shape[1])))
    return torch.cat(parts)
