"""The one training loop every preset runs (SPEC §1–§5).

    for each step:
      1. rollout    P prompts × G completions (dynamic sampling refills zero-variance groups)
      2. score      reward functions / reward model → s_i
      3. log-probs  old policy (only when μ > 1 or several minibatches), reference (β > 0), critic
      4. advantages baseline × scope × KL placement (advantage.core.compute_advantages)
      5. update     μ epochs × minibatches × micro-batches: clipped policy loss (+ KL, entropy),
                    aggregated with global counts; critic loss
      6. log        metrics, KL controller, reference sync, evaluation, checkpoint

Setup lives in small functions below the loop; the math lives in `advantage.core`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .batch import RolloutBatch, concat_batches, split_constant_groups
from .config import Config, config_from
from .configlib import ConfigError
from .core import (
    KL_CONTROLLERS,
    AdvantageInputs,
    aggregate,
    compute_advantages,
    kl_penalty,
    make_baseline,
    policy_objective,
    value_loss,
)
from .data import PromptStream, check_rows, encode_prompt, load_rows
from .evaluation import evaluate
from .logger import MetricsLogger
from .models import (
    AdapterDisabled,
    add_lora,
    completion_logprobs,
    completion_values,
    count_parameters,
    frozen_copy,
    load_causal_lm,
    load_critic,
    load_tokenizer,
    quiet_transformers,
    resolve_model_path,
    sync_reference,
)
from .parallel import (
    DistInfo,
    all_reduce_sum,
    average_metrics,
    barrier,
    init_distributed,
    is_fsdp,
    unwrap,
    wrap_model,
)
from .precision import log_bf16_kernels, matmul_kernels, set_bf16_matmul
from .rewards import RewardComputer, load_function, score_rollout
from .rollout import Rollout, SamplingParams
from .setup import (
    eval_rows,
    make_backend,
    make_optimizer,
    make_reward_computer,
    task_reward,
)


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    seconds: float = 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, config: Config, reward_funcs: list[Callable] | None = None) -> None:
        self.config = cfg = config
        self.algo = cfg.algorithm_spec()
        quiet_transformers()
        set_bf16_matmul(cfg.model.bf16_matmul)
        log_bf16_kernels(cfg.model.precision)
        self.dist: DistInfo = init_distributed(cfg.distributed.backend)
        if cfg.rollout.prompts_per_step % self.dist.world_size:
            raise ConfigError(
                f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of "
                f"the number of processes ({self.dist.world_size}): each rank takes whole groups"
            )
        set_seed(cfg.train.seed + self.dist.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.log.run_dir)
        # data first: a bad dataset fails before any model is loaded
        self.train_rows = load_rows(cfg.data.train, "data.train")
        check_rows(self.train_rows, cfg.data.prompt_field, "data.train")
        self.eval_rows = eval_rows(cfg)[: cfg.eval.size]
        self.prompts = PromptStream(self.train_rows, cfg.train.seed, cfg.data.shuffle)
        self.rewards = make_reward_computer(cfg, reward_funcs)
        self.rewards.check_columns(set(self.train_rows[0]) - {cfg.data.prompt_field})
        self.eval_rewards = self.rewards
        if cfg.eval.functions:
            judge = task_reward(cfg)
            self.eval_rewards = RewardComputer(
                [load_function(spec, judge) for spec in cfg.eval.functions],
                "sum_then_normalize",
                None,
                cfg.reward.timeout,
            )
        # models
        policy_path = resolve_model_path(cfg.model.name_or_path)
        self.tokenizer = load_tokenizer(
            cfg.model.tokenizer or policy_path, cfg.model.trust_remote_code
        )
        self.policy = load_causal_lm(policy_path, cfg.model.trust_remote_code)
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.ref = None
        if cfg.model.lora is not None:
            self.policy = add_lora(self.policy, cfg.model.lora)
            if self.algo.uses_reference:
                self.ref = AdapterDisabled(self.policy)
        elif self.algo.uses_reference:
            self.ref = frozen_copy(self.policy)
        self.critic = None
        if self.algo.uses_critic:
            critic_path = (
                resolve_model_path(cfg.model.critic, "model.critic")
                if cfg.model.critic
                else policy_path
            )
            self.critic = load_critic(critic_path, cfg.model.trust_remote_code)
        # data parallel (DDP) or sharded (FSDP2) before the optimizers see the parameters
        strategy = cfg.distributed.strategy
        self.policy = wrap_model(self.policy, strategy, self.dist)
        if self.ref is not None and not isinstance(self.ref, AdapterDisabled):
            self.ref = wrap_model(self.ref, strategy, self.dist, trainable=False)
        if self.critic is not None:
            self.critic = wrap_model(self.critic, strategy, self.dist)
        self.optimizer, self.scheduler = make_optimizer(self.policy, cfg, cfg.train.lr)
        self.critic_optimizer = self.critic_scheduler = None
        if self.critic is not None:
            self.critic_optimizer, self.critic_scheduler = make_optimizer(
                self.critic, cfg, cfg.train.critic_lr
            )
        self.backend = make_backend(cfg, self.policy, self.tokenizer, policy_path)
        # the stateful parts of the algorithm
        self.baseline = make_baseline(self.algo.baseline, ema_alpha=self.algo.ema_alpha)
        self.kl_ctl = KL_CONTROLLERS[self.algo.kl_controller](
            self.algo.kl_coef, self.algo.kl_target, self.algo.kl_horizon
        )
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.resumed_from = self._maybe_resume()
        self.logger = MetricsLogger(
            self.run_dir, cfg.train.steps, cfg.log.tensorboard, cfg.log.wandb,
            cfg.log.progress, config=_plain(cfg), enabled=self.dist.is_main,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> RunResult:
        cfg = self.config
        result = RunResult(run_dir=self.run_dir)
        start = time.perf_counter()
        self.logger.print(self.algo.card())
        if self.resumed_from is not None:
            self.logger.print(f"resumed from {self.resumed_from} (step {self.step})")
        self.logger.print(
            f"policy {count_parameters(self.policy) / 1e6:.2f}M params; "
            f"reference {'yes' if self.ref is not None else 'no'}; "
            f"critic {'yes' if self.critic is not None else 'no'}; "
            f"B = {cfg.rollout.prompts_per_step} prompts × {cfg.rollout.num_generations} completions"
        )
        if self.eval_rows and self.step == 0:
            result.eval_before = self.evaluate()
            self.logger.print(_eval_line("before RL", result.eval_before))
            self.logger.log(0, result.eval_before)
        self.logger.start(self.step)
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                self.step += 1
                if (
                    cfg.eval.every
                    and self.step % cfg.eval.every == 0
                    and self.step < cfg.train.steps
                    and self.eval_rows
                ):
                    metrics.update(self.evaluate())
                if self.step % cfg.log.every == 0 or self.step == cfg.train.steps:
                    self.logger.log(self.step, metrics)
                result.metrics.append(metrics)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
        finally:
            self.logger.close()
        if not cfg.checkpoint.every or self.step % cfg.checkpoint.every:
            self.save_checkpoint()
        if self.eval_rows:
            result.eval_after = self.evaluate()
            self.logger.log(self.step, result.eval_after)
            self.logger.print(_eval_line("after RL", result.eval_after))
        if cfg.checkpoint.save_final:
            self.save_final()
        if cfg.log.report and self.dist.is_main:
            from .report import make_report

            page = make_report(self.run_dir)
            self.logger.print(f"report: {page}")
        result.seconds = time.perf_counter() - start
        return result

    def train_step(self) -> dict:
        cfg, algo = self.config, self.algo
        t_step = time.perf_counter()
        metrics: dict[str, float] = {}

        # 1–2. rollout and score (dynamic sampling drops groups whose rewards are all equal)
        batch = self.rollout_and_score()
        rollout = batch.rollout
        B, G = rollout.completion_ids.shape[0], cfg.rollout.num_generations
        mask = rollout.completion_mask.clone()
        if cfg.rollout.mask_truncated:
            mask &= ~rollout.truncated.unsqueeze(-1)

        # 3. log-probs under the old policy, the reference and the critic (no gradient)
        t_train = time.perf_counter()
        needs_old = cfg.train.epochs > 1 or cfg.train.minibatches > 1
        kl_in_reward = algo.kl_placement == "reward" and self.kl_ctl.value > 0
        old_logprobs = None
        exact_engine = (
            getattr(self.backend, "exact_logprobs", False) and rollout.logprobs is not None
        )
        if needs_old or (kl_in_reward and not exact_engine):
            old_logprobs = self._no_grad_forward(self.policy, rollout, "logprobs")
        ref_logprobs = (
            self._no_grad_forward(self.ref, rollout, "logprobs") if self.ref is not None else None
        )
        old_values = (
            self._no_grad_forward(self.critic, rollout, "values")
            if self.critic is not None
            else None
        )
        # KL in the reward uses the generating policy: with μ = 1 and the transformers engine in
        # fp32, its log-probs (same weights, same arithmetic) instead of another forward pass
        reward_kl_logprobs = old_logprobs if old_logprobs is not None else rollout.logprobs

        # 4. advantages
        adv = compute_advantages(
            AdvantageInputs(
                scores=batch.scores.scores,
                mask=mask,
                group_size=G,
                score_mask=batch.scores.score_mask,
                old_logprobs=reward_kl_logprobs,
                ref_logprobs=ref_logprobs,
                values=old_values,
            ),
            algo,
            self.baseline,
            kl_coef=self.kl_ctl.value,
        )
        tokens = {
            "mask": adv.mask,
            "advantages": adv.advantages,
            "returns": adv.returns,
            "old_logprobs": old_logprobs,
            "ref_logprobs": ref_logprobs,
            "old_values": old_values,
            "engine_logprobs": rollout.logprobs,
        }

        # 5. update: μ epochs × minibatches × micro-batches
        t_update = time.perf_counter()
        update = self.update(rollout, tokens)
        train_seconds = time.perf_counter() - t_train

        # 6. bookkeeping: KL controller, reference sync, schedulers, metrics
        kl_metrics = {}
        if ref_logprobs is not None and reward_kl_logprobs is not None:
            kl_tokens = torch.where(
                rollout.completion_mask,
                kl_penalty(reward_kl_logprobs, ref_logprobs, algo.kl_estimator),
                0.0,
            )
            kl_sum, n_tok = all_reduce_sum(
                [float(kl_tokens.sum()), float(rollout.completion_mask.sum())]
            )
            kl_metrics["kl"] = kl_sum / max(n_tok, 1.0)  # per token
            n_seq = B * self.dist.world_size
            self.kl_ctl.update(kl_sum / n_seq, n_seq)  # Ziegler et al.: KL per sequence
        if (
            self.ref is not None
            and cfg.model.ref_sync_steps
            and (self.step + 1) % cfg.model.ref_sync_steps == 0
        ):
            sync_reference(self.ref, self.policy, cfg.model.ref_sync_alpha)
        self.backend.sync_weights(self.policy)
        self.scheduler.step()
        if self.critic_scheduler is not None:
            self.critic_scheduler.step()

        lengths = rollout.completion_lengths.float()
        n_tokens = float(rollout.completion_mask.sum())
        scored = batch.scores.scores[batch.scores.score_mask]
        metrics.update({
            "reward/mean": float(scored.mean()) if scored.numel() else float("nan"),
            "reward/std": float(scored.std()) if scored.numel() > 1 else 0.0,
            "reward/unscored_frac": float((~batch.scores.score_mask).float().mean()),
            "completion/length": float(lengths.mean()),
            "completion/clipped_ratio": float(rollout.truncated.float().mean()),
            "kl_coef": self.kl_ctl.value,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time/rollout": batch.rollout_seconds,
            "time/reward": batch.reward_seconds,
            "time/logprobs": t_update - t_train,
            "time/update": train_seconds - (t_update - t_train),
            "time/train": train_seconds,
            "time/step": time.perf_counter() - t_step,
            "tokens_per_s/rollout": n_tokens / max(batch.rollout_seconds, 1e-9),
            "tokens_per_s/train": float(rollout.attention_mask.sum()) / max(train_seconds, 1e-9),
        })  # fmt: skip
        for name, values in zip(batch.scores.names, batch.scores.per_source, strict=True):
            present = values[~torch.isnan(values)]
            metrics[f"reward/{name}"] = float(present.mean()) if present.numel() else float("nan")
        metrics.update({k: float(v) for k, v in adv.metrics.items()})
        metrics.update(kl_metrics)
        if cfg.rollout.dynamic_sampling:
            metrics["dynamic_sampling/tries"] = batch.tries
            metrics["dynamic_sampling/dropped_groups"] = batch.dropped_groups
        metrics.update(update)
        if self.dist.is_main and cfg.log.samples:
            self.logger.log_samples(self.step + 1, [
                {"prompt": str(batch.rows[i // G][cfg.data.prompt_field]), "completion": batch.completions[i],
                 "reward": float(batch.scores.scores[i])}
                for i in range(0, B, max(1, B // cfg.log.samples))
            ][: cfg.log.samples])  # fmt: skip
        return average_metrics(metrics)

    # ------------------------------------------------------------------------------------------
    # steps 1–2: rollout and score

    def rollout_and_score(self) -> RolloutBatch:
        """This rank's P/world prompts × G completions, scored. Under dynamic sampling, groups
        whose scores are all equal are set aside and new prompts drawn (every rank keeps drawing
        while any rank is short, so ranks stay in lockstep); a batch still short after
        `max_sampling_tries` is filled up with set-aside groups, so its size never changes."""
        cfg = self.config
        G = cfg.rollout.num_generations
        P = cfg.rollout.prompts_per_step
        P_local, rank = P // self.dist.world_size, self.dist.rank
        params = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=list(cfg.rollout.stop),
            ignore_eos=cfg.rollout.ignore_eos,
        )  # fmt: skip
        kept: list[RolloutBatch] = []
        reserve: list[RolloutBatch] = []
        n_groups, tries, dropped, seconds, reward_seconds = 0, 0, 0, 0.0, 0.0
        max_tries = cfg.rollout.max_sampling_tries if cfg.rollout.dynamic_sampling else 1
        while tries < max_tries:
            short = all_reduce_sum([float(n_groups < P_local)])[0]
            if not short:
                break
            tries += 1
            rows = self.prompts.take(P)[rank * P_local : (rank + 1) * P_local]
            t0 = time.perf_counter()
            prompt_ids = [
                encode_prompt(self.tokenizer, r[cfg.data.prompt_field], cfg.data.system_prompt,
                              cfg.data.max_prompt_tokens)
                for r in rows
            ]  # fmt: skip
            rollout = self.backend.generate(prompt_ids, G, params)
            seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            part = self._score(rollout, rows)
            reward_seconds += time.perf_counter() - t0
            if cfg.rollout.dynamic_sampling:
                part, constant = split_constant_groups(part, G)
                if constant is not None:
                    dropped += len(constant.rows)
                    reserve.append(constant)
            if part is not None:
                kept.append(part)
                n_groups += len(part.rows)
        parts = kept + reserve  # set-aside groups only fill what is missing
        batch = concat_batches(
            parts, self.tokenizer.pad_token_id, keep_groups=P_local, group_size=G
        )
        batch.rollout_seconds, batch.reward_seconds = seconds, reward_seconds
        batch.tries, batch.dropped_groups = tries, dropped
        return batch

    def _score(self, rollout: Rollout, rows: list[dict]) -> RolloutBatch:
        cfg = self.config
        scores, texts = score_rollout(
            self.rewards,
            self.tokenizer,
            rollout,
            rows,
            cfg.data.prompt_field,
            cfg.rollout.num_generations,
        )
        if cfg.reward.missing_eos_penalty:  # completions that never ended
            scores.scores = (
                scores.scores - cfg.reward.missing_eos_penalty * rollout.truncated.float()
            )
        return RolloutBatch(rollout=rollout, rows=rows, scores=scores, completions=texts)

    # ------------------------------------------------------------------------------------------
    # step 3: forward passes without gradient

    @torch.no_grad()
    def _no_grad_forward(self, model: torch.nn.Module, rollout: Rollout, what: str) -> torch.Tensor:
        """Log-probs or values `[B, Tc]` of the whole rollout, in micro-batches."""
        cfg = self.config
        B = rollout.completion_ids.shape[0]
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
            parts.append(
                torch.nn.functional.pad(
                    out.float().cpu(), (0, rollout.completion_ids.shape[1] - out.shape[1])
                )
            )
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------
    # step 5: the update

    def update(self, rollout: Rollout, tokens: dict[str, torch.Tensor | None]) -> dict[str, float]:
        cfg = self.config
        B = rollout.completion_ids.shape[0]
        mb_size = max(1, B // cfg.train.minibatches)
        micro = cfg.train.micro_batch_size or mb_size
        sums: dict[str, float] = defaultdict(float)
        weight, grad_norms, skipped, objective = 0.0, [], 0, 0.0
        G = cfg.rollout.num_generations
        generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + self.step)
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
                num_tokens, num_seqs = all_reduce_sum(
                    [float(tokens["mask"][mb_rows].sum()), float(len(mb_rows))]
                )
                self._zero_grad()
                all_finite = True
                for micro_start in range(0, len(mb_rows), micro):
                    rows = mb_rows[micro_start : micro_start + micro]
                    part = rollout.select(rows)
                    Tc = part.completion_ids.shape[1]
                    t = {k: (None if v is None else v[rows, :Tc]) for k, v in tokens.items()}
                    last = micro_start + micro >= len(mb_rows)
                    with self._gradient_sync(last):
                        stats, finite = self._micro_step(part, t, num_tokens, num_seqs)
                    all_finite &= finite
                    objective += stats.pop("_objective")
                    n = float(t["mask"].sum())
                    for k, v in stats.items():
                        sums[k] += v * n
                    weight += n
                # every rank skips together when any rank saw a non-finite loss
                all_finite = all_reduce_sum([float(not all_finite)])[0] == 0
                grad_norm = self._optimizer_step(all_finite)
                if grad_norm is None:
                    skipped += 1
                else:
                    grad_norms.append(grad_norm)
        out = {k: v / max(weight, 1.0) for k, v in sums.items()}
        # the aggregated loss (all micro-batches and ranks), averaged over optimizer steps
        n_updates = cfg.train.epochs * -(-B // mb_size)
        out["loss"] = all_reduce_sum([objective])[0] / n_updates
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        out["skipped_updates"] = skipped
        return out

    def _micro_step(
        self, part: Rollout, t: dict, num_tokens: float, num_seqs: float
    ) -> tuple[dict, bool]:
        """Forward, per-token losses, aggregation with the global counts, backward."""
        cfg, algo = self.config, self.algo
        world = self.dist.world_size
        mask = t["mask"]
        # the entropy is a metric, or a loss term with its graph when there is an entropy bonus
        logprobs, entropy = completion_logprobs(
            self.policy, part, cfg.rollout.temperature, precision=cfg.model.precision,
            with_entropy="grad" if algo.entropy_coef else True,
        )  # fmt: skip
        # with μ = 1 and one minibatch the weights have not moved since the rollout: ρ = 1
        old = t["old_logprobs"] if t["old_logprobs"] is not None else logprobs.detach()
        kl_in_loss = algo.kl_placement == "loss"
        per_token, stats = policy_objective(
            logprobs, old, t["advantages"], mask,
            clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
            ref_logprobs=t["ref_logprobs"] if kl_in_loss else None, kl_coef=self.kl_ctl.value,
            kl_estimator=algo.kl_estimator, entropy=entropy, entropy_coef=algo.entropy_coef,
            engine_logprobs=t["engine_logprobs"], tis_cap=cfg.rollout.tis_cap,
        )  # fmt: skip
        agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_len=cfg.rollout.max_new_tokens)
        loss = aggregate(per_token, mask, algo.aggregation, **agg)
        finite = bool(torch.isfinite(loss))
        # DDP averages gradients over ranks; the global denominators already account for them
        with matmul_kernels(cfg.model.precision):
            (loss * world if finite else _zero_loss(self.policy)).backward()
        out = {k: float(v) for k, v in stats.items()}
        out["_objective"] = float(loss.detach()) if finite else 0.0  # this rank's part of the loss
        if self.critic is not None:
            values = completion_values(self.critic, part, cfg.model.precision)
            v_loss, v_stats = value_loss(
                values, t["old_values"], t["returns"], mask, algo.value_clip
            )
            v_total = aggregate(v_loss, mask, algo.aggregation, **agg) * algo.value_coef * world
            v_finite = bool(torch.isfinite(v_total))
            with matmul_kernels(cfg.model.precision):
                (v_total if v_finite else _zero_loss(self.critic)).backward()
            finite &= v_finite
            out["loss/value"] = float(aggregate(v_loss.detach(), mask, "token_mean"))
            out.update({k: float(v) for k, v in v_stats.items()})
        return out, finite

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP: all-reduce gradients only after the last micro-batch of a minibatch."""
        stack = contextlib.ExitStack()
        if not last_micro_batch:
            for model in (self.policy, self.critic):
                if model is not None and hasattr(model, "no_sync"):
                    stack.enter_context(model.no_sync())
        return stack

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, losses_finite: bool) -> float | None:
        """Clip and step; or, with a non-finite loss or gradient, skip, count, and stop after
        `train.max_nonfinite_steps` in a row. Returns the policy's gradient norm (None if skipped)."""
        cfg = self.config
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        finite = losses_finite and bool(torch.isfinite(grad_norm))
        if self.critic is not None:
            finite &= bool(
                torch.isfinite(torch.nn.utils.clip_grad_norm_(self.critic.parameters(), max_norm))
            )
        if not finite:
            self.nonfinite_in_a_row += 1
            self.logger.print(
                f"step {self.step + 1}: non-finite loss or gradient (grad norm {float(grad_norm)}); "
                f"update skipped ({self.nonfinite_in_a_row} in a row)"
            )
            self._zero_grad()
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} consecutive updates had a non-finite loss or "
                    "gradient; stopping. Lower train.lr, check the rewards, or raise "
                    "train.max_nonfinite_steps"
                )
            return None
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        if self.critic_optimizer is not None:
            self.critic_optimizer.step()
        return float(grad_norm)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def _checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"policy": unwrap(self.policy)}
        if self.critic is not None:
            modules["critic"] = unwrap(self.critic)
        # a frozen reference is rebuilt from the policy path; a synced one is saved
        if self.ref is not None and self.config.model.ref_sync_steps:
            modules["reference"] = unwrap(self.ref)
        return modules

    def _optimizers(self) -> dict:
        out = {"policy_optimizer": self.optimizer, "policy_scheduler": self.scheduler}
        if self.critic_optimizer is not None:
            out.update(
                critic_optimizer=self.critic_optimizer, critic_scheduler=self.critic_scheduler
            )
        return out

    def save_checkpoint(self) -> Path:
        """Every rank calls this (FSDP2 writes shards from every rank)."""
        state = {
            "step": self.step,
            "world_size": self.dist.world_size,
            "data": self.prompts.state_dict(),
            "baseline": self.baseline.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "reward_sources": {
                s.name: s.fn.state_dict()
                for s in self.rewards.sources
                if hasattr(s.fn, "state_dict")
            },
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "config": _plain(self.config),
        }
        return ckpt.save_checkpoint(
            self.run_dir, self.step, self._checkpoint_modules(), self._optimizers(), state,
            self.config.checkpoint.keep, rank=self.dist.rank, sharded=is_fsdp(self.policy),
        )  # fmt: skip

    def _maybe_resume(self) -> Path | None:
        """Find the checkpoint to resume from (`checkpoint.resume`) and load it."""
        resume = self.config.checkpoint.resume
        existing = ckpt.latest_checkpoint(self.run_dir)
        if resume == "none":
            if existing is not None:
                raise ConfigError(
                    f"log.run_dir {str(self.run_dir)!r} already holds checkpoints ({existing.name}); "
                    "set checkpoint.resume=auto to continue that run, or choose a new log.run_dir "
                    "(nothing is overwritten)"
                )
            return None
        path = existing if resume == "auto" else Path(resume)
        if path is None:
            return None
        try:
            state = ckpt.load_checkpoint(
                path, self._checkpoint_modules(), self._optimizers(), rank=self.dist.rank
            )
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        self.step = int(state["step"])
        self.prompts.load_state_dict(state["data"])
        self.baseline.load_state_dict(state["baseline"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        for source in self.rewards.sources:
            if hasattr(source.fn, "load_state_dict"):
                source.fn.load_state_dict(state.get("reward_sources", {}).get(source.name, {}))
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        if self.dist.is_main:
            _truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
            _truncate_jsonl(self.run_dir / "samples.jsonl", self.step)
        return path

    def save_final(self) -> Path:
        """The policy as a plain Hugging Face folder (`RUN_DIR/final`); every rank calls this."""
        final = self.run_dir / "final"
        model = unwrap(self.policy)
        if is_fsdp(self.policy):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = get_model_state_dict(
                self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            if self.dist.is_main:
                model.save_pretrained(final, state_dict=full)
        elif self.dist.is_main:
            model.save_pretrained(final)  # a LoRA policy writes its adapter
            if hasattr(model, "merge_and_unload"):
                merged = self.run_dir / "final-merged"
                _merged_copy(model).save_pretrained(merged)
                self.tokenizer.save_pretrained(merged)
        if self.dist.is_main:
            self.tokenizer.save_pretrained(final)
        barrier()
        return final

    # ------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics; runs on a forked RNG so evaluating never changes training."""
        cfg = self.config
        rows = self.eval_rows[: cfg.eval.size]
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(rows)

    def _evaluate(self, rows: list[dict]) -> dict[str, float]:
        cfg = self.config
        return evaluate(
            self.backend, self.tokenizer, rows, self.eval_rewards, prompt_field=cfg.data.prompt_field,
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            pass_k=cfg.eval.pass_k, threshold=cfg.eval.correct_threshold,
            temperature=cfg.rollout.temperature, system_prompt=cfg.data.system_prompt,
            seed=cfg.train.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            reduce=all_reduce_sum,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# setup helpers


def _merged_copy(peft_model: torch.nn.Module) -> torch.nn.Module:
    """A full model with the adapters merged in (the training model is left untouched)."""
    import copy

    return copy.deepcopy(peft_model).merge_and_unload()


def _zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """0 with a gradient path to every trainable parameter: a rank with a non-finite loss still
    takes part in DDP's gradient all-reduce (its update is then skipped everywhere)."""
    return 0.0 * sum(p.float().sum() for p in model.parameters() if p.requires_grad)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (steps that the resumed run will redo); atomic."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["step"] <= last_step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _plain(cfg: Config) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def _eval_line(label: str, metrics: dict) -> str:
    return f"{label}: " + "  ".join(
        f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items()
    )


def train(config: Config | dict | str | Path | None = None, reward_funcs: list[Callable] | None = None,
          overrides: list[str] | None = None) -> RunResult:  # fmt: skip
    """Train with `config` (a Config, a dict, or a YAML path) and optional `key=value` overrides.

    `reward_funcs`: TRL-style reward functions to use instead of `reward.functions`.
    """
    return Trainer(config_from(config, overrides), reward_funcs).fit()
