"""The commands of `advantage` (one function each, `args` from `cli.build_parser`); imports
are inside the functions so that `advantage --help` and argument errors stay fast."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path


class WriteError(Exception):
    """A command could not write its output (full disk, read-only folder, no permission)."""


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


@contextmanager
def _writing(where: str | Path):
    """Disk errors while a command writes under `where`, as one line instead of a traceback.
    (torch.save reports a full disk as a RuntimeError of its zip writer, without the path.)"""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        reason = os.strerror(e.errno).lower()
        raise WriteError(
            f"cannot write {e.filename or where}: {reason}; free space or choose another folder"
        ) from None
    except RuntimeError as e:
        text = str(e)
        if "inline_container" not in text and "PytorchStreamWriter" not in text:
            raise
        raise WriteError(
            f"cannot write {where}: the disk is full or not writable (torch.save: "
            f"{text.strip().splitlines()[0]}); free space or choose another folder"
        ) from None


def cmd_presets(args: argparse.Namespace) -> int:
    from .core.presets import preset_table

    print(preset_table())
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    import dataclasses

    from .core.presets import PRESETS, resolve_axes
    from .engine.config_files import load_config
    from .engine.configlib import ConfigError
    from .rl.config import AlgoConfig

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    axes = load_config(AlgoConfig, None, args.overrides)  # names and types checked
    try:
        print(resolve_axes(args.preset, dataclasses.asdict(axes)).card())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def _split_config_arg(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] key=value ...` → (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from .rl.config import load_config
    from .rl.trainer import train

    cfg = load_config(*_split_config_arg(args.args))
    with _writing(cfg.log.run_dir):
        train(cfg)
    return 0


def cmd_rollout_worker(args: argparse.Namespace) -> int:
    from .rl.async_rollout import run_remote_worker
    from .rl.config import load_config

    run_remote_worker(load_config(*_split_config_arg(args.args)), args.connect, args.threads)
    return 0


DEMOS = {"reverse": "demo.yaml", "calculator": "calculator.yaml"}


def cmd_demo(args: argparse.Namespace) -> int:
    import time
    from importlib.resources import files

    from .rl.config import load_config
    from .rl.trainer import train

    for task in DEMOS if args.task == "all" else [args.task]:
        start = time.perf_counter()
        cfg = load_config(str(files("advantage") / "recipes" / DEMOS[task]), args.overrides)
        with _writing(cfg.log.run_dir):
            result = train(cfg)
        before, after = result.eval_before, result.eval_after
        print(
            f"{task}: wall time {time.perf_counter() - start:.0f}s (warm start included when it "
            f"was built); run folder {result.run_dir}"
        )
        if "eval/tool_call_rate" in before:
            rate = before["eval/tool_call_rate"], after["eval/tool_call_rate"]
            print(f"{task}: tool-call rate: {100 * rate[0]:.1f}% -> {100 * rate[1]:.1f}%")
        if "eval/accuracy" in before:
            accuracy = before["eval/accuracy"], after["eval/accuracy"]
            print(
                f"{task}: held-out accuracy: {100 * accuracy[0]:.1f}% -> {100 * accuracy[1]:.1f}%"
            )
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .engine.config_files import load_config
    from .stages.sft import SFTConfig, run_sft

    cfg = load_config(SFTConfig, *_split_config_arg(args.args))
    with _writing(cfg.log.run_dir):
        stats = run_sft(cfg)
    print(
        f"SFT done in {stats['seconds']:.0f}s: final loss {stats['loss']:.4f}"
        + (f", held-out loss {stats['eval_loss']:.4f}" if "eval_loss" in stats else "")
        + f"; model in {stats['final']}"
    )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .engine.config_files import load_config
    from .stages.rm import RMConfig, run_rm

    cfg = load_config(RMConfig, *_split_config_arg(args.args))
    with _writing(cfg.log.run_dir):
        stats = run_rm(cfg)
    print(
        f"reward model trained in {stats['seconds']:.0f}s: held-out pairwise accuracy "
        f"{100 * stats['eval_pairwise_accuracy_before']:.1f}% -> {100 * stats['eval_pairwise_accuracy']:.1f}% "
        f"on {stats['eval_pairs']} pairs; model in {stats['final']}"
    )
    return 0


def cmd_chain(args: argparse.Namespace) -> int:
    from .stages.chain import run_chain

    with _writing(args.run_dir):
        run_chain(args.run_dir, args.overrides)
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from .engine.checkpoint import list_checkpoints
    from .engine.configlib import ConfigError, new_folder
    from .rl.checkpointing import consolidate

    folder = Path(args.checkpoint)
    if not (folder / "trainer_state.json").is_file():
        found = list_checkpoints(folder) if folder.is_dir() else []
        if found:
            raise ConfigError(
                f"CHECKPOINT {str(folder)!r} is a run folder, not a checkpoint; give one of its "
                f"checkpoints: {', '.join(str(p) for p in found)}"
            )
        what = "is not a complete checkpoint folder" if folder.exists() else "does not exist"
        raise ConfigError(
            f"CHECKPOINT {str(folder)!r} {what} (expected RUN_DIR/checkpoints/step-NNNNNN)"
        )
    new_folder(args.out)  # never over a run's final, a checkpoint, the adapter
    with _writing(args.out):
        out = consolidate(folder, args.out, trust_remote_code=args.trust_remote_code)
    print(f"wrote a Hugging Face model folder: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .engine.configlib import ConfigError
    from .engine.report import make_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        what = "has no metrics.jsonl (not a run folder?)" if run_dir.is_dir() else "does not exist"
        raise ConfigError(f"RUN_DIR {args.run_dir!r} {what}")
    with _writing(run_dir / "report"):
        print(f"wrote {make_report(run_dir)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from .stages.sweep import run_sweep

    path, overrides = _split_config_arg(args.args)
    presets = None
    if args.presets:  # `--presets grpo rloo key=value` took the overrides after it
        overrides += [p for p in args.presets if "=" in p]
        presets = [p for p in args.presets if "=" not in p] or None
    overrides += args.extra
    manifest = run_sweep(
        path,
        presets=presets,
        grid=args.grid,
        seeds=args.seeds,
        out=args.out,
        overrides=overrides,
        parallel=args.parallel,
        cores=args.cores,
        target=args.target,
        command="advantage " + shlex.join(args.argv),
    )
    failed = [
        run["run_dir"]
        for c in manifest["configurations"]
        for run in c["runs"]
        if run["status"] != "finished"
    ]
    if failed:
        print(f"error: {len(failed)} runs did not finish: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .stages.compare import make_compare

    print(f"wrote {make_compare(args.dirs, args.out, target=args.target)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .stages.evaluate import evaluate_model

    result = evaluate_model(
        args.model,
        args.dataset,
        reward_functions=args.reward or None,
        prompt_field=args.prompt_field,
        max_new_tokens=args.max_new_tokens,
        pass_k=args.pass_k,
        size=args.size,
        threshold=args.threshold,
        temperature=args.temperature,
    )
    print(json.dumps(result, indent=1))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import json

    from peft import PeftModel

    from .engine.configlib import ConfigError, new_folder
    from .engine.models import load_causal_lm, load_tokenizer
    from .tasks import model_path

    new_folder(args.out)
    settings = Path(args.adapter) / "adapter_config.json"
    if not settings.is_file():
        raise ConfigError(
            f"ADAPTER {args.adapter!r} is not a LoRA adapter folder (no adapter_config.json; a "
            "LoRA run writes its adapter to RUN_DIR/final)"
        )
    base = args.base or json.loads(settings.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{settings} names no base model; give it: --base MODEL")
    base = model_path(base, "--base" if args.base else "the adapter's base model (or --base)")
    model = PeftModel.from_pretrained(load_causal_lm(base), args.adapter)
    with _writing(args.out):
        model.merge_and_unload().save_pretrained(args.out)
        load_tokenizer(args.adapter).save_pretrained(args.out)
    print(f"wrote a merged model folder: {args.out}")
    return 0


def cmd_init_model(args: argparse.Namespace) -> int:
    from .tasks.tiny import make_tiny_model

    with _writing(args.out):
        out = make_tiny_model(args.out, args.size, args.chars, args.seed)
    print(
        f"wrote a freshly initialised {args.size} Qwen2 and a character tokenizer to {out} "
        f"(model.name_or_path={out}; warm it up with `advantage sft` at train.lr=1e-3)"
    )
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from .docs import GENERATED, docs_folder

    out = docs_folder(args.out)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for name, make in GENERATED.items():
            (out / name).write_text(make())
            print(f"wrote {out / name}")
    return 0
