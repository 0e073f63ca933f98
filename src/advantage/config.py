"""The training configuration: nested dataclasses, one docstring per field, validated once.

`load_config(path, overrides)` reads a YAML file and `key=value` overrides
(`algorithm=rloo rollout.num_generations=4 algo.clip_high=0.28`) and returns a validated `Config`.
`Config.algorithm_spec()` resolves the preset and the `algo.*` overrides to a core `Algorithm`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configlib import ConfigError, load, parse_overrides, read_yaml, set_path
from .core.algorithm import ALGORITHM_FIELDS, PRESETS, Algorithm, resolve
from .precision import BF16_MATMUL_CHOICES


def _algo_overrides_class() -> type:
    """`AlgoConfig`: every Algorithm field, optional; null = the preset's value."""
    hints = typing.get_type_hints(Algorithm)
    fields = [(name, hints[name] | None, field(default=None)) for name in ALGORITHM_FIELDS]
    cls = dataclasses.make_dataclass("AlgoConfig", fields)
    cls.__doc__ = "Overrides of the preset's axes (null = keep the preset's value)."
    return cls


AlgoConfig = _algo_overrides_class()


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-reverse"
    """Policy: a local folder, a hub id, or `builtin:tiny-reverse` (the demo's tiny Qwen2,
    built locally and warm-started on the built-in task; nothing is downloaded)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: the policy's)."""
    trust_remote_code: bool = False
    """Allow code from the model folder to run (off unless you set it)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast for every forward pass; weights and optimizer stay fp32)."""
    bf16_matmul: str = "auto"
    """Kernels of bf16 matrix products on CPU: auto (fp32 GEMMs of the bf16 operands when the CPU
    has no native bf16 GEMM, native otherwise), native, or fp32. See advantage/precision.py."""
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


@dataclass
class DataConfig:
    train: str = "builtin:reverse"
    """Prompts: a .jsonl file, a folder or file readable by `datasets`, or `builtin:reverse`."""
    eval: str | None = None
    """Held-out prompts (default for builtin tasks: their held-out split; else none)."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages {role, content}."""
    system_prompt: str | None = None
    """Prepended as a system message to conversational prompts."""
    shuffle: bool = True
    """Shuffle the prompts each epoch (seeded)."""
    max_prompt_tokens: int | None = None
    """Prompts longer than this are truncated from the left (null = no limit)."""


@dataclass
class RolloutConfig:
    backend: str = "transformers"
    """Generation engine: transformers | vllm."""
    num_generations: int = 8
    """G, completions per prompt (a group)."""
    prompts_per_step: int = 8
    """P, prompts per step; B = P·G sequences per rollout batch."""
    max_new_tokens: int = 64
    """Generation budget per completion (also T_max of seq_mean_token_sum_norm)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed on logits / temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (generation also stops at EOS)."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens, ignoring EOS (for benchmarks: equal work everywhere)."""
    mask_truncated: bool = False
    """Leave completions that hit max_new_tokens without EOS out of the loss (DAPO)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and refill from new prompts (DAPO)."""
    max_sampling_tries: int = 4
    """Cap on rollout rounds per step under dynamic sampling."""
    vllm: dict = field(default_factory=dict)
    """Extra arguments of the vLLM engine (gpu_memory_utilization, dtype, ...)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight tokens by min(π_train/π_engine, cap) (null = off)."""


@dataclass
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["builtin"])
    """Reward functions: dotted paths `module:function` / `module.function`, `file.py:function`,
    built-in names (exact_match, format_regex, length_penalty, ...), or `builtin` (the task's)."""
    weights: list[float] | None = None
    """One weight per reward source (functions, then the reward model); default all 1."""
    multi_reward: str = "sum_then_normalize"
    """sum_then_normalize | normalize_then_sum (normalise each function within its group first)."""
    clip: float | None = None
    """Clip the combined score to [-clip, clip]."""
    model: str | None = None
    """Reward model folder (AutoModelForSequenceClassification, one label)."""
    model_batch_size: int = 32
    """Sequences per reward-model forward."""
    model_normalize: bool = False
    """Normalise reward-model scores with running statistics ((r - mean)/std of all scores seen)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that hit max_new_tokens without EOS."""
    timeout: float | None = None
    """Seconds allowed for one call of a reward function (null = no limit)."""
    kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments passed to every reward function."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Training steps (one rollout batch each)."""
    lr: float = 1e-6
    """Policy learning rate (AdamW)."""
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
    seed: int = 0
    """Seed of Python, NumPy and torch."""
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive updates skipped for a non-finite loss or gradient."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (bitwise-reproducible runs on CPU)."""


