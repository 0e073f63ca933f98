"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM: the loop finishes the current step,
saves a checkpoint at the step boundary and raises `TrainingStopped`, which the command line
prints as one line (exit code 128 + the signal: 130, 143). A second Ctrl-C stops at once.

Under torchrun the ranks agree at every step boundary (one all-reduce of two numbers) so that
all of them stop after the same step, whichever of them got the signal. torchrun forwards the
signal it gets to its workers, which a terminal's Ctrl-C has reached already: a repeat within
`SAME_SIGNAL_S` under torchrun is that one signal, not a second Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ..engine.parallel import global_sums

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SAME_SIGNAL_S = 1.0


class TrainingStopped(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """`with StopSignals(say) as stop:` records SIGINT / SIGTERM instead of dying mid-step;
    `stop.agreed()` at each step boundary is the signal any rank received (0: none). Handlers
    are installed only in the main thread (Python delivers signals there) and restored on exit."""

    def __init__(self, is_main: bool = True) -> None:
        self.is_main = is_main
        self.received = 0
        self._when = 0.0
        self._forwarded = bool(os.environ.get("TORCHELASTIC_RUN_ID"))  # a torchrun worker
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received and self._forwarded and now - self._when < SAME_SIGNAL_S:
            return  # the terminal's and torchrun's copies of one Ctrl-C
        if self.received:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.received, self._when = signum, now
        if self.is_main:  # os.write: print() is not safe inside a signal handler
            name = signal.Signals(signum).name
            os.write(
                2,
                f"\n{name}: stopping after this step with a checkpoint "
                "(Ctrl-C again stops at once, without one)\n".encode(),
            )

    def agreed(self) -> int:
        """The signal that any rank received, SIGINT first (a sync point: every rank calls it
        once per step)."""
        got_int, got_term = global_sums(
            [float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM)]
        )
        return signal.SIGINT if got_int else signal.SIGTERM if got_term else 0
