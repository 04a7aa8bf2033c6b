"""Pre-emption and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT end a run cleanly, on every rank together.

Before training starts, a signal interrupts start-up at once (`Interrupted`: nothing to save yet).
Once the loop runs, the first signal only sets a flag: the loop finishes the current optimizer
step, all ranks agree on the flag in their per-step all-reduce, a checkpoint is written, the resume
command is logged and the process exits with EXIT_INTERRUPTED. A second signal exits at once.

Launchers multiply signals: Ctrl-C reaches every process of the terminal's group AND torchrun
forwards the same signal to its workers a moment later. A repeat of the same signal within
DUPLICATE_S is taken as that echo, not as a second request.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Optional

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; resume with --resume auto
SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGINT")) if s is not None)
DUPLICATE_S = 2.0


class Interrupted(Exception):
    """A signal arrived during start-up (before any training step): stop now, nothing to save."""

    def __init__(self, signame: str):
        super().__init__(f"interrupted by {signame} during start-up (nothing trained yet)")
        self.signame = signame


class PreemptionGuard:
    """Installs the handlers (main thread only); `requested` is the first signal's name once one arrived."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self.armed = False  # False: start-up (raise at once); True: the loop polls `requested`
        self._first_at = 0.0
        self._first_num: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a signal is honoured at the next step boundary (checkpoint, then exit)."""
        self.armed = True
        if self.requested:  # arrived between start-up and the loop
            log.warning("%s received before the first step: stopping at the first step boundary", self.requested)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.requested is None:
            self.requested, self._first_at, self._first_num = name, now, signum
            if not self.armed:
                raise Interrupted(name)
            log.warning("%s received: finishing the current step, then checkpoint and exit "
                        "(send it again to stop at once, without a checkpoint)", name)
            return
        if signum == self._first_num and now - self._first_at < DUPLICATE_S:
            return  # the launcher's echo of the same signal
        log.error("second signal (%s): exiting at once without a checkpoint; the newest checkpoint "
                  "on disk is still valid (--resume auto)", name)
        logging.shutdown()
        os._exit(128 + signum)
