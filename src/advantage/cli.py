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
    import yaml

    if "=" not in text:
        raise SystemExit(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advantage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the preset table (markdown)")
    p.set_defaults(func=_presets)
    p = sub.add_parser("card", help="print the algorithm card of a preset, with overrides")
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", help="axis=value, e.g. scope=batch clip_high=0.28")
    p.set_defaults(func=_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
