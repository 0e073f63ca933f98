"""Tools for multi-turn episodes: parse the model's tool calls, run the tools, return text.

A **tool** is a plain Python function (or a bound method of an environment object), sync or
`async def`, with type hints and a Google-style docstring, as in TRL's `GRPOTrainer(tools=...)`:
`transformers.utils.get_json_schema` turns it into the JSON schema a chat template's `tools=`
renders, and it is dispatched by its `__name__`.

- `ToolCallParser` finds calls in a model turn: the Hermes/Qwen format
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (several per turn), or a regex of
  the caller's with named groups `name` and `arguments`. A malformed call comes back as an error
  `ToolResult` for the model to read, never as an exception.
- `Toolbox` runs calls: a raising tool answers with TRL's text `str({"error": str(e)})`; a tool
  that hangs past `timeout` answers "error: tool 'f' timed out after Ns" (its thread is abandoned,
  see `Toolbox`); long output is cut with a marker; a non-string result becomes `str(result)`.

Errors the toolbox detects itself (bad call, unknown tool, timeout) read "error: ..."; an
exception raised by the tool reads exactly as in TRL, so a model moved over sees the same text.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .configlib import ConfigError, short
from .reward_call import run_awaitable

HERMES = "hermes"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One call the model made: the tool's name, its arguments, and the call's text in the turn."""

    name: str
    arguments: dict
    text: str


@dataclass
class ToolResult:
    """What goes back to the model as the tool's message (`{"role": "tool", "name", "content"}`)."""

    name: str
    content: str
    error: bool = False
    """The call failed: malformed, unknown tool, the tool raised, or it timed out."""
    timed_out: bool = False
    """The tool did not return within the toolbox's timeout."""

    @property
    def message(self) -> dict:
        """The TRL tool message."""
        return {"role": "tool", "name": self.name, "content": self.content}


