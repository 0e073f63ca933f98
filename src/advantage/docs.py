"""The configuration reference of every command (`advantage train`, `sft`, `rm`) and the keys
listed by their `--help`, generated from the dataclasses (`advantage docs`)."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path

from .core.algorithm import Algorithm
from .engine.configlib import ConfigError, field_docs
from .rl.config import AlgoConfig, Config
from .stages.rm import RMConfig
from .stages.sft import SFTConfig

COMMANDS = {"train": Config, "sft": SFTConfig, "rm": RMConfig}

LEARNING_RATES = (
    "**Learning rates.** The defaults suit pretrained models (10^8+ parameters): `train.lr` 1e-6 "
    "for RL, 2e-5 for SFT, 1e-5 for a reward model. A model trained from scratch "
    "(`builtin:tiny-random`, `advantage init-model`) wants about 100× more: ≈1e-3 for SFT (the "
    "demo's warm start: 2e-3), 1e-4 for its reward model (`advantage chain`) and 1e-4 to 3e-4 "
    "for RL (the demo: 3e-4). PPO's critic has its own rate, `train.critic_lr` (default 1e-5): "
    "from scratch give it about the policy's (on a digit-sorting task its value loss fell "
    "0.21 → 0.01–0.03 in 40 steps with 1e-3, and rose to ~0.35 with the default)."
)


def _type(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _value(value) -> str:
    return "null" if value is None else repr(value)


def config_keys(cls: type) -> Iterator[tuple[str, str, str, str, str]]:
    """(section, key, type, default, meaning) of every field of a command's config, sections
    flattened (`train.lr`); defaults are those of `cls()`, the command's own."""
    instance = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            doc = field_docs(cls).get(f.name, "")
            yield "", f.name, _type(tp), _value(getattr(instance, f.name)), doc
            continue
        section = getattr(instance, f.name)
        docs = field_docs(Algorithm if tp is AlgoConfig else tp)
        sub_hints = typing.get_type_hints(tp)
        for sub in dataclasses.fields(tp):
            yield (
                f.name,
                f"{f.name}.{sub.name}",
                _type(sub_hints[sub.name]),
                _value(getattr(section, sub.name)),
                docs.get(sub.name, ""),
            )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _tables(cls: type, level: str) -> list[str]:
    lines: list[str] = []
    current = None
    for section, key, tp, default, doc in config_keys(cls):
        if section != current:
            current = section
            lines += ["", f"{level} `{section}`" if section else f"{level} top level", ""]
            if section == "algo":
                lines += [
                    "Overrides of the preset's axes; `null` keeps the preset's value "
                    "(see the preset table in the README).",
                    "",
                ]
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines.append(f"| `{key}` | {_cell(tp)} | {_cell(default)} | {_cell(doc)} |")
    return lines


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses (`src/advantage/rl/config.py` and `sections.py`,",
        "`stages/sft.py`, `stages/rm.py`) by `advantage docs`; a test checks that this file is",
        "current. Set fields in YAML or as `section.field=value`; `advantage COMMAND --help` lists",
        "the same keys.",
        "",
        LEARNING_RATES,
        "",
        "## `advantage train`",
        *_tables(Config, "###"),
        "",
        "## `advantage sft`",
        "",
        "Supervised fine-tuning on `{prompt, completion}` or `{messages}` rows (loss on the",
        "completion tokens only).",
        *_tables(SFTConfig, "###"),
        "",
        "## `advantage rm`",
        "",
        "A reward model on `{prompt, chosen, rejected}` pairs (Bradley–Terry loss).",
        *_tables(RMConfig, "###"),
    ]
    return "\n".join(lines) + "\n"


def help_epilog(command: str) -> str:
    """The config keys of `command` for its `--help`: key, default and the doc's first sentence."""
    lines = ["config keys (in CONFIG.yaml or as key=value; every detail: docs/config.md):"]
    for _, key, _, default, doc in config_keys(COMMANDS[command]):
        first = re.split(r"(?<=\.)\s+(?=[A-Z(`])", doc)[0].rstrip(".")
        lines.append(f"  {key} = {default}  {first}")
    return "\n".join([*lines, "", LEARNING_RATES.replace("**", "")])


def algorithm_cards() -> str:
    from .core.presets import PRESETS, preset_table, resolve

    parts = [
        "# Algorithm cards",
        "",
        "Every preset resolved to the pipeline it runs (`advantage card PRESET`), generated from "
        "the code by `advantage docs`.",
        "",
        preset_table(),
    ]
    for name in PRESETS:
        parts += ["", f"## `{name}`", "", "```", resolve(name).card(), "```"]
    return "\n".join(parts) + "\n"


GENERATED = {"config.md": config_reference, "algorithms.md": algorithm_cards}


def docs_folder(out: str | None) -> Path:
    """Where `advantage docs` writes: `out` if given, else docs/ of the source checkout this
    package runs from; anywhere else (an installed copy) `out` is required, so that running it
    in a user's project never overwrites their ./docs."""
    if out is not None:
        return Path(out)
    checkout = source_checkout()
    if checkout is None:
        raise ConfigError(
            "advantage docs: give --out FOLDER (this is an installed copy, not the source "
            "checkout, so there is no docs/ folder of ours to update; nothing was written)"
        )
    return checkout / "docs"


def source_checkout() -> Path | None:
    """The repository root when this package runs from its source checkout (src/advantage)."""
    root = Path(__file__).resolve().parents[2]
    project = root / "pyproject.toml"
    if project.is_file() and 'name = "advantage"' in project.read_text():
        return root
    return None
