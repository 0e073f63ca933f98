"""Checkpoints of an RL run: what to save beside the weights, the final folder, and turning any
checkpoint into a plain Hugging Face folder (`advantage consolidate`). Resuming from them is
`resuming.py`; the atomic, crash-safe writing itself is `advantage.engine.checkpoint`."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch

from ..engine import checkpoint as ckpt
from ..engine.models import add_lora, load_causal_lm, load_tokenizer
from ..engine.parallel import barrier, is_fsdp, unwrap
from ..tasks import model_path
from .records import TrainState
from .setup import Run

log = logging.getLogger("advantage")


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


def save(run: Run, state: TrainState, extra: dict | None = None) -> Path:
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
        "algorithm": dataclasses.asdict(run.algo),
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
        extra=extra,
    )


def save_final(run: Run) -> Path:
    """The policy as a plain Hugging Face folder (`RUN_DIR/final`; a LoRA policy: its adapter,
    and `final-merged`), each written beside and renamed into place: a kill never leaves one
    half-written. Every rank calls this."""
    final = run.run_dir / "final"
    tmp = run.run_dir / ".tmp-final"
    model = unwrap(run.policy)
    if run.dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if is_fsdp(run.policy):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(run.policy, options=options)
        if run.dist.is_main:
            model.save_pretrained(tmp, state_dict=full)
    elif run.dist.is_main:
        model.save_pretrained(tmp)  # a LoRA policy writes its adapter
        if hasattr(model, "merge_and_unload"):
            merged = run.run_dir / ".tmp-final-merged"
            shutil.rmtree(merged, ignore_errors=True)
            copy.deepcopy(model).merge_and_unload().save_pretrained(merged)
            run.tokenizer.save_pretrained(merged)
            ckpt.replace_folder(merged, run.run_dir / "final-merged")
    if run.dist.is_main:
        run.tokenizer.save_pretrained(tmp)
        ckpt.replace_folder(tmp, final)
    barrier()
    return final


def consolidate(
    checkpoint: str | Path, out_dir: str | Path, *, trust_remote_code: bool = False
) -> Path:
    """A checkpoint (sharded or not) → a plain Hugging Face model folder (`from_pretrained`);
    a LoRA run's checkpoint: its adapters merged into the base (as `final-merged`).

    The base model is the one the checkpoint names; code from it runs only when the caller
    passes `trust_remote_code=True`: a checkpoint's own trainer_state.json (which anyone who
    shares the checkpoint wrote) never enables it."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state_path = checkpoint / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a complete checkpoint folder")
    model_cfg = json.loads(state_path.read_text())["config"]["model"]
    base = model_path(model_cfg["name_or_path"])
    model = load_causal_lm(base, trust_remote_code)
    if model_cfg.get("lora") is not None:  # the saved keys are the peft model's
        model = add_lora(model, model_cfg["lora"])
    model.load_state_dict(ckpt.load_policy_weights(checkpoint, model))
    if model_cfg.get("lora") is not None:
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    load_tokenizer(model_cfg.get("tokenizer") or base, trust_remote_code).save_pretrained(out_dir)
    return out_dir
