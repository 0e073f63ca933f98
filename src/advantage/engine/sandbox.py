"""A sandboxed `python(code) -> str` tool: the model's code runs in a limited subprocess.

Each call runs `sys.executable -I -c CODE` (isolated mode: no user site, no PYTHON* variables)
in a fresh temporary working directory that is deleted afterwards, with an **empty environment**
(the parent's variables, tokens included, are invisible), stdin from /dev/null, and limits:

- wall-clock `timeout`: the whole process group is killed (`start_new_session`, then `killpg`);
- `RLIMIT_CPU` (`cpu_seconds`), `RLIMIT_AS` (`memory_mb`: an allocation past it raises
  `MemoryError` in the child), `RLIMIT_FSIZE` (`file_mb`, also bounds what it prints),
  no core dumps;
- on Linux with Landlock: writes only inside its working directory, no TCP, no signals to
  processes outside the sandbox (`engine/sandbox_child.py`).

No process-count limit is set: `RLIMIT_NPROC` counts every process of the user (and is ignored
for root), so it cannot bound the sandbox alone; the process group is killed at the end instead.
This contains accidents of model-written code (loops, huge allocations, stray files); it is not a
boundary against a determined attacker (reads are allowed everywhere, UDP is not blocked).

The tool returns the program's stdout; when it fails, stdout so far plus one line, e.g.
"error: ZeroDivisionError: division by zero" (the traceback's last line), "error: timed out
after 5s", "error: CPU time limit of 5s exceeded"; cut to `max_output_chars`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .tools import cut

CHILD = Path(__file__).with_name("sandbox_child.py")
MAX_CODE_BYTES = 100_000  # one argv string may hold at most 128 KiB on Linux


@dataclass
class SandboxLimits:
    timeout: float = 5.0
    """Wall-clock seconds before the process group is killed."""
    cpu_seconds: int = 5
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = 512
    """Address space in MiB (RLIMIT_AS)."""
    file_mb: int = 16
    """Largest file the code may write, stdout and stderr included, in MiB (RLIMIT_FSIZE)."""
    max_output_chars: int = 4000
    """The reply is cut to this many characters."""


def run_python(code: str, limits: SandboxLimits) -> str:
    """Run `code` in the sandbox; its stdout, or stdout so far and an "error: ..." line."""
    if len(code.encode()) > MAX_CODE_BYTES:
        return f"error: the code is {len(code.encode())} bytes long; the limit is {MAX_CODE_BYTES}"
    child_limits = json.dumps(
        {k: v for k, v in asdict(limits).items() if k in ("cpu_seconds", "memory_mb", "file_mb")}
    )
    workdir = tempfile.mkdtemp(prefix="advantage-python-")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", str(CHILD), child_limits, code],
                cwd=workdir,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            timed_out = False
            try:
                process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process.pid)  # also strays it left behind
            process.wait()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        stdout, stderr = _read(out), _read(err)
    problem = None
    if timed_out:
        problem = f"timed out after {limits.timeout:g}s"
    elif process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        problem = f"CPU time limit of {limits.cpu_seconds}s exceeded"
    elif process.returncode < 0:
        problem = f"killed by {signal.Signals(-process.returncode).name}"
    elif process.returncode > 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        problem = lines[-1].strip() if lines else f"exit status {process.returncode}"
    text = stdout
    if problem is not None:
        text += ("\n" if text and not text.endswith("\n") else "") + f"error: {problem}"
    return cut(text, limits.max_output_chars)


def make_python_tool(**limits: float) -> Callable[[str], str]:
    """A `python(code) -> str` tool with these `SandboxLimits` (keywords; the rest default) —
    a plain function with type hints and a docstring, so `get_json_schema` and chat templates
    take it."""
    bounds = SandboxLimits(**limits)

    def python(code: str) -> str:
        """Run a Python program in a sandbox and return what it prints.

        Args:
            code: A complete Python program. Use print() to show results.

        Returns:
            The program's standard output, or the error it ended with.
        """
        return run_python(code, bounds)

    return python


python = make_python_tool()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _read(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")
