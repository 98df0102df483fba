"""The lease of a reconstruction output: one job writes an output at a time.

A lease is a small JSON object beside the output, ``<parent>/.<name>.recon3d-lease.json``
(beside, not inside: preparing an output of another fingerprint clears the whole group, and a
folder holding only a lease must not look like a foreign folder). It names its owner (host,
pid, job), the output's fingerprint, a random token and a heartbeat time that a background
thread renews every ``heartbeat_s`` seconds while the job runs. Rank 0 of a job takes it before
it prepares the output and releases it at the end, on success or failure; the other ranks of
the same job never take it, they only check that it is held by their job with their
fingerprint. A job is identified by torchrun's ``TORCHELASTIC_RUN_ID`` (or
``MASTER_ADDR:MASTER_PORT``); ranks started by hand with ``RANK``/``WORLD_SIZE`` have no job id
and accept a live lease of their own fingerprint.

Taking it is atomic where the storage allows it:

* a local or network filesystem: the lease is written to a private temporary file and
  hard-linked to its name (``link`` fails if the name exists, and readers never see a partly
  written lease); where hard links are not supported, ``open(O_CREAT | O_EXCL)``;
* an fsspec URL: ``open(path, "xb")``, which object-store backends implement as a conditional
  put (write-if-absent) where the service offers one. Whether it is atomic is up to the backend
  (fsspec documents it so); where it is a check-then-write, two jobs started within one round
  trip may both write, and the read-back after taking it (last writer wins, the other refuses)
  is what separates them.

A lease is *stale* when its heartbeat is older than ``stale_s`` seconds (a job killed with
SIGKILL), or at once when its owner ran on this host and that process is gone. A stale lease is
taken over (and the job says so); a live one of another job is refused with
:class:`~pipeline.errors.OutputConflictError`. Heartbeat ages compare wall clocks: the hosts of
jobs sharing a filesystem need synchronised clocks (NTP) to within well under ``stale_s``.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipeline.errors import OutputConflictError, Recon3dError
from pipeline.paths import is_url, local_path

__all__ = [
    "HEARTBEAT_S",
    "STALE_S",
    "Lease",
    "LeaseInfo",
    "LeaseLostError",
    "job_id",
    "lease_path",
    "read_lease",
]

HEARTBEAT_S = 10.0
STALE_S = 60.0
SUFFIX = ".recon3d-lease.json"


class LeaseLostError(Recon3dError):
    """The lease of an output was taken over (or removed) while this job still wrote it."""


def job_id() -> str | None:
    """The id shared by the ranks of one launched job, or ``None`` for a job started by hand.

    A single-process job has none (``WORLD_SIZE`` unset or 1): a ``MASTER_PORT`` exported in a
    shell for every job must not make two separate jobs look like one.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run and run != "none":
        return f"torchelastic:{run}"
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return f"master:{addr}:{port}"
    return None


def lease_path(out: str) -> str:
    """Where the lease of output ``out`` lives: a hidden object beside it."""
    text = str(out) if is_url(out) else str(local_path(out))
    text = text.rstrip("/") or text
    split = posixpath.split if is_url(text) else os.path.split
    parent, name = split(text)
    if not name:
        raise OutputConflictError(f"reconstruct: --out {out!r} names no folder; give a path below a parent")
    return (posixpath.join if is_url(text) else os.path.join)(parent, f".{name}{SUFFIX}")


