"""Stop requests: SIGTERM / SIGUSR1 make the run save at the next step boundary and exit 0.

The handler only sets a flag; the training loop asks every rank at each step boundary
(:func:`pipeline.train.distributed.any_rank`), so a signal that reaches one rank (SLURM's
``--signal``, a Kubernetes eviction, torchrun forwarding SIGTERM) stops all of them at the
same step. The same signal often arrives twice within milliseconds (a scheduler signals the
whole process group and torchrun forwards it to its workers again), so repeats within
``grace_s`` are ignored; a signal after that restores the default action, so an impatient
second ``kill`` still kills.
"""

from __future__ import annotations

import signal
import time

__all__ = ["StopRequest"]


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.requested = False
        self.signal_name: str | None = None
        self.time: float | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if time.monotonic() - self.time < self.grace_s:
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.time = time.monotonic()

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
