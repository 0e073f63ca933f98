"""Checkpoints of an RL run: what to save beside the weights, resume, the final folder, and
turning any checkpoint into a plain Hugging Face folder (`advantage consolidate`).
The atomic, crash-safe writing itself is `advantage.engine.checkpoint`."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch

from ..engine import checkpoint as ckpt
from ..engine.configlib import ConfigError
from ..engine.models import load_causal_lm, load_tokenizer
from ..engine.parallel import barrier, is_fsdp, unwrap
from ..tasks import model_path
from .records import TrainState
from .setup import Run


def modules(run: Run) -> dict[str, torch.nn.Module]:
    out = {"policy": unwrap(run.policy)}
    if run.critic is not None:
        out["critic"] = unwrap(run.critic)
    # a frozen reference is rebuilt from the policy path; a synced one is saved
    if run.ref is not None and run.config.model.ref_sync_steps:
        out["reference"] = unwrap(run.ref)
    return out


def optimizers(run: Run) -> dict:
    out = {"policy_optimizer": run.optimizer, "policy_scheduler": run.scheduler}
    if run.critic_optimizer is not None:
        out.update(critic_optimizer=run.critic_optimizer, critic_scheduler=run.critic_scheduler)
    return out


def save(run: Run, state: TrainState) -> Path:
    """Every rank calls this (FSDP2 writes shards from every rank)."""
    trainer_state = {
        "step": state.step,
        "world_size": run.dist.world_size,
        "data": run.prompts.state_dict(),
        "baseline": run.baseline.state_dict(),
        "kl_controller": run.kl_ctl.state_dict(),
        "reward_sources": {
            s.name: s.fn.state_dict() for s in run.rewards.sources if hasattr(s.fn, "state_dict")
        },
        "nonfinite_in_a_row": state.nonfinite_in_a_row,
        "config": dataclasses.asdict(run.config),
    }
    return ckpt.save_checkpoint(
        run.run_dir,
        state.step,
        modules(run),
        optimizers(run),
        trainer_state,
        run.config.checkpoint.keep,
        rank=run.dist.rank,
        sharded=is_fsdp(run.policy),
    )


def maybe_resume(run: Run, state: TrainState) -> Path | None:
    """Find the checkpoint to resume from (`checkpoint.resume`), load it into `run` and `state`.
    Records logged after the checkpoint (all of them when the run starts from step 0) are
    dropped: the steps are redone and logged again."""
    resume = run.config.checkpoint.resume
    existing = ckpt.latest_checkpoint(run.run_dir)
    if resume == "none":
        if existing is not None:
            raise ConfigError(
                f"log.run_dir {str(run.run_dir)!r} already holds checkpoints ({existing.name}); "
                "set checkpoint.resume=auto to continue that run, or choose a new log.run_dir "
                "(nothing is overwritten)"
            )
        return None
    path = existing if resume == "auto" else Path(resume)
    if path is None:
        if run.dist.is_main:  # an earlier attempt that died before its first checkpoint
            _truncate_jsonl(run.run_dir / "metrics.jsonl", -1)
            _truncate_jsonl(run.run_dir / "samples.jsonl", -1)
        return None
    try:
        saved = ckpt.load_checkpoint(path, modules(run), optimizers(run), rank=run.dist.rank)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    state.step = int(saved["step"])
    state.nonfinite_in_a_row = int(saved["nonfinite_in_a_row"])
    run.prompts.load_state_dict(saved["data"])
    run.baseline.load_state_dict(saved["baseline"])
    run.kl_ctl.load_state_dict(saved["kl_controller"])
    for source in run.rewards.sources:
        if hasattr(source.fn, "load_state_dict"):
            source.fn.load_state_dict(saved.get("reward_sources", {}).get(source.name, {}))
    if run.dist.is_main:
        _truncate_jsonl(run.run_dir / "metrics.jsonl", state.step)
        _truncate_jsonl(run.run_dir / "samples.jsonl", state.step)
    return path


def save_final(run: Run) -> Path:
    """The policy as a plain Hugging Face folder (`RUN_DIR/final`); every rank calls this."""
    final = run.run_dir / "final"
    model = unwrap(run.policy)
    if is_fsdp(run.policy):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(run.policy, options=options)
        if run.dist.is_main:
            model.save_pretrained(final, state_dict=full)
    elif run.dist.is_main:
        model.save_pretrained(final)  # a LoRA policy writes its adapter
        if hasattr(model, "merge_and_unload"):
            merged = run.run_dir / "final-merged"
            copy.deepcopy(model).merge_and_unload().save_pretrained(merged)
            run.tokenizer.save_pretrained(merged)
    if run.dist.is_main:
        run.tokenizer.save_pretrained(final)
    barrier()
    return final


def consolidate(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A checkpoint (sharded or not) → a plain Hugging Face model folder (`from_pretrained`)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a complete checkpoint folder")
    model_cfg = json.loads(state_path.read_text())["config"]["model"]
    base = model_path(model_cfg["name_or_path"])
    model = load_causal_lm(base, model_cfg.get("trust_remote_code", False))
    model.load_state_dict(ckpt.load_policy_weights(checkpoint, model))
    model.save_pretrained(out_dir)
    load_tokenizer(model_cfg.get("tokenizer") or base).save_pretrained(out_dir)
    return out_dir


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (steps that the resumed run will redo); atomic."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["step"] <= last_step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