@dataclass(frozen=True)
class LeaseInfo:
    """A lease as read back: its owner, fingerprint and heartbeat."""

    token: str
    host: str
    pid: int
    job: str | None
    fingerprint: str
    out: str
    acquired: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> "LeaseInfo | None":
        try:
            d = json.loads(data)
            return cls(str(d["token"]), str(d["host"]), int(d["pid"]), d.get("job"), str(d["fingerprint"]),
                       str(d.get("out", "")), float(d["acquired"]), float(d["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None

    def age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def owner_gone(self) -> bool:
        """Whether the owner ran on this host and its process no longer exists."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # EPERM: a process of another user has that pid
            return False
        return False

    def stale(self, stale_s: float) -> bool:
        """Whether the lease may be taken over: no heartbeat for ``stale_s`` s, or its owner is gone."""
        return self.age() > stale_s or self.owner_gone()

    def describe(self) -> str:
        """The owner in words: host, pid, job, fingerprint prefix and heartbeat age."""
        job = f", job {self.job}" if self.job else ""
        return (f"host {self.host}, pid {self.pid}{job}, fingerprint {self.fingerprint[:12]}, "
                f"heartbeat {self.age():.0f} s ago")


# ----------------------------------------------------------------------------- storage
class _Local:
    """A lease file on a local or network filesystem."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _tmp(self) -> str:
        head, name = os.path.split(self.path)
        return os.path.join(head, f"{name}.{uuid.uuid4().hex}.tmp")

    def _write(self, path: str, data: bytes, flags: int) -> None:
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def create(self, data: bytes) -> bool:
        """Write the lease if none exists; ``False`` if one does. Atomic."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self._tmp()
        self._write(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and SMB mounts): exclusive create
            try:
                self._write(self.path, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                return True
            except FileExistsError:
                return False
        finally:
            os.unlink(tmp)

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        """Overwrite the lease atomically (readers see the old or the new one)."""
        tmp = self._tmp()
        self._write(tmp, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.replace(tmp, self.path)

    #: A takeover lock older than this (its holder was killed between two syscalls) is cleared.
    TAKEOVER_STALE_S = 30.0

    def take_over(self, token: str, data: bytes) -> bool:
        """Replace the lease that carries ``token`` (``""``: an unreadable one) by ``data``.

        Contenders for a stale lease first create a takeover lock (exclusive create, one wins);
        the winner checks that the lease is still the stale one and replaces it in one
        ``os.replace``, so the lease name is never empty and a fresh ``create`` can never slip in
        between (removing the stale lease and creating a new one let two of three simultaneous
        contenders both believe they held it). ``False``: another contender got there first.
        """
        lock = f"{self.path}.takeover"
        try:
            self._write(lock, str(os.getpid()).encode(), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            self._clear_stale_lock(lock)
            return False
        try:
            current = self.read()
            if current is None:
                return False
            info = LeaseInfo.parse(current)
            if (info.token if info is not None else "") != token:
                return False
            self.replace(data)
            return True
        finally:
            os.unlink(lock)

    def _clear_stale_lock(self, lock: str) -> None:
        try:
            if time.time() - os.stat(lock).st_mtime < self.TAKEOVER_STALE_S:
                return
            grave = f"{lock}.{uuid.uuid4().hex}.stale"
            os.rename(lock, grave)
            os.unlink(grave)
        except FileNotFoundError:
            pass

    def remove_if(self, token: str) -> bool:
        """Remove the lease if it still carries ``token``; ``False`` if another one was there.

        The lease is first renamed to a private name (one contender wins the rename); if what
        was renamed is not the expected lease, it is linked back.
        """
        grave = f"{self.path}.{uuid.uuid4().hex}.stale"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return True
        with open(grave, "rb") as f:
            info = LeaseInfo.parse(f.read())
        mine = info is None or info.token == token
        if not mine:
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
        os.unlink(grave)
        return mine


class _Remote:
    """A lease object in an fsspec store (S3, GCS, Azure, memory...)."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None) -> None:
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(path, **dict(storage_options or {}))

    def create(self, data: bytes) -> bool:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError):  # no exclusive create: check, then write
            if self.fs.exists(self.path):
                return False
            with self.fs.open(self.path, "wb") as f:
                f.write(data)
            return True

    def read(self) -> bytes | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(data)

    def take_over(self, token: str, data: bytes) -> bool:
        """Remove the stale lease carrying ``token``; the caller's next ``create`` competes for
        the name (object stores have no rename: write-if-absent is the arbiter here)."""
        self.remove_if(token)
        return False

    def remove_if(self, token: str) -> bool:
        data = self.read()
        if data is None:
            return True
        info = LeaseInfo.parse(data)
        if info is not None and info.token != token:
            return False
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            pass
        return True


def _storage(out: str, storage_options: Mapping[str, Any] | None):
    path = lease_path(out)
    return _Remote(path, storage_options) if is_url(path) else _Local(path)


def read_lease(out: str, storage_options: Mapping[str, Any] | None = None) -> LeaseInfo | None:
    """The lease of output ``out`` as it is now, or ``None`` (none, or unreadable)."""
    data = _storage(out, storage_options).read()
    return None if data is None else LeaseInfo.parse(data)


# ----------------------------------------------------------------------------- the lease
class Lease:
    """This job's lease of an output: taken by :meth:`acquire`, renewed by a thread, released
    by :meth:`release` (or on leaving a ``with`` block)."""

    def __init__(self, out: str, fingerprint: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        if not 0 < heartbeat_s < stale_s:
            raise ValueError(f"reconstruct: the lease heartbeat ({heartbeat_s} s) must be > 0 and below the "
                             f"stale age ({stale_s} s)")
        self.out = str(out)
        self.path = lease_path(self.out)
        self.fingerprint = fingerprint
        self.heartbeat_s = float(heartbeat_s)
        self.stale_s = float(stale_s)
        self.storage = _storage(self.out, storage_options)
        self.token = uuid.uuid4().hex
        self.acquired = time.time()
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({
            "token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "job": job_id(),
            "fingerprint": self.fingerprint, "out": self.out, "acquired": self.acquired,
            "heartbeat": now, "heartbeat_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "heartbeat_s": self.heartbeat_s, "stale_s": self.stale_s, "tool": "recon3d reconstruct",
        }, sort_keys=True).encode()

    def _conflict(self, other: LeaseInfo) -> OutputConflictError:
        same = " (the same settings)" if other.fingerprint == self.fingerprint else ""
        return OutputConflictError(
            f"reconstruct: '{self.out}' is being written by another job ({other.describe()}{same}; this job's "
            f"fingerprint is {self.fingerprint[:12]}); wait for it to finish, or choose another --out. "
            f"Its lease {self.path} is taken over once its heartbeat is {self.stale_s:.0f} s old "
            "(at once if its process on this host is gone)"
        )

    def acquire(self, say: Callable[[str], None] | None = None) -> "Lease":
        """Take the lease, taking over a stale one (``say`` is told so).

        Raises:
            OutputConflictError: another job holds a live lease of this output.
        """
        if say is None:
            from pipeline.log import say as log

            say = lambda message: log(f"recon3d reconstruct: {message}", "reconstruct")  # noqa: E731
        for _ in range(5):
            self.acquired = time.time()
            if self.storage.create(self._payload()):
                info = self._hold_if_ours()
                if self.held:
                    return self
                if info is not None:  # a non-atomic store let another job write after us
                    raise self._conflict(info)
                continue
            data = self.storage.read()
            if data is None:  # released meanwhile
                continue
            other = LeaseInfo.parse(data)
            if other is None:
                say(f"replacing the unreadable lease {self.path}")
                stale_token = ""
            else:
                ours = other.job is not None and other.job == job_id()
                if not (ours or other.stale(self.stale_s)):
                    raise self._conflict(other)
                why = "an earlier attempt of this job" if ours else (
                    "its process is gone" if other.owner_gone() else f"no heartbeat for {other.age():.0f} s")
                say(f"taking over the stale lease of '{self.out}' ({other.describe()}: {why})")
                stale_token = other.token
            self.acquired = time.time()
            if self.storage.take_over(stale_token, self._payload()):
                self._hold_if_ours()
                if self.held:
                    return self
        raise OutputConflictError(f"reconstruct: could not take the lease {self.path} of '{self.out}': other "
                                  "jobs keep taking it; wait for them, or choose another --out")

    def _hold_if_ours(self) -> LeaseInfo | None:
        """Read the lease back after writing it; if it carries our token, hold it (start beating)."""
        back = self.storage.read()
        info = None if back is None else LeaseInfo.parse(back)
        if info is not None and info.token == self.token:
            self.held = True
            self._start()
        return info

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"recon3d-lease {self.out}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                data = self.storage.read()
                info = None if data is None else LeaseInfo.parse(data)
                if info is None or info.token != self.token:
                    self.lost = ("its lease was removed" if info is None
                                 else f"its lease was taken over by {info.describe()}")
                    return
                self.storage.replace(self._payload())
            except OSError:  # a transient storage error: the next beat tries again
                continue

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if another job took the lease (or it was removed)."""
        if self.lost is None and self.held:
            data = self.storage.read()
            info = None if data is None else LeaseInfo.parse(data)
            if info is None:
                self.lost = "its lease was removed"
            elif info.token != self.token:
                self.lost = f"its lease was taken over by {info.describe()}"
        if self.lost is not None:
            raise LeaseLostError(f"reconstruct: stopped writing '{self.out}': {self.lost} (this job's "
                                 f"fingerprint {self.fingerprint[:12]}); rerun the command once the other "
                                 "job has finished, or choose another --out")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.held:
            self.held = False
            try:
                self.storage.remove_if(self.token)
            except OSError:  # the job's own error matters more; a leftover lease goes stale
                pass

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_joined(out: str, fingerprint: str, *, stale_s: float = STALE_S,
                 storage_options: Mapping[str, Any] | None = None) -> tuple[bool, LeaseInfo | None]:
    """For a rank other than 0: ``(ready, lease)`` — whether its job's rank 0 holds the lease.

    Ready when a live lease carries ``fingerprint`` and (where both are known) this job's id.

    Raises:
        OutputConflictError: a live lease of another job or fingerprint: this job's rank 0 will
            be refused, so waiting is pointless.
    """
    info = read_lease(out, storage_options)
    if info is None or info.stale(stale_s):
        return False, info
    me = job_id()
    other_job = info.job is not None and me is not None and info.job != me
    if info.fingerprint != fingerprint or other_job:
        raise OutputConflictError(
            f"reconstruct: '{out}' is being written by another job ({info.describe()}; this job's "
            f"fingerprint is {fingerprint[:12]}{', job ' + me if me else ''}); wait for it to finish, or "
            "choose another --out"
        )
    return True, info
