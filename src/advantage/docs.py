"""The configuration reference, generated from the dataclasses (`advantage config-docs`)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from .core.algorithm import Algorithm
from .engine.configlib import ConfigError, field_docs
from .rl.config import Config


def _type(tp) -> str:
    return _cell(str(tp).replace("typing.", "").replace("<class '", "").replace("'>", ""))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return "null" if value is None else repr(value)


def config_reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `src/advantage/rl/config.py` by `advantage docs`;",
        "a test checks that this file is current. Set fields in YAML or as `section.field=value`.",
        "",
    ]
    top = typing.get_type_hints(Config)
    lines += ["## top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines.append(
        f"| `algorithm` | str | {_default(Config.__dataclass_fields__['algorithm'])} | "
        f"{_cell(field_docs(Config)['algorithm'])} |"
    )
    for f in dataclasses.fields(Config):
        if f.name == "algorithm":
            continue
        section = top[f.name]
        docs = field_docs(Algorithm) if f.name == "algo" else field_docs(section)
        hints = typing.get_type_hints(section)
        lines += ["", f"## `{f.name}`", ""]
        if f.name == "algo":
            lines += [
                "Overrides of the preset's axes; `null` keeps the preset's value "
                "(see the preset table in the README).",
                "",
            ]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for sub in dataclasses.fields(section):
            lines.append(
                f"| `{f.name}.{sub.name}` | {_type(hints[sub.name])} | {_cell(_default(sub))} | "
                f"{_cell(docs.get(sub.name, ''))} |"
            )
    return "\n".join(lines) + "\n"


def algorithm_cards() -> str:
    from .core.algorithm import PRESETS, preset_table, resolve

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
