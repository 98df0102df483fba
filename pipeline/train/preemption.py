"""Stop requests: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) make the run save at the next step boundary and exit 0.

The handler only sets a flag; the training loop asks every rank at each step boundary
(:func:`pipeline.train.distributed.any_rank`), so a signal that reaches one rank (SLURM's
``--signal``, a Kubernetes eviction, torchrun forwarding SIGTERM) stops all of them at the
same step. The same signal often arrives twice within milliseconds (a scheduler signals the
whole process group and torchrun forwards it to its workers again), so repeats within
``grace_s`` are ignored; a signal after that restores the default action, so an impatient
second ``kill`` still kills.

Under ``torchrun`` the agent is the workers' parent. If it dies without forwarding a signal
(SIGKILL, OOM killer) the workers would train on, unsupervised, and a retry launcher would start
a second job in the same run directory. :class:`ParentWatch` polls ``os.getppid()``: when the
parent is gone (the worker was re-parented) it requests a stop exactly like SIGTERM, so the
ranks save at the next step boundary and exit. The gloo/NCCL connections between the workers
outlive the agent (its TCPStore is only needed to set them up), so the save works; should it
hang all the same (a worker died with the agent), the watch ends the process after
``exit_after_s`` — a save cut short is never resumed from (its manifest is written last).
Polling is used rather than ``prctl(PR_SET_PDEATHSIG)``, which fires when the parent *thread*
that started the worker exits, not necessarily the agent process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from pipeline.log import say

__all__ = ["StopRequest", "ParentWatch", "under_torchrun"]


# The parent this process started under, read as early as the package is imported: an agent
# that dies during the (long) set-up before the watch starts is still noticed.
_FIRST_PARENT = os.getppid()


def under_torchrun() -> bool:
    """Whether this process is a worker started by torchrun's elastic agent."""
    return any(k.startswith("TORCHELASTIC_") for k in os.environ)


class StopRequest:
    """Installs the handlers on enter and restores the previous ones on exit."""

    # SIGINT too: Ctrl-C on a long run saves it like a scheduler's SIGTERM instead of losing
    # the steps since the last checkpoint (a second Ctrl-C after grace_s still kills).
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.requested = False
        self.signal_name: str | None = None
        self.time: float | None = None
        self._previous: dict[int, object] = {}

    def request(self, reason: str) -> None:
        """Ask for a stop at the next step boundary (what a first signal does), from any thread."""
        if not self.requested:
            self.signal_name = reason
            self.time = time.monotonic()
            self.requested = True

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


class ParentWatch:
    """A daemon thread that requests a stop when this process's parent (the torchrun agent) dies.

    Args:
        stop: the run's :class:`StopRequest`.
        enabled: whether to watch at all (only workers of torchrun have an agent to lose).
        poll_s: how often the parent is checked.
        exit_after_s: after the parent died, end the process if it is still alive this long
            (the save did not complete, e.g. a peer died too).
    """

    def __init__(self, stop: StopRequest, *, enabled: bool = True, poll_s: float = 1.0,
                 exit_after_s: float = 120.0) -> None:
        self.stop = stop
        self.enabled = enabled
        self.poll_s = poll_s
        self.exit_after_s = exit_after_s
        self.parent = _FIRST_PARENT
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def _parent_gone(self) -> bool:
        # Re-parented to init (1) or a subreaper: the parent we started under has exited. A
        # parent that died before we recorded it leaves us under pid 1 from the start.
        return self.parent == 1 or os.getppid() != self.parent

    def _run(self) -> None:
        while not self._done.wait(self.poll_s):
            if self._parent_gone():
                say(f"[recon3d] rank {os.environ.get('RANK', '?')}: the torchrun agent (pid {self.parent}) "
                    "is gone: saving at the next step and exiting", "train", level=logging.WARNING)
                self.stop.request("the death of the torchrun agent")
                if not self._done.wait(self.exit_after_s):
                    say(f"[recon3d] rank {os.environ.get('RANK', '?')}: no clean stop {self.exit_after_s:g} s "
                        "after the agent died: exiting (the last complete checkpoint is intact)", "train",
                        level=logging.ERROR)
                    logging.shutdown()  # flush before the hard exit
                    os._exit(1)
                return

    def __enter__(self) -> "ParentWatch":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="recon3d-parent-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
