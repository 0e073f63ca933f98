"""One run per run directory: an exclusive `fcntl.flock` on `RUN_DIR/.lock`, held for the whole
run. Two runs writing the same folder would delete each other's temporary checkpoints and
interleave their metrics; the second one stops at once instead, naming the first one's pid.

The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a stale
`.lock` file never blocks a new run. Under torchrun only rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .configlib import ConfigError


class RunDirLock:
    """`RunDirLock(run_dir)` takes the lock or raises `ConfigError`; `release()` drops it."""

    _fd: int | None = None

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            who = (
                f"another Trainer in this process (pid {holder}); let its fit() finish or "
                "call its close()"
                if holder == str(os.getpid())
                else f"another run (pid {holder})"
            )
            raise ConfigError(
                f"log.run_dir {str(self.path.parent)!r} is in use by {who}; wait for it to "
                "end or choose another log.run_dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __del__(self) -> None:
        self.release()
