"""One training step, top to bottom in the numbered steps of SPEC §1–§5:

1–2. rollout and score    P prompts × G completions, scored (dynamic sampling refills)
3.   no-gradient passes   old policy, reference, critic (each only when needed)
4.   advantages           baseline × scope × KL placement (`advantage.core.compute_advantages`)
5.   update               μ epochs × minibatches × micro-batches
6.   bookkeeping          KL controller, reference sync, engine weights, schedules, metrics
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..core import AdvantageInputs, compute_advantages
from ..core.kl import sequence_kl
from ..engine.episode_metrics import episode_metrics
from ..engine.models import sync_reference
from ..engine.parallel import average_metrics, global_mean, global_mean_std, global_sums
from .passes import no_grad_passes
from .records import NoGradPasses, ScoredRollout, TokenBatch, TrainState
from .sampling import rollout_and_score
from .setup import Run
from .update import update


def train_step(
    run: Run, state: TrainState, say: Callable[[str], None], batch: ScoredRollout | None = None
) -> tuple[dict[str, float], ScoredRollout]:
    """One step on this rank's share of the batch: (the step's metrics, averaged over ranks;
    this rank's scored rollout). `batch`: one sampled already (asynchronous rollouts)."""
    cfg, algo = run.config, run.algo
    t_step = time.perf_counter()
    # 1–2. rollout and score
    batch = batch if batch is not None else rollout_and_score(run)
    stale = batch.version is not None and batch.version < state.step
    rollout = batch.rollout
    # the sequences that count (scored; not truncated under mask_truncated), and their tokens:
    # the model's (environment tokens are not actions)
    counted = batch.scores.score_mask.clone()
    if cfg.rollout.mask_truncated:
        counted &= ~rollout.truncated
    mask = rollout.model_mask & counted.unsqueeze(-1)
    # 3. old policy, reference, critic: no gradient
    t_train = time.perf_counter()
    passes = no_grad_passes(run, rollout, stale)
    # 4. advantages
    adv = compute_advantages(
        AdvantageInputs(
            scores=batch.scores.scores,
            mask=mask,
            group_size=run.sizes.G,
            score_mask=batch.scores.score_mask,
            old_logprobs=passes.behaviour_logprobs,
            ref_logprobs=passes.ref_logprobs,
            values=passes.old_values,
            turn_rewards=rollout.turn_rewards,
        ),
        algo,
        run.baseline,
        kl_coef=run.kl_ctl.value,
    )
    tokens = TokenBatch(
        rollout=rollout,
        mask=adv.mask,
        advantages=adv.advantages,
        returns=adv.returns,
        old_logprobs=passes.old_logprobs,
        ref_logprobs=passes.ref_logprobs,
        old_values=passes.old_values,
    )
    # 5. update
    t_update = time.perf_counter()
    update_metrics = update(run, state, tokens, say)
    train_seconds = time.perf_counter() - t_train
    # 6. bookkeeping: KL controller, reference sync, engine weights, schedules; metrics
    # the β and learning rate this step used: the controller and the schedule move on below
    used = {"kl_coef": run.kl_ctl.value, "lr": run.optimizer.param_groups[0]["lr"]}
    kl_metrics = control_kl(run, passes, tokens.mask, counted)
    after_update(run, state)
    times = {
        "time/rollout": batch.rollout_seconds,
        "time/reward": batch.reward_seconds,
        "time/logprobs": t_update - t_train,
        "time/update": train_seconds - (t_update - t_train),
        "time/train": train_seconds,
        "time/step": time.perf_counter() - t_step,
    }
    metrics = step_metrics(run, batch, {**used, **times})
    metrics.update({k: float(v) for k, v in adv.metrics.items()})
    metrics.update(kl_metrics)
    metrics.update(update_metrics)
    return average_metrics(metrics), batch


def after_update(run: Run, state: TrainState) -> None:
    """What follows every update: the reference moves towards the policy every
    `model.ref_sync_steps` (seed 003), the engine takes the new weights, the schedules step."""
    cfg = run.config
    sync_every = cfg.model.ref_sync_steps
    if run.ref is not None and sync_every and (state.step + 1) % sync_every == 0:
        sync_reference(run.ref, run.policy, cfg.model.ref_sync_alpha)
    run.backend.sync_weights(run.policy)
    run.scheduler.step()
    if run.critic_scheduler is not None:
        run.critic_scheduler.step()


def control_kl(
    run: Run, passes: NoGradPasses, mask: torch.Tensor, counted: torch.Tensor
) -> dict[str, float]:
    """The KL of the generating policy to the reference over the global batch: the `kl` metric
    (per token) and the adaptive controller's input (per sequence, Ziegler et al. 2019), over
    the sequences that count (`counted` `[B]`: scored, and not truncated under
    `rollout.mask_truncated`) and their tokens (`mask` `[B, T]`), as every other statistic."""
    if passes.ref_logprobs is None or passes.behaviour_logprobs is None:
        return {}
    per_token, _per_seq = sequence_kl(
        passes.behaviour_logprobs, passes.ref_logprobs, mask, run.algo.kl_estimator
    )
    kl_sum, n_tokens, n_seqs = global_sums(
        [float(per_token.sum()), float(mask.sum()), float(counted.sum())]
    )
    if n_seqs:  # the mean over sequences of their summed KL
        run.kl_ctl.update(kl_sum / n_seqs, n_seqs)
    return {"kl": kl_sum / max(n_tokens, 1.0)}


def step_metrics(run: Run, batch: ScoredRollout, known: dict[str, float]) -> dict[str, float]:
    """Rewards (over every rank's samples), lengths and throughput of this rank's batch, with
    `known` (the step's times, and the β and learning rate it used) (SPEC §5)."""
    rollout, scores = batch.rollout, batch.scores
    lengths = rollout.completion_lengths.float()
    n_tokens = float(rollout.model_mask.sum())
    mean, std = global_mean_std(scores.scores[scores.score_mask])
    metrics = {
        "reward/mean": mean,
        "reward/std": std,
        "reward/unscored_frac": float((~scores.score_mask).float().mean()),
        "completion/length": float(lengths.mean()),
        "completion/clipped_ratio": float(rollout.truncated.float().mean()),
        **known,
        "tokens_per_s/rollout": n_tokens / max(batch.rollout_seconds, 1e-9),
        "tokens_per_s/train": float(rollout.attention_mask.sum()) / max(known["time/train"], 1e-9),
    }
    for name, values, present in zip(
        scores.names, scores.per_source, scores.per_source_mask, strict=True
    ):
        metrics[f"reward/{name}"] = global_mean(values[present])
    if batch.conversations is not None:
        metrics.update(episode_metrics(rollout, batch.conversations))
    if run.algo.dynamic_sampling:
        metrics["dynamic_sampling/tries"] = batch.tries
        metrics["dynamic_sampling/dropped_groups"] = batch.dropped_groups
    return metrics


def sample_records(run: Run, batch: ScoredRollout, n: int) -> list[dict]:
    """Up to `n` completions of the batch, spread over its groups, for `samples.jsonl`."""
    B, G = len(batch.completions), run.sizes.G
    field = run.config.data.prompt_field
    records = []
    for i in range(0, B, max(1, B // n))[:n]:
        record = {
            "prompt": str(batch.rows[i // G][field]),
            "completion": batch.completions[i],
            # None: no reward source scored it (out of every statistic)
            "reward": float(batch.scores.scores[i]) if batch.scores.score_mask[i] else None,
        }
        if batch.conversations is not None:  # an episode, turn by turn
            record["conversation"] = batch.conversations[i]
        records.append(record)
    return records
