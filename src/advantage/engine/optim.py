"""The one optimizer and learning-rate schedule of every stage (RL, SFT, reward model): AdamW
with a linear warm-up, then constant, linear or cosine decay to `floor` × the peak rate."""

from __future__ import annotations

import math

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, floor: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based):
    `(step + 1)/warmup` during warm-up, then 1 (constant), or a decay over the remaining
    `total - warmup` steps from 1 to `floor` (linear: `1 - p`; cosine: `½(1 + cos πp)`)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return floor + (1 - floor) * (1.0 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    floor: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Fused AdamW over the trainable parameters of `model`, and its schedule (step it once per
    optimizer step for SFT / RM, once per training step for RL)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True
    )

    def factor(step: int) -> float:
        return lr_factor(
            step, warmup=warmup_steps, total=total_steps, schedule=schedule, floor=floor
        )

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
