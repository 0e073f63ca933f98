"""Resuming an RL run from its checkpoints (`checkpointing.py` saves them): which checkpoint,
the config changes it can follow, a damaged one's fallback, a rewind's abandoned trajectory, a new
number of processes, and the run's logs cut back to the resumed step."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..engine import checkpoint as ckpt
from ..engine.configlib import ConfigError
from ..engine.parallel import barrier, global_sums
from ..engine.report import lines_text, parse_jsonl
from .checkpointing import modules, optimizers
from .config import Config
from .config_changes import ON_OPTIMIZER, Change, config_changes, resume_view, saved_algorithm
from .records import TrainState
from .setup import Run, set_seed

log = logging.getLogger("advantage")


def resume_candidates(config: Config, *, is_main: bool = True) -> list[Path]:
    """The checkpoints to try, newest first (`checkpoint.resume`). Needs no model: it refuses a
    new run over old checkpoints, and a config the newest checkpoint cannot continue under,
    before anything loads. Rank 0 (holding the run's lock) also deletes what killed runs left
    half-written (dot-folders)."""
    run_dir, resume = Path(config.log.run_dir), config.checkpoint.resume
    if is_main:
        ckpt.remove_stale(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    if not found and ((run_dir / "final").exists() or (run_dir / ckpt.FINISHED).exists()):
        finished = (run_dir / ckpt.FINISHED).exists()
        what = f"a finished run ({ckpt.FINISHED})" if finished else "a trained model (final/)"
        raise ConfigError(
            f"log.run_dir {str(run_dir)!r} already holds {what} and no checkpoint to continue "
            "it from; choose a new log.run_dir (nothing is overwritten)"
        )
    if resume == "none":
        if found:
            raise ConfigError(
                f"log.run_dir {str(run_dir)!r} already holds checkpoints ({found[-1].name}); "
                "set checkpoint.resume=auto to continue that run, or choose a new log.run_dir "
                "(nothing is overwritten)"
            )
        return []
    candidates = found[::-1] if resume == "auto" else [Path(resume)]
    for path in candidates:  # the newest whose trainer_state.json reads
        try:
            saved = ckpt.read_file(path / "trainer_state.json")
        except ckpt.CheckpointError:
            continue
        check_config(saved, config, path)
        break
    return candidates


def check_config(saved: dict, config: Config, path: Path) -> list[Change]:
    """Refuse (ConfigError, one line) what the saved state cannot follow; return the rest."""
    now = resume_view(dataclasses.asdict(config), dataclasses.asdict(config.algorithm_spec()))
    refused, applied = config_changes(resume_view(saved["config"], saved_algorithm(saved)), now)
    if refused:
        raise ConfigError(
            f"checkpoint.resume: {path} was saved with a different setup, which its state cannot "
            f"continue under: {', '.join(map(str, refused))}; undo these changes to resume, or "
            "start a new run (checkpoint.resume=none and a new log.run_dir)"
        )
    return applied


def resume(run: Run, state: TrainState, candidates: list[Path]) -> Path | None:
    """Load the newest loadable candidate into `run` and `state`; a damaged one (truncated,
    torn, missing file) is moved to `damaged-step-N` and the previous one is tried, on every
    rank together. Reports config changes applied on resume."""
    damaged = []
    for path in candidates:
        try:
            saved = ckpt.load_checkpoint(path, modules(run), optimizers(run), rank=run.dist.rank)
            error = ""
        except FileNotFoundError as e:  # an explicit checkpoint.resume that is not one
            raise ConfigError(str(e)) from None
        except ckpt.CheckpointError as e:
            saved, error = None, str(e)
        if global_sums([float(saved is None)])[0]:  # every rank falls back together
            damaged.append(f"{path.name} is damaged ({error or 'on another rank'})")
            if run.dist.is_main and run.config.checkpoint.resume == "auto":
                kept = path.with_name("damaged-" + path.name)
                shutil.rmtree(kept, ignore_errors=True)  # an older damaged copy of this step
                path.rename(kept)
            continue
        say = log.warning if run.dist.is_main else (lambda text: None)
        if run.dist.is_main:  # before _restore drops the later steps' records
            _set_aside_later_work(run.run_dir, int(saved["step"]), say)
        barrier()  # every rank then reads the same finished mark
        _restore(run, state, saved)
        _new_processes(run, state, saved, path, say)
        if damaged:
            say(
                f"checkpoint {'; '.join(damaged)}; resuming from the previous complete one, "
                f"{path.name} (a damaged checkpoint is kept as damaged-step-…)"
            )
        applied = check_config(saved, run.config, path)
        if applied:
            _set_optimizers(run, applied)
            say(
                f"resuming {path.name} with config changes: {', '.join(map(str, applied))}"
                + _queued_note(state, applied)
            )
        return path
    if damaged:
        raise ConfigError(
            f"checkpoint.resume: no checkpoint could be loaded: {'; '.join(damaged)}; "
            "start a new run (checkpoint.resume=none and a new log.run_dir)"
        )
    if run.dist.is_main:  # an earlier attempt that died before its first checkpoint
        _truncate_jsonl(run.run_dir / "metrics.jsonl", -1)
        _truncate_jsonl(run.run_dir / "samples.jsonl", -1)
        (run.run_dir / ckpt.FINISHED).unlink(missing_ok=True)  # a mark with nothing behind it
    return None


def _queued_note(state: TrainState, applied: list[Change]) -> str:
    """What the resume line adds when an asynchronous checkpoint's queued batches (sampled and
    scored before it) will be trained on as they are, under sampling or reward settings that
    have changed since."""
    queued = len((state.pending or {}).get("queue", []))
    changed = [c.key for c in applied if c.key.startswith(("rollout.", "reward."))]
    if not queued or not changed:
        return ""
    steps = f"{state.step + 1}" + (f"–{state.step + queued}" if queued > 1 else "")
    return (
        f" (steps {steps} train the {queued} batch(es) sampled and scored before the checkpoint, "
        f"under the old {', '.join(changed)})"
    )


def _new_processes(run: Run, state: TrainState, saved: dict, path: Path, say) -> None:
    """Resumed with another number of processes: say so; a rank the checkpoint has no RNG
    state for draws from its own seed (`train.seed`, its rank and the step) — never another
    rank's stream (ranks sampling the same noise would shrink the batch, unseen)."""
    before, now = int(saved.get("world_size", 1)), run.dist.world_size
    if not (path / f"rng-rank{run.dist.rank}.pt").exists():
        set_seed(run.config.train.seed + run.dist.rank + 1_000_003 * state.step)
    if before != now:
        say(
            f"resuming step {state.step}, saved by {before} process(es), in {now}: each rank's "
            "prompts and sampling noise differ from an uninterrupted run's"
            + (" (the new ranks draw from their own seeds)" if now > before else "")
        )


