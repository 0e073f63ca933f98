"""Supervised fine-tuning (`advantage sft CONFIG.yaml`), loss on completion tokens only.

Rows are `{"prompt", "completion"}` (strings, or a conversational prompt and an assistant
message) or `{"messages": [...]}` ending with the assistant turn to learn. Each batch is padded
only to its own longest sequence (no padding beyond it). The demo's warm start calls
`supervised_finetune` too.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import LogConfig, ModelConfig
from .configlib import ConfigError, load, parse_overrides, read_yaml, set_path


@dataclass
class StageSettings:
    """Optimisation of a supervised stage (SFT, reward model)."""

    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Examples per step."""
    lr: float = 2e-5
    """Peak learning rate (AdamW), linear warm-up then cosine decay to 10%."""
    warmup_steps: int = 30
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    seed: int = 0
    """Seed of the batch order and of torch."""

    def optimizer(self, model: torch.nn.Module):
        """AdamW and its warm-up + cosine schedule."""
        opt = torch.optim.AdamW(
            model.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True
        )
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, self.warmup_steps, self.steps)
        )


@dataclass
class SFTSettings(StageSettings):
    max_length: int | None = None
    """Sequences longer than this (prompt + completion tokens) are cut on the right."""
    log_every: int = 100
    """Print the loss every N steps (0 = silent)."""


@dataclass
class SupervisedData:
    train: str = "builtin:reverse"
    """Rows: .jsonl, a local `datasets` folder/file, or builtin:TASK (teacher demonstrations)."""
    eval: str | None = None
    """Held-out rows (loss is reported on them at the end)."""
    prompt_field: str = "prompt"
    """Prompt column (string or chat messages)."""
    completion_field: str = "completion"
    """Completion column (string or an assistant message list)."""
    messages_field: str = "messages"
    """Conversation column, used when a row has no prompt: the last message is learned."""


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SupervisedData = field(default_factory=SupervisedData)
    train: SFTSettings = field(default_factory=SFTSettings)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/sft"))


def load_stage_config(cls: type, path: str | None, overrides: list[str]):
    """A stage config (SFT / reward model) from YAML and `key=value` overrides."""
    data = read_yaml(path) if path else {}
    for key, value in parse_overrides(overrides):
        set_path(data, key, value)
    return load(cls, data)


def encode_pair(
    tokenizer, prompt, completion, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS); prompts go through `encode_prompt` (chat templates)."""
    from .data import encode_prompt
    from .reward_helpers import completion_text

    prompt_ids = encode_prompt(tokenizer, prompt)
    completion_ids = tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"]
    completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if max_length is not None:
        completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
    return prompt_ids, completion_ids


def rows_to_pairs(
    rows: list[dict], data: SupervisedData, field_name: str = "data.train"
) -> list[tuple]:
    """(prompt, completion) of every row; errors name the row."""
    pairs = []
    for i, row in enumerate(rows):
        if data.prompt_field in row and data.completion_field in row:
            prompt, completion = row[data.prompt_field], row[data.completion_field]
        elif data.messages_field in row:
            messages = row[data.messages_field]
            if not messages or messages[-1].get("role") != "assistant":
                raise ConfigError(
                    f"{field_name}: row {i}: the conversation must end with an assistant message"
                )
            prompt, completion = messages[:-1], messages[-1]["content"]
        else:
            raise ConfigError(
                f"{field_name}: row {i} needs '{data.prompt_field}' and '{data.completion_field}', "
                f"or '{data.messages_field}' (columns: {', '.join(row)})"
            )
        if not completion:
            raise ConfigError(f"{field_name}: row {i} has an empty completion")
        pairs.append((prompt, completion))
    return pairs


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    L = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), L), -100, dtype=torch.long)
    attn = torch.zeros((len(pairs), L), dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p) : n] = torch.tensor(c)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (labels != -100) only."""
    return model(**batch).loss


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from 1 to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def supervised_finetune(model, tokenizer, rows: list[dict], settings: SFTSettings,
                        on_step: Callable[[int, dict], None] | None = None) -> dict:  # fmt: skip
    """Train `model` in place on {prompt, completion} rows; returns {"loss", "seconds"}."""
    pairs = [
        encode_pair(tokenizer, r["prompt"], r["completion"], settings.max_length) for r in rows
    ]
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
        if settings.log_every and (step + 1) % settings.log_every == 0:
            print(f"  sft step {step + 1}/{settings.steps}  loss {loss:.4f}  "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
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


def run_sft(cfg: SFTConfig) -> dict:
    """`advantage sft`: load, train with logging, report the held-out loss, save RUN_DIR/final."""
    from .logger import MetricsLogger
    from .models import load_causal_lm, load_tokenizer, quiet_transformers, resolve_model_path

    quiet_transformers()
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg.model.trust_remote_code)
    model = load_causal_lm(path, cfg.model.trust_remote_code)
    rows = _supervised_rows(cfg.data.train, cfg, "data.train")
    eval_rows = _supervised_rows(cfg.data.eval, cfg, "data.eval") if cfg.data.eval else []
    logger = MetricsLogger(
        cfg.log.run_dir, cfg.train.steps, cfg.log.tensorboard, cfg.log.wandb, cfg.log.progress
    )
    logger.start(0)
    try:
        stats = supervised_finetune(
            model, tokenizer, rows, cfg.train,
            on_step=lambda step, m: logger.log(step, m) if step % cfg.log.every == 0 else None,
        )  # fmt: skip
    finally:
        logger.close()
    if eval_rows:
        pairs = [
            encode_pair(tokenizer, r["prompt"], r["completion"], cfg.train.max_length)
            for r in eval_rows
        ]
        stats["eval_loss"] = eval_loss(model, tokenizer, pairs)
        logger.log(cfg.train.steps, {"eval/loss": stats["eval_loss"]})
    final = Path(cfg.log.run_dir) / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    stats["final"] = str(final)
    return stats


def _supervised_rows(spec: str, cfg: SFTConfig, field_name: str) -> list[dict]:
    from .data import load_rows

    if spec.startswith("builtin:"):
        from .tasks import get_task

        name = spec.removeprefix("builtin:").split(":")[0]
        return get_task(name).sft_rows(cfg.train.steps * cfg.train.batch_size, seed=cfg.train.seed)
    rows = load_rows(spec, field_name)
    if not rows:
        raise ConfigError(f"{field_name}: the dataset is empty")
    return [{"prompt": p, "completion": c} for p, c in rows_to_pairs(rows, cfg.data, field_name)]