@dataclass
class LogConfig:
    run_dir: str = "runs/advantage"
    """Where metrics.jsonl, TensorBoard logs, checkpoints and the report go."""
    every: int = 1
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed)."""
    progress: bool = True
    """A rich progress bar (off: one plain line per step)."""
    samples: int = 4
    """Sample completions kept per logged step (for the report)."""
    report: bool = True
    """Write RUN_DIR/report (PNG plots and an HTML page) at the end of training."""


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
    task's verifier when training on a learned reward model."""
    max_new_tokens: int | None = None
    """Generation budget for evaluation (default: rollout.max_new_tokens)."""


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


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    """ddp | fsdp2 (under torchrun; ignored in a single process)."""
    backend: str | None = None
    """gloo | nccl (default: nccl with CUDA, else gloo)."""


@dataclass
class Config:
    algorithm: str = "grpo"
    """Preset: ppo | grpo | dr_grpo | rloo | reinforce | reinforce_pp | reinforce_pp_baseline."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Axis overrides of the preset (see the algorithm card)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        self.validate()

    def algorithm_spec(self) -> Algorithm:
        overrides = {k: v for k, v in dataclasses.asdict(self.algo).items() if v is not None}
        try:
            return resolve(self.algorithm, **overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def validate(self) -> None:
        """Cross-field checks, once at load. Each error names the fields to change."""
        if self.algorithm not in PRESETS:
            raise ConfigError(
                f"algorithm: unknown preset {self.algorithm!r}; valid: {', '.join(PRESETS)}"
            )
        algo = self.algorithm_spec()
        r, t = self.rollout, self.train
        _choice("rollout.backend", r.backend, ("transformers", "vllm"))
        _choice("model.precision", self.model.precision, ("fp32", "bf16"))
        _choice("model.bf16_matmul", self.model.bf16_matmul, BF16_MATMUL_CHOICES)
        _choice(
            "reward.multi_reward",
            self.reward.multi_reward,
            ("sum_then_normalize", "normalize_then_sum"),
        )
        _choice("train.lr_schedule", t.lr_schedule, ("constant", "linear", "cosine"))
        _choice("distributed.strategy", self.distributed.strategy, ("ddp", "fsdp2"))
        for name, value in [
            ("rollout.num_generations", r.num_generations),
            ("rollout.prompts_per_step", r.prompts_per_step),
            ("rollout.max_new_tokens", r.max_new_tokens),
            ("train.steps", t.steps),
            ("train.epochs", t.epochs),
            ("train.minibatches", t.minibatches),
            ("rollout.max_sampling_tries", r.max_sampling_tries),
        ]:
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if r.temperature <= 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
        batch = r.prompts_per_step * r.num_generations
        if batch % t.minibatches:
            raise ConfigError(
                f"train.minibatches={t.minibatches} must divide the rollout batch "
                f"rollout.prompts_per_step × rollout.num_generations = {batch}"
            )
        if (batch // t.minibatches) % r.num_generations:
            raise ConfigError(
                f"each minibatch ({batch // t.minibatches} sequences) must hold whole groups of "
                f"rollout.num_generations={r.num_generations}; change train.minibatches"
            )
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
        if algo.baseline == "leave_one_out" and r.num_generations < 2:
            raise ConfigError(
                "leave_one_out baseline needs rollout.num_generations >= 2 "
                f"(got {r.num_generations})"
            )
        if algo.scope == "group" and r.num_generations < 2:
            raise ConfigError(
                f"the group scope needs rollout.num_generations >= 2 (got {r.num_generations})"
            )
        if not self.reward.functions and not self.reward.model:
            raise ConfigError("reward: give at least one of reward.functions or reward.model")
        # (reward.weights is checked against the sources when they are built: the Python API
        # can pass reward functions that the config does not name)
        if self.model.ref_sync_steps < 0 or not 0 < self.model.ref_sync_alpha <= 1:
            raise ConfigError(
                "model.ref_sync_steps must be >= 0 and model.ref_sync_alpha in (0, 1]"
            )
        if self.model.lora is not None and self.model.ref_sync_steps:
            raise ConfigError(
                "model.ref_sync_steps needs a separate reference; with model.lora the reference is "
                "the base model with the adapters disabled"
            )
        if self.model.lora is not None and r.backend == "vllm":
            raise ConfigError(
                "rollout.backend=vllm does not take LoRA adapters yet; use transformers"
            )
        if r.tis_cap is not None and r.tis_cap <= 0:
            raise ConfigError(f"rollout.tis_cap must be > 0 (or null), got {r.tis_cap}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Config from an optional YAML file, then `key=value` overrides (applied in order)."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        for key, value in read_yaml(path).items():
            data[key] = value
    for key, value in parse_overrides(overrides or []):
        set_path(data, key, value)
    return load(Config, data)


def config_from(
    obj: Config | dict | str | Path | None, overrides: list[str] | None = None
) -> Config:
    """Accept a Config, a dict, or a YAML path (the Python API's `train(config)`)."""
    if isinstance(obj, Config):
        if overrides:
            return load_config(None, overrides, base=dataclasses.asdict(obj))
        return obj
    if obj is None or isinstance(obj, dict):
        return load_config(None, overrides, base=obj)
    return load_config(obj, overrides)


__all__ = [
    "AlgoConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "LogConfig",
    "ModelConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainConfig",
    "config_from",
    "load_config",
]
