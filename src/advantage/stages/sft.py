"""Supervised fine-tuning (`advantage sft CONFIG.yaml`), loss on completion tokens only.

Rows are `{"prompt", "completion"}` (strings, or a conversational prompt and an assistant
message) or `{"messages": [...]}` ending with the assistant turn to learn. The training itself
is `advantage.engine.supervised.supervised_finetune`, which the demo's warm start runs too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..engine.configlib import ConfigError
from ..engine.data import load_rows
from ..engine.logger import MetricsLogger
from ..engine.models import (
    check_vocabulary,
    load_causal_lm,
    load_tokenizer,
    quiet_transformers,
)
from ..engine.supervised import (
    SFTSettings,
    StageLog,
    StageModel,
    eval_loss,
    stage_folder,
    supervised_finetune,
)
from ..engine.supervised_rows import PairColumns, encode_rows, rows_to_pairs
from ..tasks import model_paths, require_data, task_of


@dataclass
class SupervisedData(PairColumns):
    train: str | None = None
    """Rows (required): .jsonl, a local `datasets` folder/file, or builtin:TASK (teacher
    demonstrations)."""
    eval: str | None = None
    """Held-out rows (loss is reported on them at the end)."""


@dataclass
class SFTConfig:
    model: StageModel = field(default_factory=StageModel)
    data: SupervisedData = field(default_factory=SupervisedData)
    train: SFTSettings = field(default_factory=SFTSettings)
    log: StageLog = field(default_factory=StageLog)


def run_sft(cfg: SFTConfig) -> dict:
    """`advantage sft`: load, train with logging, report the held-out loss, save RUN_DIR/final.
    A run folder that holds a finished run is refused (`stage_folder`)."""
    quiet_transformers()
    run_dir = Path(cfg.log.run_dir)
    stage_folder(run_dir, "an SFT")
    # data first: a bad dataset fails before any model is loaded
    rows = _supervised_rows(require_data(cfg.data.train), cfg, "data.train")
    eval_rows = _supervised_rows(cfg.data.eval, cfg, "data.eval") if cfg.data.eval else []
    path, tokenizer_folder = model_paths(cfg.model)
    tokenizer = load_tokenizer(tokenizer_folder, cfg.model.trust_remote_code)
    # rows that truncation leaves nothing to learn fail (or are left out) before the model loads
    pairs = encode_rows(tokenizer, rows, cfg.train.max_length, "data.train")
    eval_pairs = encode_rows(tokenizer, eval_rows, cfg.train.max_length, "data.eval")
    model = load_causal_lm(path, cfg.model.trust_remote_code)
    check_vocabulary(
        tokenizer, model, "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    )
    logger = MetricsLogger(
        cfg.log.run_dir, cfg.train.steps, cfg.log.tensorboard, cfg.log.wandb, cfg.log.progress
    )
    logger.start(0)

    def on_step(step: int, metrics: dict) -> None:
        if step % cfg.log.every == 0 or step == cfg.train.steps:
            logger.log(step, metrics)

    try:
        stats = supervised_finetune(
            model, tokenizer, rows, cfg.train, on_step=on_step, encoded=pairs
        )
    finally:
        logger.close()
    if eval_pairs:
        stats["eval_loss"] = eval_loss(model, tokenizer, eval_pairs)
        logger.log(cfg.train.steps, {"eval/loss": stats["eval_loss"]})
    final = Path(cfg.log.run_dir) / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    stats["final"] = str(final)
    return stats


def _supervised_rows(spec: str, cfg: SFTConfig, field_name: str) -> list[dict]:
    task = task_of(spec, field_name)
    if task is not None:
        return task.sft_rows(cfg.train.steps * cfg.train.batch_size, seed=cfg.train.seed)
    rows = load_rows(spec, field_name)
    if not rows:
        raise ConfigError(f"{field_name}: the dataset is empty")
    return [{"prompt": p, "completion": c} for p, c in rows_to_pairs(rows, cfg.data, field_name)]
