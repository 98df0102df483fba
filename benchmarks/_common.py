"""Shared helpers for the benchmark scripts: timing, peak memory, tables.

Peak memory on CPU is read from the kernel: ``/proc/self/clear_refs`` (writing ``5``) resets
the high-water mark ``VmHWM``, so the peak of one call is ``VmHWM − VmRSS`` measured around it.
Large torch allocations are ``mmap``-ed and returned on free, so RSS follows the tensors.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Callable

import torch


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def scan_bytes(path: str) -> int:
    """Uncompressed bytes of every array of a recon3d scan."""
    from pipeline.data import inspect_scan

    return sum(a.nbytes for a in inspect_scan(path).arrays)


def peak_memory_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` once and return (peak bytes above the RSS before the call, its result)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status_kib("VmRSS")
    out = fn()
    peak = status_kib("VmHWM")
    return max(0, (peak - base) * 1024), out


def time_call(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{time.strftime('%Y-%m-%d')}  {cpu}  {os.cpu_count()} cores  "
        f"torch {torch.__version__}  threads {torch.get_num_threads()}"
    )


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def saved_tensor_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Bytes of tensors that autograd saves for backward while ``fn`` runs."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


class TreeMemoryMonitor:
    """Peak memory of a process and all its descendants, sampled in a background thread.

    Sums the proportional set size (PSS: shared pages split among the processes that map
    them, so forked workers are not counted twice) over the process tree every ``interval``
    seconds; falls back to RSS where PSS is unreadable. Needs ``psutil``.
    ``mark_baseline()`` records the current total; ``peak_above_baseline`` is what the work
    after it added.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import threading

        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        total = 0
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except self._psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.total())
            self._stop.wait(self.interval)

    def start(self) -> "TreeMemoryMonitor":
        self._thread.start()
        return self

    def mark_baseline(self) -> None:
        self.baseline = self.total()
        self.peak = self.baseline

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


def run_monitored_child(argv: list[str], name: str, *, interval: float = 0.2) -> tuple[dict, "TreeMemoryMonitor"]:
    """Run ``argv`` (a benchmark child) and measure the PSS of its process tree.

    Protocol: the child prints ``READY`` once set up (its footprint then is the baseline),
    waits for a line on stdin, does the measured work and prints one JSON object.
    Returns that object and the stopped monitor (``peak``, ``baseline``,
    ``peak_above_baseline``).
    """
    import json
    import subprocess

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    monitor = TreeMemoryMonitor(proc.pid, interval=interval)
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise RuntimeError(f"child {name} failed to start: {line!r}")
    monitor.mark_baseline()
    monitor.start()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.readline()
    proc.wait()
    monitor.stop()
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"child {name} failed with exit code {proc.returncode}")
    return json.loads(out), monitor


def scratch_dir(given, prefix: str):
    """``(path, handle)``: the folder ``given`` (made if missing), or a fresh temporary one whose
    ``handle`` (a ``TemporaryDirectory``; ``None`` for ``given``) removes it when cleaned up."""
    import tempfile
    from pathlib import Path

    if given is None:
        handle = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(handle.name), handle
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    return path, None
