"""Command line: `advantage <command> ...` (also `python -m advantage`)."""

from __future__ import annotations

import argparse
import sys


def _presets(args: argparse.Namespace) -> int:
    from .core.algorithm import preset_table

    print(preset_table())
    return 0


def _card(args: argparse.Namespace) -> int:
    from .core import resolve

    overrides = dict(_parse_override(kv) for kv in args.overrides)
    print(resolve(args.preset, **overrides).card())
    return 0


def _parse_override(text: str) -> tuple[str, object]:
    from .configlib import parse_overrides

    return parse_overrides([text])[0]


def _split_config_arg(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] key=value ...` → (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _train(args: argparse.Namespace) -> int:
    from .trainer import train

    path, overrides = _split_config_arg(args.args)
    train(path, overrides=overrides)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import time
    from importlib.resources import files

    from .trainer import train

    start = time.perf_counter()
    recipe = files("advantage") / "recipes" / "demo.yaml"
    result = train(str(recipe), overrides=args.overrides)
    before = result.eval_before["eval/accuracy"]
    after = result.eval_after["eval/accuracy"]
    print(
        f"wall time {time.perf_counter() - start:.0f}s (warm start included when it was built); "
        f"run folder {result.run_dir}"
    )
    print(f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from .checkpoint import consolidate

    out = consolidate(args.checkpoint, args.out)
    print(f"wrote a Hugging Face model folder: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advantage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the preset table (markdown)")
    p.set_defaults(func=_presets)
    p = sub.add_parser("card", help="print the algorithm card of a preset, with overrides")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="axis=value, e.g. scope=batch clip_high=0.28")
    p.set_defaults(func=_card)
    p = sub.add_parser("train", help="train: advantage train [CONFIG.yaml] [key=value ...]")
    p.add_argument("args", nargs="*", metavar="CONFIG.yaml key=value")
    p.set_defaults(func=_train)
    p = sub.add_parser("demo", help="warm-start the tiny model and train it on the built-in task")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")
    p.set_defaults(func=_demo)
    p = sub.add_parser("consolidate", help="a checkpoint (sharded or not) → a Hugging Face folder")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-NNNNNN")
    p.add_argument("out", help="output folder (loads with from_pretrained)")
    p.set_defaults(func=_consolidate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .configlib import ConfigError
    from .rewards import RewardError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ConfigError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
