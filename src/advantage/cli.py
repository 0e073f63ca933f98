"""Command line: `advantage <command> ...` (also `python -m advantage`)."""

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


def _presets(args: argparse.Namespace) -> int:
    from .core.algorithm import preset_table

    print(preset_table())
    return 0


def _card(args: argparse.Namespace) -> int:
    import dataclasses

    from .core import PRESETS, resolve
    from .engine.configlib import ConfigError, load_config
    from .rl.config import AlgoConfig

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    axes = load_config(AlgoConfig, None, args.overrides)  # names and types checked
    overrides = {k: v for k, v in dataclasses.asdict(axes).items() if v is not None}
    try:
        print(resolve(args.preset, **overrides).card())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return 0


def _split_config_arg(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] key=value ...` → (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _train(args: argparse.Namespace) -> int:
    from .rl.config import load_config
    from .rl.trainer import train

    cfg = load_config(*_split_config_arg(args.args))
    with _writing(cfg.log.run_dir):
        train(cfg)
    return 0


def _rollout_worker(args: argparse.Namespace) -> int:
    from .rl.async_rollout import run_remote_worker
    from .rl.config import load_config

    run_remote_worker(load_config(*_split_config_arg(args.args)), args.connect, args.threads)
    return 0


DEMOS = {"reverse": "demo.yaml", "calculator": "calculator.yaml"}


def _demo(args: argparse.Namespace) -> int:
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
        accuracy = before["eval/accuracy"], after["eval/accuracy"]
        print(f"{task}: held-out accuracy: {100 * accuracy[0]:.1f}% -> {100 * accuracy[1]:.1f}%")
    return 0


def _sft(args: argparse.Namespace) -> int:
    from .engine.configlib import load_config
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


def _rm(args: argparse.Namespace) -> int:
    from .engine.configlib import load_config
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


def _chain(args: argparse.Namespace) -> int:
    from .stages.chain import run_chain

    with _writing(args.run_dir):
        run_chain(args.run_dir, args.overrides)
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from .engine.checkpoint import list_checkpoints
    from .engine.configlib import ConfigError
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
    with _writing(args.out):
        out = consolidate(folder, args.out, trust_remote_code=args.trust_remote_code)
    print(f"wrote a Hugging Face model folder: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .engine.configlib import ConfigError
    from .engine.report import make_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        what = "has no metrics.jsonl (not a run folder?)" if run_dir.is_dir() else "does not exist"
        raise ConfigError(f"RUN_DIR {args.run_dir!r} {what}")
    with _writing(run_dir / "report"):
        print(f"wrote {make_report(run_dir)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
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


def _compare(args: argparse.Namespace) -> int:
    from .stages.compare import make_compare

    print(f"wrote {make_compare(args.dirs, args.out, target=args.target)}")
    return 0


def _eval(args: argparse.Namespace) -> int:
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


def _merge(args: argparse.Namespace) -> int:
    from peft import AutoPeftModelForCausalLM

    from .engine.models import load_tokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(args.adapter)
    with _writing(args.out):
        model.merge_and_unload().save_pretrained(args.out)
        load_tokenizer(args.adapter).save_pretrained(args.out)
    print(f"wrote a merged model folder: {args.out}")
    return 0


def _init_model(args: argparse.Namespace) -> int:
    from .tasks.tiny import make_tiny_model

    with _writing(args.out):
        out = make_tiny_model(args.out, args.size, args.chars, args.seed)
    print(
        f"wrote a freshly initialised {args.size} Qwen2 and a character tokenizer to {out} "
        f"(model.name_or_path={out}; warm it up with `advantage sft` at train.lr=1e-3)"
    )
    return 0


def _docs(args: argparse.Namespace) -> int:
    from .docs import GENERATED, docs_folder

    out = docs_folder(args.out)
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for name, make in GENERATED.items():
            (out / name).write_text(make())
            print(f"wrote {out / name}")
    return 0


class _Parser(argparse.ArgumentParser):
    """A command's parser whose `--help` ends with the command's config keys, generated from its
    dataclasses only when asked: importing them imports torch, which `advantage --help` and
    argument errors must not wait for."""

    config_command: str | None = None

    def format_help(self) -> str:
        if self.config_command and self.epilog is None:
            from .docs import help_epilog

            self.epilog = help_epilog(self.config_command)
        return super().format_help()


def _config_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.config_command = name
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advantage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("presets", help="print the preset table (markdown)")
    p.set_defaults(func=_presets)
    p = sub.add_parser("card", help="print the algorithm card of a preset, with overrides")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="axis=value, e.g. scope=batch clip_high=0.28")
    p.set_defaults(func=_card)
    p = _config_command(sub, "train", "train: advantage train CONFIG.yaml [key=value ...]")
    p.set_defaults(func=_train)
    p = sub.add_parser(
        "rollout-worker",
        help="an asynchronous rollout worker for a trainer elsewhere (distributed.rollout_address)",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value")
    p.add_argument("--connect", required=True, help="HOST:PORT of the trainer")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_rollout_worker)
    p = sub.add_parser(
        "demo", help="warm-start tiny models and train them on the built-in tasks (both by default)"
    )
    p.add_argument("--task", choices=["all", *DEMOS], default="all")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipes")
    p.set_defaults(func=_demo)
    p = _config_command(sub, "sft", "supervised fine-tuning: advantage sft CONFIG.yaml [key=value]")
    p.set_defaults(func=_sft)
    p = _config_command(sub, "rm", "reward-model training on preference pairs (Bradley–Terry)")
    p.set_defaults(func=_rm)
    p = sub.add_parser(
        "chain", help="built-in SFT → reward model → PPO with the learned reward model"
    )
    p.add_argument("--run-dir", default="runs/chain")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the PPO stage")
    p.set_defaults(func=_chain)
    p = sub.add_parser("consolidate", help="a checkpoint (sharded or not) → a Hugging Face folder")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-NNNNNN")
    p.add_argument("out", help="output folder (loads with from_pretrained)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base model's own code run (never taken from the checkpoint)",
    )
    p.set_defaults(func=_consolidate)
    p = sub.add_parser("report", help="PNG plots and an HTML page of a run (RUN_DIR/report)")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)
    p = sub.add_parser(
        "sweep",
        help="every preset × grid point × seed as an ordinary run, then the comparison page",
        description="Example: advantage sweep CONFIG.yaml --presets grpo rloo "
        "--grid scope=group,batch --seeds 3 --parallel 2 --out runs/sweep train.steps=60. "
        "Runs go to OUT/NAME/seed-S; a rerun skips finished runs and resumes the others.",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value")
    p.add_argument("--presets", nargs="+", help="presets to compare (default: the config's)")
    p.add_argument(
        "--grid",
        nargs="+",
        default=[],
        metavar="AXIS=V1,V2",
        help="more axes: scope=group,batch (an algorithm axis) or train.lr=1e-4,3e-4; "
        "an axis of one value is a setting of every run",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every configuration")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (subprocesses)")
    p.add_argument(
        "--cores", type=int, default=None, help="cores to share (default: all this process may use)"
    )
    p.add_argument("--out", default="runs/sweep", help="the sweep folder")
    p.add_argument("--target", type=float, default=0.9, help="held-out accuracy to reach")
    p.set_defaults(func=_sweep)
    p = sub.add_parser(
        "compare", help="a page comparing runs or sweeps over seeds (DIR/compare/index.html)"
    )
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", default=None, help="output folder (default: the first DIR/compare)")
    p.add_argument("--target", type=float, default=0.9, help="held-out accuracy to reach")
    p.set_defaults(func=_compare)
    p = sub.add_parser("eval", help="greedy accuracy and pass@k of MODEL on DATASET")
    p.add_argument("model", help="model folder, hub id, or builtin:NAME")
    p.add_argument("dataset", help=".jsonl, a local datasets folder/file, or builtin:TASK[:eval]")
    p.add_argument(
        "--reward",
        action="append",
        help="reward function (repeatable); default: "
        "the task's verifier for builtin data, else exact_match on an 'answer' column",
    )
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--pass-k", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="evaluate the first N rows")
    p.add_argument("--threshold", type=float, default=1.0, help="correct when score >= this")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    p.set_defaults(func=_eval)
    p = sub.add_parser("merge", help="merge a LoRA adapter folder into a full model folder")
    p.add_argument("adapter")
    p.add_argument("out")
    p.set_defaults(func=_merge)
    p = sub.add_parser(
        "init-model", help="a tiny Qwen2 + character tokenizer for a toy task of your own"
    )
    p.add_argument("out", help="a new folder (then: model.name_or_path=OUT)")
    p.add_argument("--size", default="tiny", help="micro | tiny (≈2.4M parameters) | small (≈24M)")
    p.add_argument(
        "--chars", help="the characters it knows (default: letters, digits, space, punctuation)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_init_model)
    p = sub.add_parser("docs", help="write the generated docs (config reference, algorithm cards)")
    p.add_argument("--out", help="output folder (default: docs/ of the source checkout)")
    p.set_defaults(func=_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `module:function` reward functions in the current folder import as with `python -m`
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "sweep" and all("=" in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "sweep":  # key=value overrides may also follow the options
        args.extra, args.argv = extra, argv
    from .engine.configlib import ConfigError
    from .engine.reward_call import RewardError

    try:
        return args.func(args)
    except (ConfigError, RewardError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # TrainingStopped says where its checkpoint is
        print(str(e) or "interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
