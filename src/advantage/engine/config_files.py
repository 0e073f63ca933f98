"""Config files and `key=value` overrides into a typed config (`load_config`): YAML read
with a loader that refuses a key given twice, errors that name the file, line and column."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from .configlib import ConfigError, load, read_text


def set_path(data: dict, dotted: str, value: Any) -> None:
    """`set_path(d, "rollout.num_generations", 4)` → d["rollout"]["num_generations"] = 4."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`["a.b=3", "c=[1, 2]"]` → [("a.b", 3), ("c", [1, 2])] (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {_yaml_problem(e)}") from None
        out.append((key.strip(), value))
    return out


def load_config(
    cls: type,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Any:
    """The one config loader: dataclass `cls` from `base`, then an optional YAML file, then
    `key=value` overrides (applied in order); every key and value checked by `load`."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    for key, value in parse_overrides(overrides or []):
        set_path(data, key, value)
    return load(cls, data)


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a file that is not UTF-8 or not YAML fails naming where."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = read_text(path)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    one without a word: a second `train:` section dropped the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"the key {key!r} appears twice in one mapping (first at line {seen[key]}); "
                    "merge the two", key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`line L, column C: problem` of a YAML error (not PyYAML's `<unicode string>` report)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
    return f"{where}{kind}: {problem}"