def cut(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters, with a marker saying how many were dropped."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... {len(text) - max_chars} characters cut]"


def first_required_parameter(schema: dict) -> str | None:
    """The parameter a raw-string argument binds to: the first required one, else the only one."""
    parameters = schema["function"].get("parameters", {})
    required = parameters.get("required") or []
    names = list(parameters.get("properties", {}))
    if required:
        return required[0]
    return names[0] if len(names) == 1 else None


def tool_origin(tool) -> tuple[str, str]:
    """(the field a tool came from, what it is), for errors: `("rollout.environment", "method
    'Env.add'")` for a method (a TRL environment's public method, bound or not), else
    `("rollout.tools", "tool 'f'")` (also the Python API's `tools=`)."""
    name = getattr(tool, "__name__", None) or repr(tool)
    parts = str(getattr(tool, "__qualname__", "") or "").split(".")
    if len(parts) >= 2 and parts[-2] != "<locals>":
        return "rollout.environment", f"method '{parts[-2]}.{parts[-1]}'"
    return "rollout.tools", f"tool {name!r}"


def tool_schema(tool: Callable) -> dict:
    """transformers' `get_json_schema` of `tool`; a ConfigError naming the tool (and the field
    it came from) when there is none to build."""
    from transformers.utils import get_json_schema

    try:
        params = inspect.signature(tool).parameters.values()
    except (TypeError, ValueError):
        params = []
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        field, what = tool_origin(tool)
        raise ConfigError(  # calls pass the model's arguments by name: every call would fail
            f"{field}: {what}: a *args parameter cannot take the model's arguments, which calls "
            "pass by name; give each parameter a name and a type hint"
        )
    try:
        return get_json_schema(tool)
    except Exception as e:
        field, what = tool_origin(tool)
        raise ConfigError(
            f"{field}: {what}: cannot build its JSON schema "
            f"({type(e).__name__}: {e}); a tool needs type hints and a Google-style docstring "
            f"with an 'Args:' line for every parameter"
        ) from None


class ToolCallParser:
    """Tool calls in a model turn, in the Hermes/Qwen format or a regex format.

    `format="hermes"`: every `<tool_call>{"name": N, "arguments": {...}}</tool_call>` block.
    Any other string is a regex (compiled with `re.DOTALL`) whose matches are calls; its named
    group `arguments` holds a JSON object or a raw string, which is passed as the tool's first
    required parameter (its single parameter when it has no required one); its optional named
    group `name` picks the tool, which defaults to the only tool when exactly one exists.

    `tool_names` (optional) lets unknown names be reported at parse time; `schemas` (the
    `Toolbox.schemas`) let raw-string arguments be bound to a parameter name. `Toolbox.parser()`
    builds a parser with both. `stop` is the literal closing text of a regex call, the stop string
    at which a model turn that makes a call should end.
    """

    def __init__(
        self,
        format: str = HERMES,
        tool_names: list[str] | None = None,
        stop: str | None = None,
        schemas: list[dict] | None = None,
    ) -> None:
        self.format = format
        self.schemas = {s["function"]["name"]: s for s in schemas or []}
        names = tool_names if tool_names is not None else list(self.schemas) or None
        self.tool_names = None if names is None else list(names)
        if format == HERMES:
            self.pattern = re.compile(
                re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.S
            )
            self._stop = [stop or HERMES_CLOSE]
        else:
            try:
                self.pattern = re.compile(format, re.S)
            except (re.error, TypeError) as e:
                raise ConfigError(
                    f"rollout.tool_call_format: {format!r} is not a valid regex ({e}); give "
                    f"'{HERMES}' or a regex with a named group (?P<arguments>...)"
                ) from None
            if "arguments" not in self.pattern.groupindex:
                raise ConfigError(
                    f"rollout.tool_call_format: {format!r} needs a named group "
                    "(?P<arguments>...) for the call's arguments (JSON, or the one argument as "
                    "text), and optionally (?P<name>...) for the tool's name"
                )
            self._stop = [stop] if stop else []

    @property
    def stop_strings(self) -> list[str]:
        """Where a model turn that makes a call should stop (its closing tag), possibly none."""
        return list(self._stop)

    def parse(self, text: str) -> list[ToolCall | ToolResult]:
        """The calls in `text`, in order; a malformed one is an error `ToolResult` in its place.
        An empty list means the turn made no call."""
        if self.format == HERMES:
            found = [self._hermes(m.group(1), m.group(0)) for m in self.pattern.finditer(text)]
            opened, closed = text.count(HERMES_OPEN), text.count(HERMES_CLOSE)
            if opened > closed:
                found.append(_error("", f"{HERMES_OPEN} without a closing {HERMES_CLOSE}"))
            return found
        return [self._regex(m) for m in self.pattern.finditer(text)]

    def _hermes(self, body: str, whole: str) -> ToolCall | ToolResult:
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return _error("", f"the tool call is not valid JSON ({e.msg} at char {e.pos})")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return _error("", 'a tool call must be a JSON object with a string "name"')
        name = call["name"]
        if "arguments" not in call:
            if self._takes_no_arguments(name):
                return self._checked(name, {}, whole)
            return _error(name, f'the call to {name!r} has no "arguments" object')
        arguments = call["arguments"]
        if isinstance(arguments, str):  # some models JSON-encode the arguments twice
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return _error(name, f'the "arguments" of {name!r} must be a JSON object')
        return self._checked(name, arguments, whole)

    def _regex(self, match: re.Match) -> ToolCall | ToolResult:
        groups = match.groupdict()
        name = groups.get("name")
        if name is None:
            if not self.tool_names or len(self.tool_names) != 1:
                return _error("", "the call names no tool and there is not exactly one tool")
            name = self.tool_names[0]
        raw = groups.get("arguments")
        if raw is None:
            return _error(name, f"the call to {name!r} has no arguments")
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):  # a raw string: the tool's first required parameter
            schema = self.schemas.get(name)
            parameter = first_required_parameter(schema) if schema else None
            if parameter is None:
                return _error(
                    name,
                    f"cannot pass a raw string to {name!r}: its parameters are unknown "
                    "(build the parser with Toolbox.parser()) or it has no single first parameter",
                )
            arguments = {parameter: raw}
        return self._checked(name, arguments, match.group(0))

    def _checked(self, name: str, arguments: dict, text: str) -> ToolCall | ToolResult:
        if self.tool_names is not None and name not in self.tool_names:
            return _unknown(name, self.tool_names)
        return ToolCall(name=name, arguments=arguments, text=text)

    def _takes_no_arguments(self, name: str) -> bool:
        schema = self.schemas.get(name)
        return schema is not None and not schema["function"].get("parameters", {}).get("required")


