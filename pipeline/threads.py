"""Torch threads per process from the CPUs this process may actually use (issue 17.5).

On an oversubscribed machine more torch threads than cores make every op slower (measured here:
2 threads ran the projector 2–3× slower than 1 and training steps 10× slower), so the default is
not torch's (the node's cores) but the share of this process:

    available = min(len(sched_getaffinity), cgroup CPU quota, os.cpu_count())
    threads   = max(1, available // ranks on this node // workers in this process)

The ranks on this node are ``LOCAL_WORLD_SIZE`` (set by torchrun) or what the caller says; the
workers are the slabs a process computes at once (``recon3d reconstruct --workers``).

Precedence (:func:`choose_threads`): an explicit value (``run.threads`` in a training config)
> ``OMP_NUM_THREADS`` in the environment > the automatic share above. An explicit value or
``OMP_NUM_THREADS`` is the budget of the process, shared by its workers. torchrun sets
``OMP_NUM_THREADS=1`` itself when it starts several processes per node and the variable was not
set; that value is recognised (torchrun's own environment lacks it) and counts as unset, so
the automatic share applies — set ``run.threads`` or export ``OMP_NUM_THREADS`` before torchrun
to force a number. A forced number is kept even when it gives the node more threads than it has
CPUs (threads × ranks on this node × workers); the reason, which training and slab jobs print at
start, then carries a ``WARNING`` with that product and how to undo it.

Everything reads through injectable functions (``read``, ``affinity``, ``env``) so tests can
describe any machine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

__all__ = ["CpuBudget", "ThreadChoice", "available_cpus", "cgroup_cpu_quota", "choose_threads",
           "cpu_budget", "local_world_size", "threads_per_rank"]

Reader = Callable[[str], "str | None"]

#: cgroup v1 mount points of the ``cpu`` controller (the names differ between distributions).
_V1_DIRS = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct,cpu")


def _read_text(path: str) -> str | None:
    """The file's text, or None when it is missing or unreadable (no cgroup, another OS)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _own_cgroups(read: Reader) -> tuple[str | None, str | None]:
    """``(v2 path, v1 cpu path)`` of this process's cgroup from ``/proc/self/cgroup``."""
    text = read("/proc/self/cgroup") or ""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _parse_v2(text: str | None) -> float | None:
    """``cpu.max``: ``"QUOTA PERIOD"`` → QUOTA/PERIOD CPUs; ``"max ..."`` → no limit (None)."""
    if not text:
        return None
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    try:
        quota = float(fields[0])
        period = float(fields[1]) if len(fields) > 1 else 100000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _parse_v1(quota_text: str | None, period_text: str | None) -> float | None:
    """``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 means no limit (None)."""
    try:
        quota = float((quota_text or "").strip())
        period = float((period_text or "").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(read: Reader = _read_text) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5: one and a half), None if unlimited.

    cgroup v2 (``cpu.max``) first, then v1 (``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``), each
    in the process's own cgroup and at the mount's root (what a container sees); the smallest
    quota found wins. Missing files mean no limit.
    """
    v2, v1 = _own_cgroups(read)
    found: list[float] = []
    for base in dict.fromkeys(p for p in ("/sys/fs/cgroup" + (v2 or "").rstrip("/"), "/sys/fs/cgroup")):
        q = _parse_v2(read(f"{base}/cpu.max"))
        if q is not None:
            found.append(q)
    for root in _V1_DIRS:
        for base in dict.fromkeys((root + (v1 or "").rstrip("/"), root)):
            q = _parse_v1(read(f"{base}/cpu.cfs_quota_us"), read(f"{base}/cpu.cfs_period_us"))
            if q is not None:
                found.append(q)
    return min(found) if found else None


def _affinity() -> int | None:
    """CPUs this process may run on (``sched_getaffinity``), None where the OS has no such call."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return len(getaffinity(0))
    except OSError:
        return None


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use and where the limit comes from."""

    cpu_count: int
    affinity: int | None  # None: the OS does not say
    quota: float | None  # cgroup CPU quota in CPUs; None: no limit

    @property
    def available(self) -> int:
        """min(affinity, floor(quota), cpu_count), at least 1."""
        limits = [self.cpu_count]
        if self.affinity is not None:
            limits.append(self.affinity)
        if self.quota is not None:
            limits.append(math.floor(self.quota))
        return max(1, min(limits))

    def describe(self) -> str:
        """E.g. ``2 CPUs available: affinity 2, cgroup quota none, 8 on the machine``."""
        quota = "none" if self.quota is None else f"{self.quota:g}"
        affinity = "unknown" if self.affinity is None else str(self.affinity)
        return (f"{self.available} CPU{'s' if self.available != 1 else ''} available: affinity {affinity}, "
                f"cgroup quota {quota}, {self.cpu_count} on the machine")


def cpu_budget(*, read: Reader = _read_text, affinity: Callable[[], int | None] = _affinity,
               cpu_count: Callable[[], int | None] = os.cpu_count) -> CpuBudget:
    """The :class:`CpuBudget` of this process (the readers are injectable for tests)."""
    return CpuBudget(cpu_count=max(1, cpu_count() or 1), affinity=affinity(), quota=cgroup_cpu_quota(read))


def available_cpus(**readers) -> int:
    """min(len(sched_getaffinity(0)), cgroup CPU quota, os.cpu_count()), at least 1."""
    return cpu_budget(**readers).available


def local_world_size(ranks_per_node: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun's), else ``ranks_per_node``, else 1."""
    env = os.environ if env is None else env
    value = env.get("LOCAL_WORLD_SIZE")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"LOCAL_WORLD_SIZE={value!r} is not a whole number; unset it or set the "
                             f"number of ranks on this node") from None
    return max(1, int(ranks_per_node or 1))


