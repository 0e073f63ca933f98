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
from .data import encode_prompt
from .optim import make_optimizer
from .reward_helpers import completion_text

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


@dataclass
class PairColumns:
    """Where a supervised dataset keeps its prompts and completions."""

    prompt_field: str = "prompt"
    """Prompt column (string or chat messages)."""
    completion_field: str = "completion"
    """Completion column (string or an assistant message list)."""
    messages_field: str = "messages"
    """Conversation column, used when a row has no prompt: the last message is learned."""


def completion_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (labels != -100) only."""
    return model(**batch).loss


def is_segments(completion) -> bool:
    """A completion given as (text, trainable) segments, e.g. a demonstrated episode
    `[["<calc>37*48</calc>", True], ["<r>1776</r>", False], ["1776", True]]`."""
    return (
        isinstance(completion, (list, tuple))
        and bool(completion)
        and all(
            isinstance(s, (list, tuple))
            and len(s) == 2
            and isinstance(s[0], str)
            and isinstance(s[1], bool)
            for s in completion
        )
    )


def encode_pair(tokenizer, prompt, completion, max_length: int | None = None) -> tuple:
    """(prompt ids, completion ids + EOS); prompts go through `encode_prompt` (chat templates).

    A segment completion (`is_segments`) gives a third list, the completion's labels: each
    segment is tokenized on its own (as an episode appends them), its ids are labels when it is
    trainable and -100 when not (an environment's reply); the EOS after the last is trainable.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    if is_segments(completion):
        completion_ids, labels = [], []
        for text, trainable in completion:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            completion_ids += ids
            labels += ids if trainable else [-100] * len(ids)
        completion_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        if max_length is not None:
            keep = max(0, max_length - len(prompt_ids))
            completion_ids, labels = completion_ids[:keep], labels[:keep]
        return prompt_ids, completion_ids, labels
    completion_ids = tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"]
    completion_ids = [*completion_ids, tokenizer.eos_token_id]
    if max_length is not None:
        completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
    return prompt_ids, completion_ids


def message_problem(value, what: str) -> str | None:
    """Why `value` is not a conversation (a non-empty list of {"role", "content": str}
    messages), or None when it is one; `what` names the value in the message."""
    if not isinstance(value, list) or not value:
        return f"{what} must be a non-empty list of messages, not {_shown(value)}"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return (
                f'{what}: message {j} must be an object {{"role", "content"}}, not '
                f"{_shown(message)}"
            )
        if not isinstance(message.get("role"), str):
            return f"{what}: message {j} has no 'role' string"
        if not isinstance(message.get("content"), str):
            return f"{what}: message {j} ({message['role']}) has no 'content' string"
    return None


def text_problem(value, what: str) -> str | None:
    """Why `value` is neither a string nor a conversation (`message_problem`), or None."""
    if isinstance(value, str):
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return message_problem(value, what)
    return f"{what} must be a string or a list of messages, not {_shown(value)}"


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _present(row: dict, name: str) -> bool:
    """A column the row has (a file mixing formats reads as None where a row lacks one)."""
    return row.get(name) is not None


def rows_to_pairs(
    rows: list[dict], data: PairColumns, field_name: str = "data.train"
) -> list[tuple]:
    """(prompt, completion) of every row, each row read in its own format ({prompt, completion}
    or {messages}); errors name the row and the field."""
    pairs = []
    for i, row in enumerate(rows):
        where = f"{field_name}: row {i}"
        if _present(row, data.prompt_field) and _present(row, data.completion_field):
            prompt, completion = row[data.prompt_field], row[data.completion_field]
            problem = text_problem(prompt, f"'{data.prompt_field}'")
            if problem is None and isinstance(completion, dict):
                completion = [completion]  # one assistant message
            if problem is None and not is_segments(completion):
                problem = text_problem(completion, f"'{data.completion_field}'")
                if problem is not None and "must be a string" in problem:
                    problem = (
                        f"'{data.completion_field}' must be a string, a list of messages or "
                        f"[text, trainable] segments, not {_shown(completion)}"
                    )
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
        elif _present(row, data.messages_field):
            messages = row[data.messages_field]
            problem = message_problem(messages, f"'{data.messages_field}'")
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
            if messages[-1]["role"] != "assistant":
                raise ConfigError(f"{where}: the conversation must end with an assistant message")
            prompt, completion = messages[:-1], messages[-1]["content"]
        else:
            present = [name for name, value in row.items() if value is not None]
            raise ConfigError(
                f"{where} needs '{data.prompt_field}' and '{data.completion_field}', "
                f"or '{data.messages_field}' (columns: {', '.join(present) or 'none'})"
            )
        if not completion or (not is_segments(completion) and not completion_text(completion)):
            raise ConfigError(f"{where} has an empty completion")
        pairs.append((prompt, completion))
    return pairs


def trainable_tokens(pair: tuple) -> int:
    """Completion tokens of an encoded pair (`encode_pair`) that the loss sees: labels that are
    not -100, less the first when the prompt is empty (no token predicts it)."""
    prompt_ids, completion_ids, *labels = pair
    kept = [t != -100 for t in (labels[0] if labels else completion_ids)]
    if not prompt_ids and kept:
        kept = kept[1:]
    return sum(kept)


def encode_rows(
    tokenizer, rows: list[dict], max_length: int | None, field_name: str = "data.train"
) -> list[tuple]:
    """`encode_pair` of every {prompt, completion} row, without the rows that `max_length`
    leaves no completion token to learn (one warning with their count); when that is every row,
    a ConfigError naming the first (nothing would train)."""
    pairs = [encode_pair(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
    empty = [i for i, pair in enumerate(pairs) if trainable_tokens(pair) == 0]
    if not empty:
        return pairs
    i = empty[0]
    first = (
        f"row {i}'s completion is cut away entirely by train.max_length={max_length} (its "
        f"prompt is {len(pairs[i][0])} tokens)"
        if max_length is not None
        else f"row {i} has no completion token to learn"
    )
    if len(empty) == len(pairs):
        raise ConfigError(
            f"{field_name}: {first}, and so is every other row's: nothing would train; raise "
            "train.max_length or shorten the prompts"
            if len(pairs) > 1
            else f"{field_name}: {first}: nothing would train; raise train.max_length"
        )
    log.warning(
        f"{field_name}: {len(empty)} of {len(pairs)} rows keep no completion token (first: "
        f"{first}); they are left out"
    )
    skip = set(empty)
    return [pair for j, pair in enumerate(pairs) if j not in skip]


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
