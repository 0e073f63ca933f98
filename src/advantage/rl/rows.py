"""The run's prompt rows: training and held-out rows loaded and checked, and checked against the
model's context before any training."""

from __future__ import annotations

import logging

from ..engine.configlib import ConfigError
from ..engine.data import check_prompts_fit, check_rows, is_conversational
from ..tasks import dataset_rows, eval_spec
from .config import Config

log = logging.getLogger("advantage")


def load_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The training rows (checked) and the held-out rows (`eval.size` of them)."""
    train_rows = dataset_rows(cfg.data.train, "data.train")
    check_rows(train_rows, cfg.data.prompt_field, "data.train")
    all_eval_rows = load_eval_rows(cfg)
    eval_rows = all_eval_rows[: cfg.eval.size]
    if eval_rows and cfg.eval.size > len(all_eval_rows):
        log.warning(
            "eval.size=%d: the held-out set has %d rows; evaluating all of them",
            cfg.eval.size,
            len(all_eval_rows),
        )
    d = cfg.data
    if d.system_prompt and not is_conversational(train_rows[0][d.prompt_field]):
        log.warning(
            "data.system_prompt is prepended to conversational prompts (lists of messages); "
            "data.train's prompts are plain text, so it is not used"
        )
    if not eval_rows and cfg.eval.size:
        log.warning(
            "data.eval is not set: no held-out set is evaluated, so result.eval_before and "
            "result.eval_after stay empty; give held-out prompts in data.eval (eval.size=0 "
            "silences this)"
        )
    return train_rows, eval_rows


def held_out_spec(cfg: Config) -> str | None:
    """The held-out data the run evaluates on: `data.eval`, or the built-in task's held-out
    split; None when the run does not evaluate (no such data, or `eval.size=0`)."""
    if cfg.eval.size <= 0:
        return None
    return cfg.data.eval if cfg.data.eval is not None else eval_spec(cfg.data.train)


def load_eval_rows(cfg: Config) -> list[dict]:
    spec = held_out_spec(cfg)
    if spec is None:
        return []
    rows = dataset_rows(spec, "data.eval")
    check_rows(rows, cfg.data.prompt_field, "data.eval")
    return rows


def check_context(cfg: Config, tokenizer, model_config, train_rows, eval_rows) -> None:
    """Prompt + completion fit in the model's positions (`max_position_embeddings`), before
    training: training prompts with `rollout.max_new_tokens`, held-out prompts with the
    evaluation's budget, both cut to `data.max_prompt_tokens` as sampling cuts them; the error
    names the first row that does not (`engine.data.check_prompts_fit`, as `advantage eval`)."""
    context = getattr(model_config, "max_position_embeddings", None)
    if context is None:
        return
    d, new = cfg.data, cfg.rollout.max_new_tokens
    budget = context - new
    where = f"the model's max_position_embeddings={context} minus rollout.max_new_tokens={new}"
    if budget < 1:
        raise ConfigError(f"rollout.max_new_tokens={new} leaves no room for a prompt: {where}")
    if d.max_prompt_tokens is not None and d.max_prompt_tokens > budget:
        raise ConfigError(
            f"data.max_prompt_tokens={d.max_prompt_tokens} does not fit: {where} leaves {budget}"
        )
    fit = dict(context=context, max_prompt_tokens=d.max_prompt_tokens)
    check_prompts_fit(
        tokenizer,
        train_rows,
        d.prompt_field,
        d.system_prompt,
        new_tokens=new,
        new_field="rollout.max_new_tokens",
        field="data.train",
        **fit,
    )
    check_prompts_fit(
        tokenizer,
        eval_rows,
        d.prompt_field,
        d.system_prompt,
        new_tokens=cfg.eval.max_new_tokens or new,
        new_field="eval.max_new_tokens" if cfg.eval.max_new_tokens else "rollout.max_new_tokens",
        field="data.eval",
        **fit,
    )