def threads_per_rank(ranks_per_node: int | None = None, workers: int = 1, *,
                     budget: CpuBudget | None = None, env: Mapping[str, str] | None = None) -> int:
    """max(1, available CPUs // ranks on this node // workers per rank)."""
    budget = cpu_budget() if budget is None else budget
    return max(1, budget.available // local_world_size(ranks_per_node, env) // max(1, int(workers)))


class ThreadChoice(NamedTuple):
    """The torch threads chosen, why (a sentence for the log), and from what: ``config``,
    ``OMP_NUM_THREADS`` or ``auto``."""

    threads: int
    reason: str
    source: str


def _torchrun_default(env: Mapping[str, str], parent_environ: Callable[[], "str | None"]) -> bool:
    """Whether ``OMP_NUM_THREADS=1`` is torchrun's own default rather than the user's: torchrun
    started this process (``TORCHELASTIC_RUN_ID``) and its environment at start lacked it."""
    if env.get("OMP_NUM_THREADS", "").strip() != "1" or "TORCHELASTIC_RUN_ID" not in env:
        return False
    text = parent_environ()
    return text is not None and not any(v.startswith("OMP_NUM_THREADS=") for v in text.split("\0"))


def _parent_environ() -> str | None:
    return _read_text(f"/proc/{os.getppid()}/environ")


def _oversubscribed(threads: int, what: str, ranks_per_node: int | None, workers: int,
                    env: Mapping[str, str], budget: CpuBudget | None, fix: str) -> str:
    """A warning for the reason when a forced thread count asks for more threads on this node
    than it has CPUs to give (threads × ranks on this node × workers), else ``""``."""
    try:
        ranks = local_world_size(ranks_per_node, env)
    except ValueError:
        ranks = 1
    budget = cpu_budget() if budget is None else budget
    total = threads * ranks * workers
    if total <= budget.available:
        return ""
    parts = [f"{threads} thread{'s' if threads != 1 else ''}"]
    if ranks > 1:
        parts.append(f"{ranks} ranks on this node")
    if workers > 1:
        parts.append(f"{workers} workers")
    return (f"; WARNING: {' × '.join(parts)} = {total} threads on {budget.available} "
            f"CPU{'s' if budget.available != 1 else ''} available: oversubscribed, which ran "
            f"training steps up to 10× slower on a 2-CPU machine ({what}); {fix}")


def choose_threads(requested: int | None, *, what: str = "torch", ranks_per_node: int | None = None,
                   workers: int = 1, env: Mapping[str, str] | None = None, budget: CpuBudget | None = None,
                   parent_environ: Callable[[], "str | None"] = _parent_environ) -> ThreadChoice:
    """Torch threads for each of ``workers`` in this process, and the reason.

    ``requested`` (a config value or flag) > ``OMP_NUM_THREADS`` (unless it is torchrun's default)
    > :func:`threads_per_rank`. An explicit value is this process's budget: each worker gets
    ``max(1, value // workers)``. ``what`` names the job in the reason.
    """
    env = os.environ if env is None else env
    workers = max(1, int(workers))
    per_worker = f", {workers} workers per rank" if workers > 1 else ""
    override = "set run.threads or OMP_NUM_THREADS to override" if what == "training" else \
        "set OMP_NUM_THREADS to override"
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"{what}: threads must be at least 1, got {requested}")
        n = max(1, int(requested) // workers)
        warning = _oversubscribed(n, what, ranks_per_node, workers, env, budget, "lower run.threads"
                                  if what == "training" else "lower the thread count")
        return ThreadChoice(n, f"{n} (asked for {requested}{per_worker}){warning}", "config")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    torchrun_default = _torchrun_default(env, parent_environ)
    if omp and not torchrun_default:
        try:
            value = int(omp)
        except ValueError:
            value = 0
        if value >= 1:
            n = max(1, value // workers)
            warning = _oversubscribed(n, what, ranks_per_node, workers, env, budget,
                                      "unset OMP_NUM_THREADS for the automatic share")
            return ThreadChoice(n, f"{n} (OMP_NUM_THREADS={value}{per_worker}){warning}", "OMP_NUM_THREADS")
        override = f"OMP_NUM_THREADS={omp!r} ignored: not a positive whole number; " + override
    budget = cpu_budget() if budget is None else budget
    ranks = local_world_size(ranks_per_node, env)
    n = threads_per_rank(ranks, workers, budget=budget, env={})
    note = "; OMP_NUM_THREADS=1 was torchrun's default" if torchrun_default else ""
    return ThreadChoice(n, f"{n} ({budget.describe()}; {ranks} rank{'s' if ranks != 1 else ''} on this node"
                           f"{per_worker}{note}); {override}", "auto")
