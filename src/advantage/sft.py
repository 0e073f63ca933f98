"""Supervised fine-tuning on prompt/completion pairs, loss on completion tokens only.

Used for the demo's warm start (and by `advantage sft`). Rows are `{"prompt", "completion"}`,
plain strings; each batch is padded only to its own longest sequence.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch


@dataclass
class SFTSettings:
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), linear warm-up then cosine decay to 10%."""
    warmup_steps: int = 30
    """Warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the batch order."""
    log_every: int = 100
    """Print the loss every N steps (0 = silent)."""


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's special tokens, completion ids + EOS)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, [*completion_ids, tokenizer.eos_token_id]


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


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from 1 to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def supervised_finetune(model, tokenizer, rows: list[dict], settings: SFTSettings) -> dict:
    """Train `model` in place on `rows`; returns {"loss": last loss, "seconds": wall time}."""
    pairs = [encode_pair(tokenizer, r["prompt"], r["completion"]) for r in rows]
    rng = random.Random(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, settings.warmup_steps, settings.steps)
    )
    model.train()
    start, loss = time.perf_counter(), float("nan")
    order: list[int] = []
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch = collate(
            [pairs[order.pop()] for _ in range(settings.batch_size)], tokenizer.pad_token_id
        )
        out = model(**batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.loss.item()
        if settings.log_every and (step + 1) % settings.log_every == 0:
            print(f"  sft step {step + 1}/{settings.steps}  loss {loss:.4f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    model.eval()
    return {"loss": loss, "seconds": time.perf_counter() - start}
