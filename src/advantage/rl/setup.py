"""Setup of an RL run: everything the loop needs, built once into one `Run` record.

config → the resolved Algorithm, the batch sizes, the process group, seeds
       → prompts (a bad dataset fails before any model loads), reward sources
       → tokenizer, policy (+ LoRA), reference, critic, DDP / FSDP2 wrapping, optimizers
       → the rollout engine, the baseline and the KL controller
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import KL_CONTROLLERS, Algorithm, make_baseline
from ..core.baselines import Baseline
from ..engine.configlib import ConfigError
from ..engine.data import PromptStream, check_reward_columns
from ..engine.episodes import Episodes
from ..engine.models import (
    AdapterDisabled,
    add_lora,
    check_vocabulary,
    frozen_copy,
    load_causal_lm,
    load_critic,
    load_tokenizer,
    quiet_transformers,
)
from ..engine.optim import make_optimizer
from ..engine.parallel import DistInfo, init_distributed, wrap_model
from ..engine.precision import log_bf16_kernels, set_bf16_matmul
from ..engine.rewards import RewardComputer
from ..engine.rollout import SamplingParams
from ..engine.sampling import SingleTurn
from ..tasks import model_path, model_paths
from .config import Config
from .records import RunSizes
from .rewarding import make_eval_rewards, make_reward_computer
from .rows import check_context, held_out_spec, load_rows
from .samplers import load_environment, load_tools, make_backend, make_sampler

log = logging.getLogger("advantage")


@dataclass
class Run:
    """One RL run: configuration, derived decisions and every object the loop uses."""

    config: Config
    algo: Algorithm
    """The resolved algorithm: it owns every decision about the KL, the reference, the critic."""
    sizes: RunSizes
    dist: DistInfo
    run_dir: Path
    prompts: PromptStream
    eval_rows: list[dict]
    rewards: RewardComputer
    eval_rewards: RewardComputer
    """The judge of evaluation (`eval.functions`; default: the training rewards)."""
    tokenizer: object
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    critic: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    critic_optimizer: torch.optim.Optimizer | None
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    backend: object
    sampler: SingleTurn | Episodes
    """Turns prompts into scored-ready samples: one turn, or multi-turn episodes."""
    sampling: SamplingParams
    """Sampling parameters of the training rollouts."""
    baseline: Baseline
    kl_ctl: object
    """The KL controller; `kl_ctl.value` is the current β."""

    @property
    def episodic(self) -> bool:
        """Rollouts are multi-turn episodes (tools or an environment)."""
        return self.sampler.episodic


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_run(
    cfg: Config,
    reward_funcs: list[Callable] | None = None,
    eval_funcs: list[Callable] | None = None,
    tools: list[Callable] | None = None,
    environment_factory: Callable | None = None,
) -> Run:
    """Everything the loop needs (`tools` / `environment_factory`: TRL's arguments, instead of
    `rollout.tools` / `rollout.environment`)."""
    algo = cfg.algorithm_spec()
    quiet_transformers()
    dist = init_distributed(cfg.distributed.backend)
    set_bf16_matmul(cfg.model.bf16_matmul, agreed=cfg.model.precision == "bf16")
    log_bf16_kernels(cfg.model.precision)
    sizes = run_sizes(cfg, dist.world_size)
    set_seed(cfg.train.seed + dist.rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    train_rows, eval_rows = load_rows(cfg)  # a bad dataset fails before any model is loaded
    tools = load_tools(cfg, tools)
    environment_factory = load_environment(cfg, environment_factory)
    if cfg.model.ref_sync_steps and not algo.uses_reference:
        log.warning(
            "model.ref_sync_steps=%d does nothing: %s uses no reference model (β = 0, no KL "
            "term); set algo.kl_coef > 0 or drop it",
            cfg.model.ref_sync_steps,
            algo.name,
        )
    _warn_unused_settings(cfg, algo)
    episodic = bool(tools) or environment_factory is not None
    if episodic and algo.overlong_fraction and cfg.rollout.max_episode_tokens is None:
        raise ConfigError(
            "DAPO's overlong shaping (algo.overlong_fraction) in episodes measures each "
            "episode's tokens against rollout.max_episode_tokens (rollout.max_new_tokens is one "
            "turn's budget); set it, or algo.overlong_fraction=null"
        )
    rewards = make_reward_computer(cfg, reward_funcs, environment_factory)
    check_reward_columns(rewards, train_rows, cfg.data.prompt_field, "data.train", cfg.data.train)
    eval_rewards = make_eval_rewards(cfg, rewards, eval_funcs)
    if eval_rows:
        check_reward_columns(
            eval_rewards, eval_rows, cfg.data.prompt_field, "data.eval", held_out_spec(cfg)
        )
    policy_path, tokenizer, policy, ref, critic = _load_models(cfg, algo, train_rows, eval_rows)
    # data parallel (DDP) or sharded (FSDP2) before the optimizers see the parameters
    policy, ref, critic = _wrap_models(cfg, dist, policy, ref, critic)
    optimizer, scheduler = optimizer_for(policy, cfg, cfg.train.lr)
    critic_optimizer = critic_scheduler = None
    if critic is not None:
        critic_optimizer, critic_scheduler = optimizer_for(critic, cfg, cfg.train.critic_lr)
    backend = make_backend(cfg, policy, tokenizer, policy_path)
    return Run(
        config=cfg,
        algo=algo,
        sizes=sizes,
        dist=dist,
        run_dir=Path(cfg.log.run_dir),
        prompts=PromptStream(train_rows, cfg.train.seed, cfg.data.shuffle),
        eval_rows=eval_rows,
        rewards=rewards,
        eval_rewards=eval_rewards,
        tokenizer=tokenizer,
        policy=policy,
        ref=ref,
        critic=critic,
        optimizer=optimizer,
        scheduler=scheduler,
        critic_optimizer=critic_optimizer,
        critic_scheduler=critic_scheduler,
        backend=backend,
        sampler=make_sampler(cfg, backend, tokenizer, tools, environment_factory, policy),
        sampling=sampling_params(cfg),
        baseline=make_baseline(algo.baseline, ema_alpha=algo.ema_alpha),
        kl_ctl=KL_CONTROLLERS[algo.kl_controller](algo.kl_coef, algo.kl_target, algo.kl_horizon),
    )


def _load_models(cfg: Config, algo, train_rows: list[dict], eval_rows: list[dict]):
    """(policy path, tokenizer, policy, reference or None, critic or None), unwrapped: the
    reference is the policy with its adapter disabled under LoRA, else a frozen copy."""
    policy_path, tokenizer_folder = model_paths(cfg.model)
    tokenizer = load_tokenizer(tokenizer_folder, cfg.model.trust_remote_code)
    policy = load_causal_lm(policy_path, cfg.model.trust_remote_code)
    check_vocabulary(tokenizer, policy, _tokenizer_field(cfg.model))
    check_context(cfg, tokenizer, policy.config, train_rows, eval_rows)
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    ref = None
    if cfg.model.lora is not None:
        policy = add_lora(policy, cfg.model.lora)
        if algo.uses_reference:
            ref = AdapterDisabled(policy)
    elif algo.uses_reference:
        ref = frozen_copy(policy)
    critic = None
    if algo.uses_critic:
        critic_path = model_path(cfg.model.critic, "model.critic") if cfg.model.critic else None
        critic = load_critic(critic_path or policy_path, cfg.model.trust_remote_code)
    return policy_path, tokenizer, policy, ref, critic


def _warn_unused_settings(cfg: Config, algo) -> None:
    """A warning for each setting the resolved algorithm never reads (a probe found them
    accepted without a word)."""
    unused = []
    if cfg.model.critic and not algo.uses_critic:
        unused.append(f"model.critic={cfg.model.critic!r}: {algo.name} trains no critic")
    if algo.kl_placement == "none" and algo.kl_coef > 0:
        unused.append(f"algo.kl_coef={algo.kl_coef:g}: algo.kl_placement=none adds no KL term")
    if not algo.uses_reference and algo.kl_controller != "fixed":
        unused.append(f"algo.kl_controller={algo.kl_controller}: {algo.name} has no KL term")
    for what in unused:
        log.warning("%s; the setting does nothing", what)


def _tokenizer_field(model_cfg) -> str:
    return "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"


def _wrap_models(cfg: Config, dist, policy, ref, critic):
    """The models wrapped for `distributed.strategy` (the frozen reference not trainable; a
    LoRA reference is the wrapped policy itself)."""
    strategy = cfg.distributed.strategy
    policy = wrap_model(policy, strategy, dist)
    if ref is not None and not isinstance(ref, AdapterDisabled):
        ref = wrap_model(ref, strategy, dist, trainable=False)
    if critic is not None:
        critic = wrap_model(critic, strategy, dist)
    return policy, ref, critic


def run_sizes(cfg: Config, world: int) -> RunSizes:
    P = cfg.rollout.prompts_per_step
    if P % world:
        raise ConfigError(
            f"rollout.prompts_per_step={P} must be a multiple of the number of processes "
            f"({world}): each rank takes whole groups"
        )
    return RunSizes(G=cfg.rollout.num_generations, P=P, world=world)


def sampling_params(cfg: Config) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        stop=list(r.stop),
        ignore_eos=r.ignore_eos,
    )


def optimizer_for(model: torch.nn.Module, cfg: Config, lr: float):
    t = cfg.train
    return make_optimizer(
        model,
        lr=lr,
        total_steps=t.steps,
        warmup_steps=t.warmup_steps,
        schedule=t.lr_schedule,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )
