"""Tools for episodes: schemas, parsing tool calls, running tools, the python sandbox."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from advantage.engine.configlib import ConfigError
from advantage.engine.sandbox import make_python_tool
from advantage.engine.sandbox_child import landlock_abi
from advantage.engine.tools import Toolbox, ToolCall, ToolCallParser, ToolResult


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.

    Returns:
        The product.
    """
    return a * b


def shout(text: str, times: int = 1) -> str:
    """Upper-case a text.

    Args:
        text: What to shout.
        times: How many times.
    """
    return " ".join([text.upper()] * times)


def divide(a: int, b: int) -> float:
    """Divide.

    Args:
        a: Numerator.
        b: Denominator.
    """
    return a / b


def hang(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke up"


def flood(n: int) -> str:
    """Print a lot.

    Args:
        n: How many characters.
    """
    return "x" * n


async def fetch(key: str) -> str:
    """Look a key up, asynchronously.

    Args:
        key: The key.
    """
    await asyncio.sleep(0.01)
    return f"value of {key}"


class Counter:
    """A TRL-style environment: public methods are tools."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> str:
        """Add to the counter.

        Args:
            n: The amount.
        """
        self.total += n
        return str(self.total)


# --- schemas ---------------------------------------------------------------------------


def test_schemas_are_transformers_get_json_schema_and_functions_are_kept():
    box = Toolbox([multiply, shout])
    assert box.functions == [multiply, shout]
    assert box.schemas[0] == {
        "type": "function",
        "function": {
            "name": "multiply",
            "description": "Multiply two integers.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "The first factor."},
                    "b": {"type": "integer", "description": "The second factor."},
                },
                "required": ["a", "b"],
            },
            "return": {"type": "integer", "description": "The product."},
        },
    }
    assert box.schemas[1]["function"]["parameters"]["required"] == ["text"]  # `times` has a default


def test_a_tool_without_a_docstring_is_refused_by_name():
    def bare(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="tool 'bare': cannot build its JSON schema"):
        Toolbox([bare])


def untyped(x):
    """No type hints.

    Args:
        x: the value
    """
    return x


class Untyped:
    def count(self, n):
        """Count.

        Args:
            n: how many
        """
        return str(n)


def test_a_tool_without_hints_or_docstring_is_a_config_error_naming_the_field():
    """A probe: `rollout.tools=[mytools.py:notype]` printed a 27-line traceback (exit code 1):
    the schema's ValueError is now a ConfigError, the CLI's one line naming the field."""
    with pytest.raises(
        ConfigError,
        match=r"^rollout\.tools: tool 'untyped': cannot build its JSON schema "
        r"\(TypeHintParsingException: Argument x is missing a type hint in function untyped\); "
        "a tool needs type hints and a Google-style docstring",
    ):
        Toolbox([untyped])
    # an environment's method: that field
    with pytest.raises(
        ConfigError, match=r"^rollout\.environment: method 'Untyped\.count': cannot build"
    ):
        Toolbox([Untyped().count])


def test_a_tool_with_star_args_is_refused():
    # a probe: accepted, then every call failed ("unexpected keyword argument 'args'")
    def total(*args: int) -> int:
        """Sum numbers.

        Args:
            args: the numbers
        """
        return sum(args)

    with pytest.raises(ConfigError, match=r"^rollout\.tools: tool 'total': a \*args parameter "
                       "cannot take the model's arguments"):  # fmt: skip
        Toolbox([total])


def test_bound_methods_of_an_environment_are_tools():
    env = Counter()
    box = Toolbox([env.add])
    assert box.schemas[0]["function"]["name"] == "add"
    assert "self" not in box.schemas[0]["function"]["parameters"]["properties"]
    assert box.call(ToolCall("add", {"n": 2}, "")).content == "2"
    assert box.call(ToolCall("add", {"n": 3}, "")).content == "5"
    assert env.total == 5


# --- parsing -----------------------------------------------------------------------------


def test_hermes_one_call():
    parser = ToolCallParser("hermes", ["multiply"])
    text = 'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 37, "b": 48}}\n</tool_call>'
    (call,) = parser.parse(text)
    assert call == ToolCall(
        "multiply",
        {"a": 37, "b": 48},
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 37, "b": 48}}\n</tool_call>',
    )
    assert parser.stop_strings == ["</tool_call>"]


def test_hermes_two_calls_and_no_call():
    parser = ToolCallParser("hermes", ["multiply", "shout"])
    text = (
        '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>\n'
        '<tool_call>{"name": "shout", "arguments": {"text": "hi"}}</tool_call>'
    )
    calls = parser.parse(text)
    assert [(c.name, c.arguments) for c in calls] == [
        ("multiply", {"a": 2, "b": 3}),
        ("shout", {"text": "hi"}),
    ]
    assert parser.parse("The answer is 6.") == []


def test_hermes_malformed_calls_become_error_results():
    parser = ToolCallParser("hermes", ["multiply"])
    (bad_json,) = parser.parse('<tool_call>{"name": "multiply", "arguments": {a: 1}}</tool_call>')
    assert isinstance(bad_json, ToolResult) and bad_json.error
    assert bad_json.content.startswith("error: the tool call is not valid JSON")
    (unknown,) = parser.parse('<tool_call>{"name": "divide", "arguments": {}}</tool_call>')
    assert unknown.error and unknown.name == "divide"
    assert unknown.content == "error: unknown tool 'divide'; valid tools: multiply"
    (no_args,) = parser.parse('<tool_call>{"name": "multiply"}</tool_call>')
    assert no_args.content == "error: the call to 'multiply' has no \"arguments\" object"
    (unclosed,) = parser.parse('<tool_call>{"name": "multiply", "arguments": {"a": 1')
    assert unclosed.content == "error: <tool_call> without a closing </tool_call>"
    # a good call next to a bad one: both come back, in order
    good, bad = parser.parse(
        '<tool_call>{"name": "multiply", "arguments": {"a": 1, "b": 2}}</tool_call>'
        "<tool_call>[1, 2]</tool_call>"
    )
    assert isinstance(good, ToolCall) and bad.error


def test_hermes_arguments_encoded_as_a_json_string_are_decoded():
    parser = ToolCallParser("hermes")
    (call,) = parser.parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert call.arguments == {"a": 1}


def test_regex_format_with_a_raw_string_for_the_only_tool():
    box = Toolbox([shout])
    parser = box.parser(r"<calc>(?P<arguments>.*?)</calc>", stop="</calc>")
    assert parser.stop_strings == ["</calc>"]
    (call,) = parser.parse("<calc>37*48</calc>")
    assert call == ToolCall("shout", {"text": "37*48"}, "<calc>37*48</calc>")  # first required


def test_regex_format_with_names_and_json_arguments():
    parser = Toolbox([multiply, shout]).parser(r"CALL (?P<name>\w+) (?P<arguments>\{.*?\})\n")
    assert parser.stop_strings == []
    calls = parser.parse(
        'CALL multiply {"a": 4, "b": 5}\nCALL nope {"a": 1}\nCALL shout {"text": "x"}\n'
    )
    assert calls[0] == ToolCall("multiply", {"a": 4, "b": 5}, 'CALL multiply {"a": 4, "b": 5}\n')
    assert calls[1].error and "unknown tool 'nope'" in calls[1].content
    assert calls[2].arguments == {"text": "x"}


def test_regex_format_errors():
    with pytest.raises(ValueError, match="needs a named group"):
        ToolCallParser(r"<calc>(.*?)</calc>")
    # a probe: both were ValueError tracebacks (exit code 1) instead of the CLI's one line
    with pytest.raises(
        ConfigError,
        match=r"^rollout\.tool_call_format: '<calc>\(unclosed' is not a valid regex \(missing \), "
        r"unterminated subpattern at position 6\); give 'hermes' or a regex with a named group",
    ):
        ToolCallParser("<calc>(unclosed")
    with pytest.raises(
        ConfigError,
        match=r"^rollout\.tool_call_format: '<calc>\(\.\*\?\)</calc>' needs a named group "
        r"\(\?P<arguments>\.\.\.\) for the call's arguments",
    ):
        ToolCallParser(r"<calc>(.*?)</calc>")
    # no name group and two tools: which one is meant cannot be known
    (call,) = ToolCallParser(r"<c>(?P<arguments>.*?)</c>", ["a", "b"]).parse("<c>1</c>")
    assert call.content == "error: the call names no tool and there is not exactly one tool"
    # a raw string for a tool whose parameters the parser was not told
    (call,) = ToolCallParser(r"<c>(?P<arguments>.*?)</c>", ["f"]).parse("<c>1+1</c>")
    assert call.error and "cannot pass a raw string to 'f'" in call.content


# --- running tools -----------------------------------------------------------------------


def test_a_call_runs_and_a_non_string_result_is_str():
    box = Toolbox([multiply])
    assert box.call(ToolCall("multiply", {"a": 6, "b": 7}, "")) == ToolResult("multiply", "42")


def test_a_tool_that_raises_answers_with_trl_error_text():
    result = Toolbox([divide]).call(ToolCall("divide", {"a": 1, "b": 0}, ""))
    assert result == ToolResult("divide", "{'error': 'division by zero'}", error=True)
    wrong_args = Toolbox([divide]).call(ToolCall("divide", {"x": 1}, ""))
    assert wrong_args.error and "unexpected keyword argument 'x'" in wrong_args.content


def test_unknown_tool_names_the_valid_tools_and_parse_errors_pass_through():
    box = Toolbox([multiply, divide])
    result = box.call(ToolCall("add", {}, ""))
    assert result == ToolResult(
        "add", "error: unknown tool 'add'; valid tools: multiply, divide", error=True
    )
    parse_error = ToolResult("", "error: bad", error=True)
    assert box.call(parse_error) is parse_error


def test_a_hanging_tool_times_out_and_the_call_returns_promptly():
    box = Toolbox([hang, multiply], timeout=2)
    start = time.monotonic()
    slow, fast = box.call_all(
        [ToolCall("hang", {"seconds": 30}, ""), ToolCall("multiply", {"a": 2, "b": 2}, "")]
    )
    elapsed = time.monotonic() - start
    assert slow == ToolResult("hang", "error: tool 'hang' timed out after 2s", True, True)
    assert fast == ToolResult("multiply", "4")
    assert 2 <= elapsed < 10  # one shared deadline, not one per call, not the 30 s


def test_megabytes_of_output_are_cut_with_a_marker():
    result = Toolbox([flood], max_output_chars=100).call(ToolCall("flood", {"n": 5_000_000}, ""))
    assert result.content == "x" * 100 + "\n[... 4999900 characters cut]"


def test_an_async_tool_is_awaited():
    box = Toolbox([fetch])
    assert box.call(ToolCall("fetch", {"key": "k"}, "")).content == "value of k"


def test_an_async_tool_can_be_called_from_a_running_event_loop():
    async def main():
        return Toolbox([fetch]).call(ToolCall("fetch", {"key": "k"}, ""))

    assert asyncio.run(main()).content == "value of k"


def test_tool_names_must_be_unique():
    with pytest.raises(
        ConfigError,
        match=r"^rollout\.tools: two tools are named 'add' \(method 'Counter\.add' and method "
        r"'Counter\.add'\); tool names must be unique",
    ):
        Toolbox([Counter().add, Counter().add])


# --- the python sandbox ------------------------------------------------------------------

sandbox = make_python_tool(timeout=3, cpu_seconds=3, memory_mb=256, max_output_chars=200)


def test_sandbox_schema_is_a_plain_documented_function():
    (schema,) = Toolbox([sandbox]).schemas
    assert schema["function"]["name"] == "python"
    assert schema["function"]["parameters"]["required"] == ["code"]


def test_sandbox_prints():
    assert sandbox("print(6 * 7)") == "42\n"


def test_sandbox_raises_gives_stdout_and_the_last_traceback_line():
    assert sandbox("print('before')\n1 / 0") == "before\nerror: ZeroDivisionError: division by zero"


def test_sandbox_loop_forever_times_out():
    quick = make_python_tool(timeout=1, cpu_seconds=1)
    start = time.monotonic()
    assert quick("while True:\n    pass") in (
        "error: timed out after 1s",  # a busy machine: the wall clock runs out first
        "error: CPU time limit of 1s exceeded",
    )
    assert time.monotonic() - start < 10  # not the loop's forever


def test_sandbox_too_much_memory_is_an_error_not_a_crash():
    assert sandbox("x = bytearray(2 * 1024**3)\nprint(len(x))") == "error: MemoryError"


def test_sandbox_cannot_see_the_parents_environment(monkeypatch):
    monkeypatch.setenv("ADVANTAGE_TEST_SECRET", "hunter2")
    out = sandbox("import os\nprint(os.environ.get('ADVANTAGE_TEST_SECRET'), 'HOME' in os.environ)")
    assert out == "None False\n"


def test_sandbox_writes_only_in_its_temporary_directory(tmp_path):
    out = sandbox("open('note.txt', 'w').write('hi')\nimport os\nprint(os.getcwd())")
    workdir = out.strip()
    assert os.path.basename(workdir).startswith("advantage-python-")
    assert not os.path.exists(workdir)  # deleted after the call
    if not landlock_abi():
        pytest.skip("this kernel has no Landlock: writes outside the directory are not confined")
    outside = tmp_path / "escape.txt"
    out = sandbox(f"open({str(outside)!r}, 'w').write('hi')")
    assert not outside.exists()
    assert out.startswith("error: PermissionError")  # Landlock (Linux >= 5.13)


def test_sandbox_output_is_capped():
    out = sandbox("print('y' * 10_000_000)")
    assert out.startswith("y" * 200 + "\n[... ") and out.endswith(" characters cut]")
