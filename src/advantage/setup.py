"""Setup of a training run: optimizers and schedules, the rollout engine, the reward sources,
the evaluation rows. Small functions the Trainer calls once."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import Config
from .configlib import ConfigError
from .data import check_rows, load_rows
from .models import resolve_model_path
from .parallel import is_fsdp
from .rewards import RewardComputer, RewardModel, RewardSource, load_function
from .rollout import TransformersBackend


def eval_rows(cfg: Config) -> list[dict]:
    spec = cfg.data.eval
    if spec is None and cfg.data.train.startswith("builtin:"):
        spec = cfg.data.train.split(":")[0] + ":" + cfg.data.train.split(":")[1] + ":eval"
    if spec is None:
        return []
    rows = load_rows(spec, "data.eval")
    check_rows(rows, cfg.data.prompt_field, "data.eval")
    return rows


def make_optimizer(model: torch.nn.Module, cfg: Config, lr: float):
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        fused=True,
    )

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return (
            1.0 - progress
            if t.lr_schedule == "linear"
            else 0.5 * (1 + math.cos(math.pi * progress))
        )

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_backend(cfg: Config, policy, tokenizer, policy_path: str):
    if cfg.rollout.backend == "vllm":
        from .rollout.vllm import VLLMBackend

        limit = getattr(policy.config, "max_position_embeddings", 2048)
        backend = VLLMBackend(
            policy_path, tokenizer, precision=cfg.model.precision, seed=cfg.train.seed,
            max_model_len=min(2048, limit), engine_kwargs=cfg.rollout.vllm,
        )  # fmt: skip
        backend.sync_weights(policy)  # the policy may differ from the folder (resume, LoRA)
        return backend
    # FSDP2: every forward is collective, so every rank must run the same decode steps
    return TransformersBackend(policy, tokenizer, cfg.model.precision, lockstep=is_fsdp(policy))


def task_reward(cfg: Config) -> Callable | None:
    if not cfg.data.train.startswith("builtin:"):
        return None
    from .tasks import get_task

    return get_task(cfg.data.train.split(":")[1]).reward_fn


def make_reward_computer(cfg: Config, reward_funcs: list[Callable] | None) -> RewardComputer:
    r = cfg.reward
    builtin = task_reward(cfg)
    if reward_funcs:
        sources = [
            RewardSource(getattr(f, "__name__", f"reward_{i}"), f)
            for i, f in enumerate(reward_funcs)
        ]
    else:
        sources = [load_function(spec, builtin) for spec in r.functions]
    if r.model:
        path = resolve_model_path(r.model, "reward.model")
        rm = RewardModel(path, r.model_batch_size, cfg.model.trust_remote_code, r.model_normalize)
        sources.append(RewardSource(rm.__name__, rm))
    if r.weights is not None:
        if len(r.weights) != len(sources):
            raise ConfigError(
                f"reward.weights has {len(r.weights)} entries for {len(sources)} reward sources "
                f"({', '.join(s.name for s in sources)})"
            )
        for s, w in zip(sources, r.weights, strict=True):
            s.weight = w
    return RewardComputer(sources, r.multi_reward, r.clip, r.timeout, r.kwargs)
