"""SIGINT/SIGTERM during training: a flag the loop reads after each step, so that it finishes
the step, writes a checkpoint and exits; a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes the step, checkpoints, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT == self.signal:  # Ctrl-C pressed twice: stop now
                raise KeyboardInterrupt
            return  # a repeated SIGTERM (torchrun forwards its own): already stopping
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step and writing a "
              "checkpoint (press again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
