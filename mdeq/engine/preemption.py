"""Stopping a training run cleanly when the cluster asks: SIGTERM, SIGUSR1 (SLURM's warning before the kill),
SIGHUP (the terminal or ssh session went away) and a first Ctrl-C (SIGINT) let the current step finish; the
tool then saves ``last.pth`` atomically and exits with a message that says how to resume. A second Ctrl-C
interrupts at once, as usual.

    with StopSignals() as stop:
        for batch in loader:
            step(batch)
            if stop.agreed(env):   # every rank of a torchrun job stops after the same step
                save(); raise stop.exit(what_was_saved, resume_command)
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Dict, Optional

from .distributed import all_reduce_sum

__all__ = ["StopSignals", "TrainingStopped", "STOP_SIGNALS"]

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGHUP", "SIGINT")
                     if hasattr(signal, name))


class TrainingStopped(SystemExit):
    """A run stopped on a signal after saving its state; ``code`` is 128 + the signal number (the shell's
    convention for a job ended by a signal) and ``message`` says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopSignals:
    """Context manager that records a stop request instead of dying; restores the previous handlers on exit.

    Outside the main thread (where Python cannot install handlers) it records nothing and changes nothing.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received = signum
            again = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving the run "
                  f"state{again}", file=sys.stderr, flush=True)

    def agreed(self, env: Any = None) -> bool:
        """Whether to stop now: this process got a stop signal or, under torchrun, any rank did (a collective:
        every rank calls it after every step, so they all stop after the same step)."""
        local = self.received is not None
        if env is None or not getattr(env, "distributed", False):
            return local
        count = all_reduce_sum([1.0 if local else 0.0], env)[0]
        if count and self.received is None:
            self.received = signal.SIGTERM  # another rank was told to stop
        return count > 0

    def exit(self, what: str, resume_hint: str) -> TrainingStopped:
        """The exception that ends the tool: ``what`` was saved, ``resume_hint`` is the command that resumes."""
        name = signal.Signals(self.received or signal.SIGTERM).name
        return TrainingStopped(self.received or signal.SIGTERM,
                               f"stopped by {name}: {what}\nresume with: {resume_hint}")
