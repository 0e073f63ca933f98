"""Command line: `advantage <command> ...` (also `python -m advantage`)."""

from __future__ import annotations

import argparse
import os
import sys

from . import commands


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
    _training_commands(sub)
    _run_commands(sub)
    _comparison_commands(sub)
    _model_commands(sub)
    return parser


def _training_commands(sub) -> None:
    """presets, card, train, rollout-worker, demo and the stages (sft, rm, chain)."""
    p = sub.add_parser("presets", help="print the preset table (markdown)")
    p.set_defaults(func=commands.cmd_presets)
    p = sub.add_parser("card", help="print the algorithm card of a preset, with overrides")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="axis=value, e.g. scope=batch clip_high=0.28")
    p.set_defaults(func=commands.cmd_card)
    p = _config_command(sub, "train", "train: advantage train CONFIG.yaml [key=value ...]")
    p.set_defaults(func=commands.cmd_train)
    p = sub.add_parser(
        "rollout-worker",
        help="an asynchronous rollout worker for a trainer elsewhere (distributed.rollout_address)",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value")
    p.add_argument("--connect", required=True, help="HOST:PORT of the trainer")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=commands.cmd_rollout_worker)
    p = sub.add_parser(
        "demo", help="warm-start tiny models and train them on the built-in tasks (both by default)"
    )
    p.add_argument("--task", choices=["all", *commands.DEMOS], default="all")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipes")
    p.set_defaults(func=commands.cmd_demo)
    p = _config_command(sub, "sft", "supervised fine-tuning: advantage sft CONFIG.yaml [key=value]")
    p.set_defaults(func=commands.cmd_sft)
    p = _config_command(sub, "rm", "reward-model training on preference pairs (Bradley–Terry)")
    p.set_defaults(func=commands.cmd_rm)
    p = sub.add_parser(
        "chain", help="built-in SFT → reward model → PPO with the learned reward model"
    )
    p.add_argument("--run-dir", default="runs/chain")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the PPO stage")
    p.set_defaults(func=commands.cmd_chain)


def _run_commands(sub) -> None:
    """What to do with a run's folder: consolidate a checkpoint, draw the report."""
    p = sub.add_parser("consolidate", help="a checkpoint (sharded or not) → a Hugging Face folder")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-NNNNNN")
    p.add_argument("out", help="output folder (loads with from_pretrained)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the base model's own code run (never taken from the checkpoint)",
    )
    p.set_defaults(func=commands.cmd_consolidate)
    p = sub.add_parser("report", help="PNG plots and an HTML page of a run (RUN_DIR/report)")
    p.add_argument("run_dir")
    p.set_defaults(func=commands.cmd_report)


def _comparison_commands(sub) -> None:
    """sweep (runs, then the comparison page) and compare (the page of existing runs)."""
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
    p.set_defaults(func=commands.cmd_sweep)
    p = sub.add_parser(
        "compare", help="a page comparing runs or sweeps over seeds (DIR/compare/index.html)"
    )
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", default=None, help="output folder (default: the first DIR/compare)")
    p.add_argument("--target", type=float, default=0.9, help="held-out accuracy to reach")
    p.set_defaults(func=commands.cmd_compare)


def _model_commands(sub) -> None:
    """eval, merge, init-model, docs."""
    p = sub.add_parser(
        "eval",
        help="greedy accuracy and pass@k of MODEL on DATASET (single-turn: episodes with tools "
        "or an environment are evaluated by a training run's eval.*)",
    )
    p.add_argument("model", help="model folder, hub id, or builtin:NAME")
    p.add_argument("dataset", help=".jsonl, a local datasets folder/file, or builtin:TASK[:eval]")
    p.add_argument(
        "--reward",
        action="append",
        help="reward function (repeatable); default: "
        "the task's verifier for builtin data, else exact_match on an 'answer' column",
    )
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="default 64; a training run's evaluation uses eval.max_new_tokens, else "
        "rollout.max_new_tokens",
    )
    p.add_argument("--pass-k", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="evaluate the first N rows")
    p.add_argument("--threshold", type=float, default=1.0, help="correct when score >= this")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for pass@k")
    p.set_defaults(func=commands.cmd_eval)
    p = sub.add_parser("merge", help="merge a LoRA adapter folder into a full model folder")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--base", help="the base model (default: the adapter's base_model_name_or_path)")
    p.set_defaults(func=commands.cmd_merge)
    p = sub.add_parser(
        "init-model", help="a tiny Qwen2 + character tokenizer for a toy task of your own"
    )
    p.add_argument("out", help="a new folder (then: model.name_or_path=OUT)")
    p.add_argument("--size", default="tiny", help="micro | tiny (≈2.4M parameters) | small (≈24M)")
    p.add_argument(
        "--chars", help="the characters it knows (default: letters, digits, space, punctuation)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=commands.cmd_init_model)
    p = sub.add_parser("docs", help="write the generated docs (config reference, algorithm cards)")
    p.add_argument("--out", help="output folder (default: docs/ of the source checkout)")
    p.set_defaults(func=commands.cmd_docs)


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
    from .engine.diverged import DivergedError
    from .engine.environments import EpisodeError
    from .engine.reward_call import RewardError

    try:
        return args.func(args)
    except (ConfigError, RewardError, EpisodeError, commands.WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:  # no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingStopped says where its checkpoint is
        print(str(e) or "interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # `advantage presets | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
