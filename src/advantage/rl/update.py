"""Step 5 of the loop: μ epochs × minibatches × micro-batches over one rollout batch.

Every aggregation divides by the minibatch's **global** token / sequence count (all micro-batches
and ranks), so gradient accumulation and data parallelism do not change the gradient. DDP
averages gradients over ranks, so each rank's part of the loss is scaled by the world size once,
in `backward`. A non-finite loss or gradient skips the update on every rank together.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core import aggregate, policy_objective, value_loss
from ..engine.diverged import DivergedError
from ..engine.models import completion_logprobs, completion_values
from ..engine.parallel import global_sums, unwrap
from ..engine.precision import matmul_kernels
from .passes import micro_batch_rows
from .records import TokenBatch, TrainState
from .setup import Run


class NonFiniteError(DivergedError):
    """Too many consecutive updates had a non-finite loss or gradient."""


@dataclass
class MicroStep:
    """What one micro-batch's forward and backward report."""

    objective: float
    """This rank's part of the aggregated policy loss (0 if non-finite)."""
    finite: bool
    stats: dict[str, float] = field(default_factory=dict)
    """Per-token means of this micro-batch (weighted by its token count when averaged)."""


def update(run: Run, state: TrainState, tokens: TokenBatch, say: Callable[[str], None]) -> dict:
    cfg, G = run.config, run.sizes.G
    B = tokens.mask.shape[0]
    mb_size = max(1, B // cfg.train.minibatches)
    sums: dict[str, float] = defaultdict(float)
    weight, grad_norms, skipped, objective = 0.0, [], 0, 0.0
    generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + state.step)
    for _epoch in range(cfg.train.epochs):
        # shuffle whole groups (a group's rows stay together: they share a prompt)
        groups = (
            torch.randperm(B // G, generator=generator)
            if cfg.train.minibatches > 1
            else torch.arange(B // G)
        )
        order = (groups.unsqueeze(-1) * G + torch.arange(G)).flatten()
        for mb_start in range(0, B, mb_size):
            mb_rows = order[mb_start : mb_start + mb_size]
            # global denominators of the aggregation: this minibatch on every rank
            num_tokens, num_seqs = global_sums(
                [float(tokens.mask[mb_rows].sum()), float(len(mb_rows))]
            )
            zero_grad(run)
            all_finite = True
            pieces = micro_batch_rows(run, tokens.rollout, mb_rows)
            for i, rows in enumerate(pieces):
                part = tokens.select(rows)
                with gradient_sync(run, last_micro_batch=i == len(pieces) - 1):
                    step = policy_micro_step(run, part, num_tokens, num_seqs)
                    if run.critic is not None:
                        critic = critic_micro_step(run, part, num_tokens, num_seqs)
                        step.finite &= critic.finite
                        step.stats.update(critic.stats)
                all_finite &= step.finite
                objective += step.objective
                n = float(part.mask.sum())
                for k, v in step.stats.items():
                    sums[k] += v * n
                weight += n
            # every rank skips together when any rank saw a non-finite loss
            all_finite = global_sums([float(not all_finite)])[0] == 0
            grad_norm = optimizer_step(run, state, all_finite, say)
            if grad_norm is None:
                skipped += 1
            else:
                grad_norms.append(grad_norm)
    # per-token means over every rank's tokens (not the mean of each rank's mean)
    keys = sorted(sums)
    *totals, weight = global_sums([sums[k] for k in keys] + [weight])
    out = {k: v / max(weight, 1.0) for k, v in zip(keys, totals, strict=True)}
    # the aggregated loss (all micro-batches and ranks), averaged over optimizer steps
    n_updates = cfg.train.epochs * -(-B // mb_size)
    out["loss"] = global_sums([objective])[0] / n_updates
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
    out["skipped_updates"] = skipped
    return out


def policy_micro_step(run: Run, part: TokenBatch, num_tokens: float, num_seqs: float) -> MicroStep:
    """Forward, per-token policy loss (SPEC §4), aggregation with the global counts, backward."""
    cfg, algo = run.config, run.algo
    # the entropy is a metric, or a loss term with its graph when there is an entropy bonus
    logprobs, entropy = completion_logprobs(
        run.policy,
        part.rollout,
        cfg.rollout.temperature,
        precision=cfg.model.precision,
        with_entropy="grad" if algo.entropy_coef else True,
    )
    # with μ = 1 and one minibatch the weights have not moved since the rollout: ρ = 1
    old = part.old_logprobs if part.old_logprobs is not None else logprobs.detach()
    per_token, stats = policy_objective(
        logprobs,
        old,
        part.advantages,
        part.mask,
        objective=algo.loss_name,
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        dual_clip=algo.dual_clip,
        ref_logprobs=part.ref_logprobs if algo.kl_in_loss else None,
        kl_coef=run.kl_ctl.value,
        kl_estimator=algo.kl_estimator,
        entropy=entropy,
        entropy_coef=algo.entropy_coef,
        engine_logprobs=part.engine_logprobs,
        correction=algo.correction,
        correction_level=algo.correction_level,
        correction_low=algo.correction_low,
        correction_high=algo.correction_high,
    )
    loss = aggregate_global(run, per_token, part.mask, num_tokens, num_seqs)
    finite = backward(run, loss, run.policy)
    return MicroStep(
        objective=float(loss.detach()) if finite else 0.0,
        finite=finite,
        stats={k: float(v) for k, v in stats.items()},
    )


def critic_micro_step(run: Run, part: TokenBatch, num_tokens: float, num_seqs: float) -> MicroStep:
    """Forward, clipped value loss (SPEC §4) with the preset's aggregation, backward."""
    algo = run.algo
    values = completion_values(run.critic, part.rollout, run.config.model.precision)
    v_loss, stats = value_loss(values, part.old_values, part.returns, part.mask, algo.value_clip)
    loss = aggregate_global(run, v_loss, part.mask, num_tokens, num_seqs) * algo.value_coef
    finite = backward(run, loss, run.critic)
    stats = {k: float(v) for k, v in stats.items()}
    stats["loss/value"] = float(aggregate(v_loss.detach(), part.mask, "token_mean"))
    return MicroStep(objective=0.0, finite=finite, stats=stats)


def aggregate_global(
    run: Run, per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float, num_seqs: float
) -> torch.Tensor:
    """The algorithm's aggregation of this piece, over the global denominators."""
    return aggregate(
        per_token,
        mask,
        run.algo.aggregation,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        max_len=run.config.rollout.max_new_tokens,
    )


def backward(run: Run, loss: torch.Tensor, model: torch.nn.Module) -> bool:
    """Backward of this rank's part of a loss whose denominators are global. DDP averages the
    gradients over ranks, so the part is scaled by the world size here, the one place that does.
    A non-finite loss backs up a zero with a path to every parameter instead, so the rank still
    takes part in DDP's all-reduce (the update is then skipped everywhere). Returns finiteness."""
    finite = bool(torch.isfinite(loss))
    with matmul_kernels(run.config.model.precision, model=unwrap(model)):
        (loss * run.dist.world_size if finite else _zero_loss(model)).backward()
    return finite


def _zero_loss(model: torch.nn.Module) -> torch.Tensor:
    return 0.0 * sum(p.float().sum() for p in model.parameters() if p.requires_grad)


def gradient_sync(run: Run, last_micro_batch: bool) -> contextlib.ExitStack:
    """DDP: all-reduce gradients only after the last micro-batch of a minibatch."""
    stack = contextlib.ExitStack()
    if not last_micro_batch:
        for model in (run.policy, run.critic):
            if model is not None and hasattr(model, "no_sync"):
                stack.enter_context(model.no_sync())
    return stack


def zero_grad(run: Run) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    if run.critic_optimizer is not None:
        run.critic_optimizer.zero_grad(set_to_none=True)


def optimizer_step(
    run: Run, state: TrainState, losses_finite: bool, say: Callable[[str], None]
) -> float | None:
    """Clip and step; or, with a non-finite loss or gradient, skip, count, and stop after
    `train.max_nonfinite_steps` in a row. Returns the policy's gradient norm (None if skipped)."""
    cfg = run.config
    max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), max_norm)
    finite = losses_finite and bool(torch.isfinite(grad_norm))
    if run.critic is not None:
        critic_norm = torch.nn.utils.clip_grad_norm_(run.critic.parameters(), max_norm)
        finite &= bool(torch.isfinite(critic_norm))
    if not finite:
        state.nonfinite_in_a_row += 1
        say(
            f"step {state.step + 1}: non-finite loss or gradient (grad norm {float(grad_norm)}); "
            f"update skipped ({state.nonfinite_in_a_row} in a row)"
        )
        zero_grad(run)
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{state.nonfinite_in_a_row} consecutive updates had a non-finite loss or "
                "gradient; stopping. Lower train.lr, check the rewards, or raise "
                "train.max_nonfinite_steps"
            )
        return None
    state.nonfinite_in_a_row = 0
    run.optimizer.step()
    if run.critic_optimizer is not None:
        run.critic_optimizer.step()
    return float(grad_norm)
