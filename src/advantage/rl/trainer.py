"""The one training loop every preset runs (SPEC §1–§5).

    setup     `build_run`: one `Run` record (models, optimizers, engine, resolved Algorithm, sizes)
    resume    lock the run directory; the newest complete checkpoint, if any
    for each step:
      `train_step` (step.py): 1 rollout · 2 score · 3 no-grad passes · 4 advantages · 5 update ·
                              6 bookkeeping
      log, evaluate every `eval.every`, checkpoint every `checkpoint.every`
      on SIGINT / SIGTERM: checkpoint at the step boundary and stop (`TrainingStopped`)
    evaluate, save the final policy, write the report

The math lives in `advantage.core`; models, data, rewards and engines in `advantage.engine`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.checkpoint import finished_step, mark_finished
from ..engine.configlib import ConfigError
from ..engine.evaluation import evaluate
from ..engine.logger import MetricsLogger
from ..engine.models import count_parameters
from ..engine.parallel import global_sums
from ..engine.report import logged_evaluations, make_report
from ..engine.runlock import RunDirLock
from ..tasks import require_data
from . import checkpointing, resuming
from .async_rollout import AsyncRollouts, check_async
from .config import Config, config_from
from .records import ScoredRollout, TrainState
from .sampling import rollout_and_score
from .setup import Run, build_run
from .step import sample_records, train_step
from .stopping import StopSignals, TrainingStopped
from .update import NonFiniteError


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)
    """The held-out evaluation before RL (a resumed or finished run: its logged one)."""
    eval_after: dict = field(default_factory=dict)
    """The held-out evaluation after the last step (a finished run's rerun: its logged one)."""
    seconds: float = 0.0


def callables(given, name: str) -> list[Callable] | None:
    """The Python API's `reward_funcs` / `eval_funcs` / `tools`: None (the config's), one
    callable (as TRL takes it) or a list of them (empty: none, e.g. a reward model's score
    alone); anything else fails at once, naming the argument and the item, before any model
    loads."""
    if given is None:
        return None
    items = [given] if callable(given) else given
    if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
        raise ConfigError(f"{name}: expected a callable or a list of callables, got {given!r}")
    items = list(items)
    for i, f in enumerate(items):
        if not callable(f):
            raise ConfigError(f"{name}[{i}] is {f!r} ({type(f).__name__}), not a callable")
    return items


class Trainer:
    """`Trainer(config, reward_funcs).fit()`: set up (and resume) a run, then train it."""

    def __init__(
        self,
        config: Config,
        reward_funcs: list[Callable] | None = None,
        eval_funcs: list[Callable] | None = None,
        *,
        tools: list[Callable] | None = None,
        environment_factory: Callable | None = None,
    ) -> None:
        self.config = config
        self.rollouts: AsyncRollouts | None = None
        reward_funcs = callables(reward_funcs, "reward_funcs")
        eval_funcs = callables(eval_funcs, "eval_funcs")
        tools = callables(tools, "tools")
        self._user_code = (reward_funcs, tools, environment_factory)  # the worker needs them too
        require_data(config.data.train)  # before the lock creates the run folder
        # one run per run_dir, held until `fit` ends (or `close()`); rank 0 under torchrun
        self._lock = RunDirLock(config.log.run_dir) if os.environ.get("RANK", "0") == "0" else None
        try:
            candidates = resuming.resume_candidates(config, is_main=self._lock is not None)
            self.run: Run = build_run(config, reward_funcs, eval_funcs, tools, environment_factory)
            check_async(config, self.run.dist.world_size)
            self.state = TrainState()
            self.resumed_from = resuming.resume(self.run, self.state, candidates)
        except BaseException:
            self.close()
            raise
        cfg = config
        self.logger = MetricsLogger(
            self.run.run_dir,
            cfg.train.steps,
            cfg.log.tensorboard,
            cfg.log.wandb,
            cfg.log.progress,
            config=dataclasses.asdict(cfg),
            enabled=self.run.dist.is_main,
        )

    # the run's parts, for users and tests
    policy = property(lambda self: self.run.policy)
    ref = property(lambda self: self.run.ref)
    critic = property(lambda self: self.run.critic)
    tokenizer = property(lambda self: self.run.tokenizer)
    rewards = property(lambda self: self.run.rewards)
    algo = property(lambda self: self.run.algo)
    step = property(lambda self: self.state.step)

    def fit(self) -> RunResult:
        cfg, run, state = self.config, self.run, self.state
        result = RunResult(run_dir=run.run_dir)
        trained = self.resumed_from is not None and state.step >= cfg.train.steps
        if trained and finished_step(run.run_dir) == state.step:  # a rerun
            self.logger.print(
                f"run_dir {run.run_dir} already finished at step {state.step}; nothing to do (set "
                "checkpoint.resume=none and a new log.run_dir to train again)"
            )
            self.logger.close()
            self.close()
            result.eval_before, result.eval_after = logged_evaluations(run.run_dir)
            return result
        start = time.perf_counter()
        self.logger.print(run.algo.card(cfg.model.ref_sync_steps, cfg.model.ref_sync_alpha))
        if self.resumed_from is not None:
            self.logger.print(f"resumed from {self.resumed_from} (step {state.step})")
        self.logger.print(
            f"policy {count_parameters(run.policy) / 1e6:.2f}M params; "
            f"reference {'yes' if run.ref is not None else 'no'}; "
            f"critic {'yes' if run.critic is not None else 'no'}; "
            f"B = {run.sizes.P} prompts × {run.sizes.G} completions"
        )
        if run.eval_rows and state.step == 0:
            result.eval_before = self.evaluate()
            self.logger.print(_eval_line("before RL", result.eval_before))
            self.logger.log(0, result.eval_before)
        elif run.eval_rows:  # resumed: the evaluation logged before RL
            result.eval_before = logged_evaluations(run.run_dir)[0]
        self.logger.start(state.step)
        try:
            if trained:  # killed after its last checkpoint: the end is missing or partial
                self.logger.print(
                    f"run_dir {run.run_dir}: step {state.step} is trained and saved, the run's "
                    "end (evaluation after RL, final model, report) is not; finishing it"
                )
                if run.dist.is_main:
                    resuming.drop_evaluation(run.run_dir / "metrics.jsonl", state.step)
            else:
                if cfg.train.max_staleness is not None:  # the worker starts from this RNG state
                    self.rollouts = AsyncRollouts(run, state, *self._user_code, saved=state.pending)
                with StopSignals(run.dist.is_main) as stop:
                    self._loop(result, stop)
                if not cfg.checkpoint.every or state.step % cfg.checkpoint.every:
                    self.save_checkpoint()
            self._finish(result)
        finally:
            self.logger.close()
            self.close()
        result.seconds = time.perf_counter() - start
        return result

    def _finish(self, result: RunResult) -> None:
        """The run's end, after its last checkpoint: the evaluation after RL, the final model,
        the report; then the finished mark (a rerun without it finishes these again)."""
        cfg, run, state = self.config, self.run, self.state
        if run.eval_rows:
            result.eval_after = self.evaluate()
            self.logger.log(state.step, result.eval_after)
            self.logger.print(_eval_line("after RL", result.eval_after))
        if cfg.checkpoint.save_final:
            checkpointing.save_final(run)
        if cfg.log.report and run.dist.is_main:
            self.logger.print(f"report: {make_report(run.run_dir)}")
        if run.dist.is_main:
            mark_finished(run.run_dir, state.step)

    def _loop(self, result: RunResult, stop: StopSignals) -> None:
        """The steps, each logged, evaluated and checkpointed on its schedule. On SIGINT or
        SIGTERM: finish the step, save a checkpoint, raise `TrainingStopped`."""
        cfg, run, state = self.config, self.run, self.state
        while state.step < cfg.train.steps:
            metrics = self.train_step()
            state.step += 1
            last = state.step == cfg.train.steps
            if run.eval_rows and _every(cfg.eval.every, state.step) and not last:
                metrics.update(self.evaluate())
            if state.step % cfg.log.every == 0 or last:
                self.logger.log(state.step, metrics)
            result.metrics.append(metrics)
            saved = None
            if _every(cfg.checkpoint.every, state.step):
                saved = self.save_checkpoint()
            signum = stop.agreed()
            if signum:
                saved = saved or self.save_checkpoint()
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signum).name} after step {state.step} of "
                    f"{cfg.train.steps}: checkpoint saved in {saved}; run the same command again "
                    "to continue from it",
                    signum,
                )

    def close(self) -> None:
        """Release the run directory and stop the rollout worker (done by `fit` at its end)."""
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        if self._lock is not None:
            self._lock.release()

    def train_step(self) -> dict[str, float]:
        """One training step (the state's step counter is advanced by `fit`)."""
        if self.rollouts is None:
            metrics, batch = train_step(self.run, self.state, self.logger.print)
        else:  # the batch the worker sampled; then the worker may take the new weights
            batch, waits = self.rollouts.next_batch(self.state.step)
            metrics, batch = train_step(self.run, self.state, self.logger.print, batch)
            metrics.update(waits)
            self.rollouts.pushed(self.state.step + 1)
        if self.run.dist.is_main and self.config.log.samples:
            samples = sample_records(self.run, batch, self.config.log.samples)
            self.logger.log_samples(self.state.step + 1, samples)
        return metrics

    def rollout_and_score(self) -> ScoredRollout:
        """Steps 1–2 alone: this rank's scored rollout batch."""
        return rollout_and_score(self.run)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics; runs on a forked RNG so evaluating never changes training."""
        cfg, run = self.config, self.run
        with torch.random.fork_rng(devices=[]):
            return evaluate(
                run.sampler,
                run.eval_rows[: cfg.eval.size],
                run.eval_rewards,
                prompt_field=cfg.data.prompt_field,
                max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                pass_k=cfg.eval.pass_k,
                threshold=cfg.eval.correct_threshold,
                temperature=cfg.rollout.temperature,
                seed=cfg.train.seed,
                rank=run.dist.rank,
                world_size=run.dist.world_size,
                reduce=global_sums,
            )

    def save_checkpoint(self) -> Path:
        """A checkpoint of the run (with asynchronous rollouts, their queue too)."""
        extra = None
        if self.rollouts is not None:
            extra = {"async": self.rollouts.checkpoint_state(self.state.step)}
        return checkpointing.save(self.run, self.state, extra)


def _every(n: int, step: int) -> bool:
    """`n` > 0 and `step` is a multiple of it."""
    return bool(n) and step % n == 0


def _eval_line(label: str, metrics: dict) -> str:
    return f"{label}: " + "  ".join(
        f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items()
    )


def train(
    config: Config | dict | str | Path | None = None,
    reward_funcs: list[Callable] | None = None,
    overrides: list[str] | None = None,
    eval_funcs: list[Callable] | None = None,
    *,
    tools: list[Callable] | None = None,
    environment_factory: Callable | None = None,
) -> RunResult:
    """Train with `config` (a Config, a dict, or a YAML path) and optional `key=value` overrides.

    `reward_funcs`: TRL-style reward functions to use instead of `reward.functions`;
    `eval_funcs`: the same, judging held-out evaluation instead of `eval.functions`;
    `tools` / `environment_factory`: TRL's multi-turn arguments, instead of `rollout.tools` /
    `rollout.environment` (either one makes every rollout a multi-turn episode).
    """
    trainer = Trainer(
        config_from(config, overrides),
        reward_funcs,
        eval_funcs,
        tools=tools,
        environment_factory=environment_factory,
    )
    return trainer.fit()


__all__ = ["NonFiniteError", "RunResult", "Trainer", "TrainingStopped", "train"]