def _set_aside_later_work(run_dir: Path, step: int, say) -> None:
    """A rewind (resuming an older checkpoint of this run): the checkpoints after `step`, the
    final model, report and finished mark of the abandoned trajectory move to
    `RUN_DIR/abandoned-<time>-<n>/`, with a copy of its metrics and samples (the run's own are
    cut back to `step`): kept, not deleted, and a later `checkpoint.resume=auto` continues the
    new trajectory, not the old one."""
    later = [p for p in ckpt.list_checkpoints(run_dir) if ckpt.checkpoint_step(p) > step]
    marked = ckpt.finished_step(run_dir)
    if not later and (marked is None or marked <= step):
        return
    names = ("final", "final-merged", "report", ckpt.FINISHED)
    moved = later + [run_dir / name for name in names if (run_dir / name).exists()]
    aside = Path(
        tempfile.mkdtemp(prefix=f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-", dir=run_dir)
    )
    for part in moved:
        part.rename(aside / part.name)
    for log_name in ("metrics.jsonl", "samples.jsonl"):
        if (run_dir / log_name).is_file():
            shutil.copy2(run_dir / log_name, aside / log_name)
    say(
        f"resuming step {step} of {run_dir}, which had gone further: its later work "
        f"({', '.join(p.name for p in moved)}, and its logs) moved to {aside}"
    )


def _restore(run: Run, state: TrainState, saved: dict) -> None:
    """Everything beside the weights and optimizers: step, data position, baseline, KL
    controller, reward sources; drop the metrics of steps the run will redo."""
    state.step = int(saved["step"])
    state.nonfinite_in_a_row = int(saved["nonfinite_in_a_row"])
    state.pending = (saved.get("extra") or {}).get("async")
    run.prompts.load_state_dict(saved["data"])
    run.baseline.load_state_dict(saved["baseline"])
    run.kl_ctl.load_state_dict(saved["kl_controller"])
    for source in run.rewards.sources:
        if hasattr(source.fn, "load_state_dict"):
            source.fn.load_state_dict(saved.get("reward_sources", {}).get(source.name, {}))
    if run.dist.is_main:
        _truncate_jsonl(run.run_dir / "metrics.jsonl", state.step)
        _truncate_jsonl(run.run_dir / "samples.jsonl", state.step)


def _set_optimizers(run: Run, applied: list[Change]) -> None:
    """Write changed optimizer settings into the restored optimizers (their saved values would
    win): the rate through the schedule's factor at the restored position, betas, ε, decay."""
    if not any(c.key in ON_OPTIMIZER for c in applied):
        return
    t = run.config.train
    pairs = [(run.optimizer, run.scheduler, t.lr)]
    if run.critic_optimizer is not None:
        pairs.append((run.critic_optimizer, run.critic_scheduler, t.critic_lr))
    for optimizer, scheduler, lr in pairs:
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group.update(
                initial_lr=lr,
                lr=lr * factor(scheduler.last_epoch),
                betas=tuple(t.adam_betas),
                eps=t.adam_eps,
                weight_decay=t.weight_decay,
            )
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # get_last_lr()


def drop_evaluation(path: Path, step: int) -> None:
    """Drop the evaluation-only record of `step` (the evaluation after RL of a run killed
    before its end was complete, which finishing logs again); atomic."""
    if not path.is_file():
        return
    records, _ = parse_jsonl(path)
    _rewrite(path, [line for line, r in records if not (r["step"] == step and _evaluation_only(r))])


def _evaluation_only(record: dict) -> bool:
    return all(k in ("step", "time") or k.startswith("eval/") for k in record)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records logged after `last_step` (steps that the resumed run will redo), and lines
    that are not JSON (a write torn by a crash or a full disk), saying so; atomic."""
    if not path.is_file():
        return
    records, torn = parse_jsonl(path)
    if torn:
        log.warning(
            f"{path}: removed {lines_text(torn)} that {'is' if len(torn) == 1 else 'are'} not valid JSON (a torn write)"
        )
    _rewrite(path, [line for line, record in records if record["step"] <= last_step])


def _rewrite(path: Path, lines: list[str]) -> None:
    """`path` holding `lines`, replaced atomically."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