def _error(name: str, problem: str) -> ToolResult:
    return ToolResult(name=name, content=f"error: {problem}", error=True)


def _unknown(name: str, valid: list[str]) -> ToolResult:
    return _error(name, f"unknown tool {name!r}; valid tools: {', '.join(valid) or '(none)'}")


class Toolbox:
    """The tools of an episode, dispatched by `__name__`, each call bounded in time and output.

    `timeout` (seconds, None = wait forever): every call runs in a **daemon thread** joined with
    this timeout. Python cannot kill a thread, so a tool that hangs is abandoned: its thread keeps
    running (and holds whatever it holds) until it returns or the process exits, but neither the
    episode nor process exit waits for it. Tools that may hang on real work (code, network) should
    bound themselves, as the sandboxed `python` tool does with a subprocess.
    """

    def __init__(
        self, tools: list[Callable], timeout: float | None = 10.0, max_output_chars: int = 4000
    ) -> None:
        self.functions = list(tools)
        """The callables, for `apply_chat_template(tools=...)` (TRL passes them as they are)."""
        self.by_name: dict[str, Callable] = {}
        for tool in self.functions:
            name = getattr(tool, "__name__", None)
            if not callable(tool) or not name:
                raise ConfigError(
                    f"rollout.tools: {short(tool)} ({type(tool).__name__}) is not a named "
                    "function or method"
                )
            if name in self.by_name:
                first, second = tool_origin(self.by_name[name]), tool_origin(tool)
                raise ConfigError(
                    f"rollout.tools: two tools are named {name!r} ({first[1]} and {second[1]}); "
                    "tool names must be unique"
                )
            self.by_name[name] = tool
        self.schemas = [tool_schema(t) for t in self.functions]
        """`get_json_schema` of each tool, in order."""
        self.timeout = timeout
        self.max_output_chars = max_output_chars

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def parser(self, format: str = HERMES, stop: str | None = None) -> ToolCallParser:
        """A parser that knows these tools' names and parameters."""
        return ToolCallParser(format, tool_names=self.names, stop=stop, schemas=self.schemas)

    def call(self, call: ToolCall | ToolResult) -> ToolResult:
        """Run one call (a parser's error result passes through unchanged)."""
        return self.call_all([call])[0]

    def call_all(self, calls: list[ToolCall | ToolResult]) -> list[ToolResult]:
        """Run calls concurrently (one thread each), every one bounded by `timeout`; results in
        the calls' order. Use it for the calls of all episodes of a turn at once."""
        started = [self._start(c) for c in calls]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        return [self._finish(s, deadline) for s in started]

    def _start(self, call: ToolCall | ToolResult):
        if isinstance(call, ToolResult):
            return call
        tool = self.by_name.get(call.name)
        if tool is None:
            return _unknown(call.name, self.names)
        box: dict = {}

        def run() -> None:
            try:
                result = tool(**call.arguments)
                if inspect.isawaitable(result):
                    result = run_awaitable(result)
                box["value"] = result
            except BaseException as e:  # the tool's failure is the model's text, never ours
                box["error"] = e

        thread = threading.Thread(target=run, name=f"tool-{call.name}", daemon=True)
        thread.start()
        return call, thread, box

    def _finish(self, started, deadline: float | None) -> ToolResult:
        if isinstance(started, ToolResult):
            return started
        call, thread, box = started
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            return ToolResult(
                name=call.name,
                content=f"error: tool {call.name!r} timed out after {self.timeout:g}s",
                error=True,
                timed_out=True,
            )
        if "error" in box:
            content, error = str({"error": str(box["error"])}), True  # TRL's text
        else:
            value = box["value"]
            content, error = (value if isinstance(value, str) else str(value)), False
        return ToolResult(name=call.name, content=cut(content, self.max_output_chars), error=error)
