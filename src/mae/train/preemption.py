"""Stopping a run cleanly on a signal: SIGTERM (what SLURM and Kubernetes send on preemption), SIGUSR1 (SLURM's
``--signal=USR1@120``) and SIGINT (Ctrl-C).

While a run trains, `SignalStop` replaces the handlers of those signals with one that only records the signal; the
training loop finishes the update in progress, writes a checkpoint and raises `mae.errors.Interrupted`, which the
CLI turns into exit code 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1, 130 for SIGINT). A second
SIGINT interrupts at once, as Ctrl-C usually does: a KeyboardInterrupt (exit 130), also when it lands inside a
library that reports it as an error of its own (torch's zip writer turns it into a RuntimeError, and the atomic
writer that into a failed write). The previous handlers come back when the run ends.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from mae.errors import Interrupted

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["STOP_SIGNALS", "SignalStop"]

_log = logging.getLogger(__name__)

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT)
                     if s is not None)


class SignalStop:
    """Context manager that records a stop signal instead of dying of it; ``requested`` is the signal number or
    None. Outside the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self.forced = False  # a second Ctrl-C came: the run stops at once
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, an int or None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested is not None:
            self.forced = True
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None:
            _log.warning("received %s: finishing the current update, then saving a checkpoint and stopping",
                         signal.Signals(signum).name)
        self.requested = signum

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self.forced and exc is not None and not isinstance(exc, KeyboardInterrupt):
            # the second Ctrl-C, raised inside a write that reported it as its own failure: it is still Ctrl-C
            raise KeyboardInterrupt from exc
        if exc is None and self.requested is not None:
            # the signal came after the loop's last check (during the last epoch's checkpoint or evaluation): the
            # process was still told to stop, so it stops instead of going on (to the final exports, to the next
            # stage of a demo or sweep) as if nothing had been asked
            name = signal.Signals(self.requested).name
            raise Interrupted(f"stopped by {name} as the run ended, after saving its last checkpoint; continue with "
                              f"--resume auto", self.requested)
