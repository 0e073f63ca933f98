"""Reward-model training (`advantage rm CONFIG.yaml`) on preference pairs with the
Bradley–Terry loss `-log σ(r_chosen - r_rejected - margin)`.

The model is an `AutoModelForSequenceClassification` with one label, initialised from a causal
LM (usually the SFT model); the saved folder (`RUN_DIR/final`) is what `train` loads with
`reward.model`. Texts are `prompt + completion`, encoded exactly as the reward model is called
during RL (both go through `advantage.engine.reward_model`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import bradley_terry_loss
from ..engine.checkpoint import replace_folder
from ..engine.configlib import ConfigError, check_at_least, check_fraction
from ..engine.data import load_rows
from ..engine.logger import MetricsLogger
from ..engine.models import quiet_transformers
from ..engine.report import parse_jsonl
from ..engine.reward_model import load_reward_model, score
from ..engine.supervised import (
    StageLog,
    StageModel,
    StageSettings,
    batches,
    stage_folder,
)
from ..engine.supervised_rows import text_problem
from ..tasks import model_paths, require_data, task_of

log = logging.getLogger("advantage")


@dataclass
class PreferenceData:
    train: str | None = None
    """Pairs (required): .jsonl, a local `datasets` folder/file, or builtin:TASK (pairs from its
    verifier)."""
    eval: str | None = None
    """Held-out pairs (default for builtin tasks: pairs on the held-out strings; else a split)."""
    eval_fraction: float = 0.1
    """Share of `train` held out when `eval` is not given."""
    prompt_field: str = "prompt"
    """Prompt column (string or chat messages)."""
    chosen_field: str = "chosen"
    """Preferred completion column."""
    rejected_field: str = "rejected"
    """Dispreferred completion column."""
    margin_field: str | None = None
    """Optional column of margins m in -log σ(r_c - r_r - m)."""

    def __post_init__(self) -> None:
        check_fraction("data.eval_fraction", self.eval_fraction, closed_low=False)


@dataclass
class RMTrainSettings(StageSettings):
    steps: int = 300
    batch_size: int = 32
    """Pairs per step."""
    lr: float = 1e-5
    """Peak learning rate (AdamW): 1e-5 suits a pretrained model; a reward model from a tiny model
    trained from scratch wants ≈1e-4 (the `chain` command's)."""
    warmup_steps: int = 20


@dataclass
class RMConfig:
    model: StageModel = field(default_factory=StageModel)
    data: PreferenceData = field(default_factory=PreferenceData)
    train: RMTrainSettings = field(default_factory=RMTrainSettings)
    log: StageLog = field(default_factory=lambda: StageLog(run_dir="runs/rm"))
    pairs: int = 4096
    """Pairs drawn from a builtin task."""

    def __post_init__(self) -> None:
        check_at_least("pairs", self.pairs, 1)


def pair_scores(model, tokenizer, rows: list[dict], d: PreferenceData):
    """(r(chosen) `[N]`, r(rejected) `[N]`) of preference rows."""
    prompts = [r[d.prompt_field] for r in rows]
    chosen = score(model, tokenizer, prompts, [r[d.chosen_field] for r in rows])
    rejected = score(model, tokenizer, prompts, [r[d.rejected_field] for r in rows])
    return chosen, rejected


def preference_rows(cfg: RMConfig, spec: str, split: str) -> list[dict]:
    task = task_of(spec, f"data.{split}")
    if task is not None:
        return task.preference_rows(
            cfg.pairs if split == "train" else 400, split=split, seed=cfg.train.seed
        )
    rows = load_rows(spec, f"data.{split}")
    d = cfg.data
    if not rows:
        raise ConfigError(f"data.{split}: the dataset is empty")
    for i, row in enumerate(rows):
        for name in (d.prompt_field, d.chosen_field, d.rejected_field):
            if name not in row or row[name] in (None, "", []):
                raise ConfigError(f"data.{split}: row {i} has no (or an empty) '{name}' column")
            problem = text_problem(row[name], f"'{name}'")
            if problem is not None:
                raise ConfigError(f"data.{split}: row {i}: {problem}")
        if d.margin_field and not _is_number(row.get(d.margin_field)):
            raise ConfigError(
                f"data.{split}: row {i}'s margin ('{d.margin_field}') is "
                f"{row.get(d.margin_field)!r}, not a finite number"
            )
    same = sum(row[d.chosen_field] == row[d.rejected_field] for row in rows)
    if same:
        log.warning(
            f"data.{split}: {same} of {len(rows)} pairs have the same chosen and rejected "
            "answer: no preference, they teach nothing"
        )
    return rows


def _is_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def pairwise_accuracy(
    model, tokenizer, rows: list[dict], d: PreferenceData, batch_size: int = 64
) -> float:
    """Fraction of pairs where r(chosen) > r(rejected)."""
    model.eval()
    wins = 0
    for start in range(0, len(rows), batch_size):
        chosen, rejected = pair_scores(model, tokenizer, rows[start : start + batch_size], d)
        wins += int((chosen > rejected).sum())
    return wins / max(len(rows), 1)


def finished_rm(run_dir: str | Path) -> dict | None:
    """The results of the reward-model run in `run_dir` (as `run_rm` returns them) when it
    finished (its final/ and its held-out accuracies before and after are there), else None."""
    run_dir = Path(run_dir)
    if not (run_dir / "final" / "config.json").is_file():
        return None
    metrics = run_dir / "metrics.jsonl"
    records, _ = parse_jsonl(metrics) if metrics.is_file() else ([], [])
    evaluations = [r for _, r in records if "eval/pairwise_accuracy" in r]
    if not evaluations:
        return None
    first, last = evaluations[0], evaluations[-1]  # one, in a folder of an earlier version
    before = first["eval/pairwise_accuracy"] if len(evaluations) > 1 else float("nan")
    return {
        "eval_pairwise_accuracy": last["eval/pairwise_accuracy"],
        "eval_pairwise_accuracy_before": before,
        "eval_pairs": int(last.get("eval/pairs", 0)),  # a count (metrics.jsonl holds 10.0)
        "seconds": last.get("time/train", 0.0),
        "final": str(run_dir / "final"),
    }


def run_rm(cfg: RMConfig) -> dict:
    """`advantage rm`: train, evaluate pairwise accuracy on held-out pairs, save RUN_DIR/final.
    A run folder that holds a finished run is refused (`stage_folder`)."""
    quiet_transformers()
    d, t = cfg.data, cfg.train
    run_dir = Path(cfg.log.run_dir)
    stage_folder(run_dir, "a reward-model")
    torch.manual_seed(t.seed)
    rows = preference_rows(cfg, require_data(d.train), "train")  # before any model loads
    path, tokenizer_folder = model_paths(cfg.model)
    model, tokenizer = load_reward_model(
        path, cfg.model.trust_remote_code, new_head=True, tokenizer_path=tokenizer_folder
    )
    if d.eval is not None or task_of(d.train) is not None:
        eval_rows = preference_rows(cfg, d.eval or d.train, "eval")
    else:
        n_eval = max(1, int(len(rows) * d.eval_fraction))
        if n_eval >= len(rows):
            raise ConfigError(
                f"data.train: {len(rows)} pair(s) leave none to train on after holding out "
                f"data.eval_fraction={d.eval_fraction:g}; give more pairs, or data.eval"
            )
        generator = torch.Generator().manual_seed(t.seed)
        order = torch.randperm(len(rows), generator=generator).tolist()
        eval_rows, rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    accuracy_before = pairwise_accuracy(model, tokenizer, eval_rows, d)
    opt, sched = t.optimizer(model)
    logger = MetricsLogger(
        cfg.log.run_dir, t.steps, cfg.log.tensorboard, cfg.log.wandb, cfg.log.progress
    )
    logger.log(0, {"eval/pairwise_accuracy": accuracy_before, "eval/pairs": len(eval_rows)})
    logger.start(0)
    start = time.perf_counter()
    order = batches(len(rows), t.batch_size, t.seed)
    try:
        for step in range(1, t.steps + 1):
            model.train()
            chunk = [rows[i] for i in next(order)]
            chosen, rejected = pair_scores(model, tokenizer, chunk, d)
            margin = (
                torch.tensor([float(r[d.margin_field]) for r in chunk]) if d.margin_field else 0.0
            )
            loss = bradley_terry_loss(chosen, rejected, margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            opt.step()
            sched.step()
            if step % cfg.log.every == 0 or step == t.steps:
                logger.log(
                    step,
                    {
                        "loss": loss.item(),
                        "accuracy": float((chosen > rejected).float().mean()),
                        "margin": float((chosen - rejected).detach().mean()),
                        "lr": sched.get_last_lr()[0],
                    },
                )
    finally:
        logger.close()
    accuracy = pairwise_accuracy(model, tokenizer, eval_rows, d)
    seconds = time.perf_counter() - start
    tmp = run_dir / ".tmp-final"  # renamed into place: never half-written
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_folder(tmp, run_dir / "final")
    logger.log(  # last: with final/, it marks the run finished (`finished_rm`)
        t.steps,
        {"eval/pairwise_accuracy": accuracy, "eval/pairs": len(eval_rows), "time/train": seconds},
    )
    return finished_rm(run_dir)
