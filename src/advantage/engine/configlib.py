"""Typed nested dataclasses from YAML and `key=value` overrides, with errors that name the field.

`load(cls, data)` builds a dataclass tree from plain dicts, checking every key (unknown keys get a
"did you mean" suggestion) and every value's type. Field docs are the attribute docstrings under
each field (read from the source with `ast`), used by `--help` texts and the config reference.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the field and what to change."""


# Range checks of numeric fields, used by every section's `__post_init__`. `not (...)` also
# catches NaN, which fails every comparison.


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def check_at_least(name: str, value: float | None, low: float) -> None:
    """`value` >= `low` (and finite), or None."""
    if value is not None and not (value >= low and math.isfinite(value)):
        raise ConfigError(f"{name} must be >= {low:g}, got {value}")


def host_port(address: str, name: str = "distributed.rollout_address") -> tuple[str, int]:
    """`HOST:PORT` as (host, port), the port in 1..65535."""
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {address!r} is not HOST:PORT (e.g. 10.0.0.2:29600)")
    return host, int(port)


MAX_SEED = 2**32 - 1
"""The largest seed: NumPy's and vLLM's seeding take 0 .. 2**32 - 1 (torch's, < 2**64; the run
derives per-step seeds from it, `train.seed * 7919 + step`, that stay within torch's)."""


def check_seed(name: str, value: int) -> None:
    """0 <= `value` <= MAX_SEED."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(
            f"{name} must be in 0 .. {MAX_SEED} (2**32 - 1, what NumPy's and vLLM's seeding "
            f"take), got {value}"
        )


def check_positive(name: str, value: float | None) -> None:
    """`value` > 0 and finite, or None."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number > 0, got {value}")


def check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")


def check_fraction(name: str, value: float, closed_low: bool = True, closed_high: bool = False):
    """`value` in [0, 1) by default; `closed_*` choose which ends are allowed."""
    low_ok = value >= 0 if closed_low else value > 0
    high_ok = value <= 1 if closed_high else value < 1
    if not (low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ConfigError(f"{name} must be in {interval}, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {short(value)} fits none of {tp}"
        )
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            # a single value where a list is expected: accept `functions: my.fn`
            value = [value]
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: expected a mapping, got {type(value).__name__} {short(value)}"
            )
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {short(value)}")
        return load(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {short(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {short(value)}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def short(x, limit: int = 60) -> str:
    """`repr(x)`, cut to `limit` characters (errors name a value without printing all of it)."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, validating keys and types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{path}'{hint} (valid keys here: {', '.join(fields)})"
            )
        try:
            kwargs[key] = _convert(value, hints[key], path)
        except ConfigError as e:  # a field may say what to do instead (`metadata={"hint": ...}`)
            hint = fields[key].metadata.get("hint")
            raise ConfigError(f"{e}; {hint}" if hint else str(e)) from None
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def import_object(spec: str, field: str):
    """User code named in a config: `module:name`, `module.name` or `path/to/file.py:name`
    (configs name code that is imported and run: trust them like scripts). Every failure is a
    `ConfigError` naming `field`: a missing file, a syntax error (file and line), an exception
    raised while the module imports, a missing name."""
    import importlib
    import importlib.util

    if ":" in spec:
        module_name, name = spec.rsplit(":", 1)
    elif "." in spec:
        module_name, name = spec.rsplit(".", 1)
    else:
        raise ConfigError(f"{field}: {spec!r} is not a dotted path like my_module:name")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"{field}: file {module_name!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{field}: cannot load {spec!r}: {e}") from None
    except SyntaxError as e:
        raise ConfigError(
            f"{field}: {e.filename} line {e.lineno}: {e.msg} (loading {spec!r})"
        ) from None
    except ConfigError:
        raise
    except Exception as e:  # the module's own code failed while it was imported
        raise ConfigError(
            f"{field}: importing {module_name!r} raised {type(e).__name__}: {e}"
        ) from None


def new_folder(out: str | Path, name: str = "OUT") -> Path:
    """`out` as a folder to write a model into: new, or empty; never over existing files."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(
            f"{name} {str(path)!r} exists and is not an empty folder; choose a new one"
        )
    return path


def read_text(path: Path, what: str = "") -> str:
    """The UTF-8 text of a file; other bytes fail naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{what}{path}: line {line} (byte {e.start}, {data[e.start : e.start + 1]!r}) is not "
            "UTF-8 text; save the file as UTF-8"
        ) from None


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field: "the string under it"}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
