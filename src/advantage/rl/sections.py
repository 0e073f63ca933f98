"""The sections of the RL configuration (`model`, `data`, `train`, `log`, `eval`, `checkpoint`,
`distributed`; `rollout` and `reward` are in rollout_sections.py): one dataclass each, one
docstring per field; each checks its own fields when it is built, so a bad value fails at load,
naming the field. `model` and `log` extend the SFT and reward-model stages' sections
(engine/supervised.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..engine.configlib import (
    ConfigError,
    check_at_least,
    check_choice,
    check_finite,
    check_fraction,
    check_positive,
    check_seed,
    host_port,
)
from ..engine.optim import LR_SCHEDULES
from ..engine.precision import BF16_MATMUL_CHOICES
from ..engine.supervised import StageLog, StageModel

MIN_TEMPERATURE = 0.01
"""The lowest sampling temperature (`rollout.temperature`, `advantage eval --temperature`): vLLM
raises lower ones to it, and far below it `logits / T` overflows (1e-40 made every logit
non-finite, which reads as a diverged model)."""


def check_temperature(name: str, value: float | None) -> None:
    """`value` >= MIN_TEMPERATURE and finite, or None."""
    if value is not None and not (value >= MIN_TEMPERATURE and math.isfinite(value)):
        raise ConfigError(
            f"{name} must be a finite number >= {MIN_TEMPERATURE:g} (logits / temperature "
            f"overflows far below it; vLLM raises lower ones to {MIN_TEMPERATURE:g}), got {value}"
        )


@dataclass
class ModelConfig(StageModel):
    name_or_path: str = "builtin:tiny-reverse"
    """Policy: a local folder, a hub id, or a built-in model (built locally, nothing downloaded):
    `builtin:tiny-reverse` (the demo's tiny Qwen2, warm-started on the built-in task),
    `builtin:tiny-random` / `builtin:small-random` (freshly initialised ≈2.4M / ≈24M-parameter
    Qwen2 with a character tokenizer; `advantage init-model OUT --chars ...` writes one for the
    characters of a task of your own)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: the policy's)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast for every forward pass; weights and optimizer stay fp32)."""
    bf16_matmul: str = "auto"
    """Kernels of bf16 matrix products on CPU: auto (fp32 GEMMs of the bf16 operands unless the CPU's
    native bf16 GEMM measures at least as fast as its fp32 GEMM), native, or fp32. See
    advantage/engine/precision.py."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    critic: str | None = None
    """Critic (PPO): a model folder; default: a value head on a copy of the policy."""
    ref_sync_steps: int = 0
    """Every N steps move the reference towards the policy (0 = frozen reference)."""
    ref_sync_alpha: float = 1.0
    """θ_ref ← α·θ + (1-α)·θ_ref at each sync (1 = copy)."""
    lora: dict | None = None
    """LoRA adapters with peft: keyword arguments of `peft.LoraConfig` (e.g. {r: 8, lora_alpha: 16,
    target_modules: all-linear}); null = full fine-tuning. The reference is then the base model
    with the adapters disabled (no second copy in memory)."""

    def __post_init__(self) -> None:
        check_choice("model.precision", self.precision, ("fp32", "bf16"))
        check_choice("model.bf16_matmul", self.bf16_matmul, BF16_MATMUL_CHOICES)
        check_at_least("model.ref_sync_steps", self.ref_sync_steps, 0)
        check_fraction("model.ref_sync_alpha", self.ref_sync_alpha, False, True)
        if self.lora is not None and self.ref_sync_steps:
            raise ConfigError(
                "model.ref_sync_steps needs a separate reference; with model.lora the reference is "
                "the base model with the adapters disabled"
            )


ROWS_HINT = (
    "rows in memory (a list of dicts, a datasets.Dataset): write them to a .jsonl file, or "
    "Dataset.save_to_disk(folder), and give its path"
)


@dataclass
class DataConfig:
    train: str | None = field(default=None, metadata={"hint": ROWS_HINT})
    """Prompts (required): a .jsonl file, a folder or file readable by `datasets`, or
    `builtin:reverse` (the demo's task)."""
    eval: str | None = field(default=None, metadata={"hint": ROWS_HINT})
    """Held-out prompts (default for builtin tasks: their held-out split; else none, with a
    warning: nothing is evaluated and `result.eval_before/eval_after` stay empty)."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages {role, content}."""
    system_prompt: str | None = None
    """Prepended as a system message to conversational prompts."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (seeded)."""
    max_prompt_tokens: int | None = None
    """Prompts longer than this are truncated from the left (null = no limit)."""

    def __post_init__(self) -> None:
        check_at_least("data.max_prompt_tokens", self.max_prompt_tokens, 1)


@dataclass
class TrainConfig:
    steps: int = 100
    """Training steps (one rollout batch each)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW). 1e-6 suits a pretrained LM (10^8+ parameters); the tiny
    models here, trained from scratch and warm-started, want 1e-4 to 3e-4 (the demo: 3e-4)."""
    critic_lr: float = 1e-5
    """Critic learning rate."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay after warm-up, to 0 at the last step)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping by global norm (null = off)."""
    epochs: int = 1
    """μ, passes over each rollout batch."""
    minibatches: int = 1
    """Optimizer steps per epoch (the rollout batch is split into this many minibatches)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward (gradient accumulation; null = whole minibatch)."""
    max_tokens_per_micro_batch: int | None = None
    """Tokens per forward/backward after packing (each group's prompt once, then its completions
    without their last token), instead of or on top of `micro_batch_size`: a micro-batch takes
    whole groups while they fit; a group over the budget on its own is split, its prompt
    repeated in each part. The gradient does not depend on the split. null = no token limit."""
    seed: int = 0
    """Seed of Python, NumPy and torch."""
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive updates skipped for a non-finite loss or gradient."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (bitwise-reproducible runs on CPU)."""
    max_staleness: int | None = None
    """Asynchronous rollouts: a worker process samples the next batches while the trainer
    trains; batch i is sampled by the weights of update max(0, i - k), k = this (0: the
    synchronous loop's samples, in two processes; null: one process, no overlap)."""

    def __post_init__(self) -> None:
        check_choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in (
            "steps",
            "epochs",
            "minibatches",
            "micro_batch_size",
            "max_tokens_per_micro_batch",
            "max_nonfinite_steps",
        ):
            check_at_least(f"train.{name}", getattr(self, name), 1)
        check_positive("train.lr", self.lr)
        check_positive("train.critic_lr", self.critic_lr)
        check_at_least("train.warmup_steps", self.warmup_steps, 0)
        check_at_least("train.weight_decay", self.weight_decay, 0)
        if len(self.adam_betas) != 2:
            raise ConfigError(f"train.adam_betas must be two numbers, got {self.adam_betas}")
        for i, beta in enumerate(self.adam_betas):
            check_fraction(f"train.adam_betas[{i}]", beta)
        check_positive("train.adam_eps", self.adam_eps)
        check_positive("train.max_grad_norm", self.max_grad_norm)
        check_seed("train.seed", self.seed)
        if self.max_staleness is not None:
            check_at_least("train.max_staleness", self.max_staleness, 0)


@dataclass
class LogConfig(StageLog):
    run_dir: str = "runs/advantage"
    """Where metrics.jsonl, TensorBoard logs, checkpoints and the report go."""
    every: int = 1
    """Log metrics every N steps."""
    samples: int = 4
    """Sample completions kept per step, every step whatever `log.every` (samples.jsonl; the
    report shows about 20 steps of them, evenly spaced, and the last)."""
    report: bool = True
    """Write RUN_DIR/report (PNG plots and an HTML page) at the end of training."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("log.samples", self.samples, 0)


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on the held-out set every N steps (0 = only before and after training)."""
    size: int = 200
    """Held-out prompts evaluated."""
    pass_k: int = 0
    """Also estimate pass@k with k samples per prompt (0 = off)."""
    correct_threshold: float = 1.0
    """A completion is correct when its score is >= this."""
    functions: list[str] | None = None
    """Reward functions that judge evaluation (default: the training reward sources), e.g. the
    task's verifier when training on a learned reward model. From Python, callables:
    `advantage.train(cfg, reward_funcs=[...], eval_funcs=[...])`."""
    max_new_tokens: int | None = None
    """Generation budget for evaluation (default: rollout.max_new_tokens)."""

    def __post_init__(self) -> None:
        for name in ("every", "size", "pass_k"):
            check_at_least(f"eval.{name}", getattr(self, name), 0)
        check_finite("eval.correct_threshold", self.correct_threshold)
        check_at_least("eval.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (0 = only at the end)."""
    keep: int = 2
    """Keep the newest N checkpoints."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, if any) | none | a checkpoint folder."""
    save_final: bool = True
    """Save the final policy as a Hugging Face folder (run_dir/final)."""

    def __post_init__(self) -> None:
        check_at_least("checkpoint.every", self.every, 0)
        check_at_least("checkpoint.keep", self.keep, 1)


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    """ddp | fsdp2 (under torchrun; ignored in a single process)."""
    backend: str | None = None
    """gloo | nccl (default: nccl with CUDA, else gloo)."""
    rollout_threads: int | None = None
    """Threads of the asynchronous rollout worker (default: half of this process's)."""
    rollout_address: str | None = None
    """HOST:PORT where the trainer waits for a rollout worker started elsewhere (`advantage
    rollout-worker CONFIG --connect HOST:PORT`, e.g. on a GPU node); null: the trainer starts
    the worker on this machine."""

    def __post_init__(self) -> None:
        check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp2"))
        check_at_least("distributed.rollout_threads", self.rollout_threads, 1)
        if self.rollout_address is not None:
            host_port(self.rollout_address)
