"""Supervised training of a causal LM on (prompt, completion) pairs, loss on completion tokens
only: the SFT stage (`advantage sft`) and the built-in models' warm start both run
`supervised_finetune`. Each batch is padded only to its own longest sequence."""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import FINISHED, list_checkpoints
from .configlib import ConfigError, check_at_least, check_positive, check_seed
from .optim import make_optimizer
from .supervised_rows import encode_rows

log = logging.getLogger("advantage")


def stage_folder(run_dir: Path, kind: str) -> None:
    """Make `run_dir` ready for a stage run (SFT, reward model) of `kind`: one that holds a
    finished run (final/) is refused, nothing overwritten; the logs of an interrupted one (no
    model was saved: these stages keep no checkpoint) move to `RUN_DIR/interrupted-<time>-…/`
    and the stage trains again."""
    if list_checkpoints(run_dir) or (run_dir / FINISHED).exists():
        raise ConfigError(
            f"log.run_dir {str(run_dir)!r} holds an RL run (checkpoints/); choose a new "
            "log.run_dir (nothing is overwritten)"
        )
    if (run_dir / "final").exists():
        raise ConfigError(
            f"log.run_dir {str(run_dir)!r} already holds {kind} run (final); choose a new "
            "log.run_dir (nothing is overwritten)"
        )
    logs = [run_dir / n for n in ("metrics.jsonl", "samples.jsonl", "tensorboard")]
    logs = [p for p in logs if p.exists()]
    if not logs:
        return
    aside = Path(
        tempfile.mkdtemp(prefix=f"interrupted-{time.strftime('%Y%m%d-%H%M%S')}-", dir=run_dir)
    )
    for path in logs:
        path.rename(aside / path.name)
    log.warning(
        f"log.run_dir {run_dir} holds the logs of an interrupted {kind} run and no model (these "
        f"stages keep no checkpoint): moved to {aside}; training again"
    )


@dataclass
class StageModel:
    """The model of a supervised stage (SFT, reward model); RL's `model` section extends it."""

    name_or_path: str = "builtin:tiny-reverse"
    """A local folder, a hub id, or a built-in model (`builtin:tiny-random`, ...; see train's
    `model.name_or_path`)."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id (default: the model's)."""
    trust_remote_code: bool = False
    """Allow code from the model folder to run (off unless you set it)."""


@dataclass
class StageLog:
    """Logging of a supervised stage: metrics.jsonl, TensorBoard, W&B and the console; RL's
    `log` section extends it."""

    run_dir: str = "runs/sft"
    """Where metrics.jsonl, TensorBoard logs and the trained model (RUN_DIR/final) go."""
    every: int = 25
    """Log metrics (and print a line, without the progress bar) every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: bool = False
    """Log to Weights & Biases (needs `wandb` installed)."""
    progress: bool = True
    """A rich progress bar (off: one plain line per logged step)."""

    def __post_init__(self) -> None:
        check_at_least("log.every", self.every, 1)


@dataclass
class StageSettings:
    """Optimisation of a supervised stage (SFT, reward model): AdamW, linear warm-up, then
    cosine decay to 10% of the peak rate (`advantage.engine.optim`)."""

    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per step."""
    lr: float = 2e-5
    """Peak learning rate (AdamW), linear warm-up then cosine decay to 10%. 2e-5 suits a pretrained
    model; a model trained from scratch (builtin:tiny-random, `advantage init-model`) wants ≈1e-3
    (the demo's warm start uses 2e-3)."""
    warmup_steps: int = 30
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    seed: int = 0
    """Seed of the batch order and of torch."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            check_at_least(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "weight_decay"):
            check_at_least(f"train.{name}", getattr(self, name), 0)
        check_seed("train.seed", self.seed)
        check_positive("train.lr", self.lr)
        check_positive("train.max_grad_norm", self.max_grad_norm)

    def optimizer(self, model: torch.nn.Module):
        """AdamW and its warm-up + cosine schedule (one scheduler step per optimizer step)."""
        return make_optimizer(
            model,
            lr=self.lr,
            total_steps=self.steps,
            warmup_steps=self.warmup_steps,
            schedule="cosine",
            floor=0.1,
            weight_decay=self.weight_decay,
        )


@dataclass
class SFTSettings(StageSettings):
    """A supervised fine-tuning run: the stage's optimisation plus the sequence length."""

    max_length: int | None = None
    """Sequences longer than this (prompt + completion tokens) are cut on the right."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("train.max_length", self.max_length, 1)


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (labels != -100) only."""
    return model(**batch).loss


def collate(pairs: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding).

    Each item is `encode_pair`'s (prompt ids, completion ids[, completion labels]); without
    labels every completion token is one."""
    L = max(len(p) + len(c) for p, c, *_ in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(pairs), L), dtype=torch.long)
    for i, (p, c, *completion_labels) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(completion_labels[0] if completion_labels else c)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def batches(n_items: int, batch_size: int, seed: int):
    """Endless shuffled passes over range(n_items), `batch_size` indices at a time."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n_items))
            rng.shuffle(fresh)
            order = fresh + order
        yield [order.pop() for _ in range(min(batch_size, n_items))]


def supervised_finetune(
    model,
    tokenizer,
    rows: list[dict],
    settings: SFTSettings,
    on_step: Callable[[int, dict], None] | None = None,
    encoded: list[tuple] | None = None,
) -> dict:
    """Train `model` in place on {prompt, completion} rows; returns {"loss", "seconds"}.
    `on_step(step, {"loss", "grad_norm", "lr"})` after every step (logging is the caller's).
    `encoded`: the rows already through `encode_rows` (then `rows` is not read)."""
    pairs = encoded if encoded is not None else encode_rows(tokenizer, rows, settings.max_length)
    torch.manual_seed(settings.seed)
    opt, sched = settings.optimizer(model)
    model.train()
    start, loss = time.perf_counter(), float("nan")
    order = batches(len(pairs), settings.batch_size, settings.seed)
    for step in range(settings.steps):
        batch = collate([pairs[i] for i in next(order)], tokenizer.pad_token_id)
        out = completion_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        out.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        sched.step()
        loss = out.item()
        if on_step is not None:
            on_step(
                step + 1,
                {"loss": loss, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]},
            )
    model.eval()
    return {"loss": loss, "seconds": time.perf_counter() - start}


@torch.no_grad()
def eval_loss(model, tokenizer, pairs: list[tuple], batch_size: int = 64) -> float:
    total, n = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], tokenizer.pad_token_id)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(completion_loss(model, batch)) * tokens
        n += tokens
    return total / max(n, 1)
