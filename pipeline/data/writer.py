"""Writing scans slab by slab: create-or-resume, a dask task runner with progress, completion.

A job (simulate, ingest, preprocess) describes its work as :class:`SlabTask` s, each writing
whole stored objects (chunks or shards along D) of some arrays. A task is *done* when every
object it writes exists (zarr writes an object atomically, so existence means fully written),
which makes any job resumable: rerun it with the same parameters and only the missing tasks
run. The scan's ``status`` stays ``incomplete`` until the last task finished.

Tasks run as a dask graph (``dask.delayed``), on the threaded scheduler by default, or on a
``dask.distributed`` cluster when ``scheduler="distributed"`` and a client is active; at most
``workers`` slabs are in memory at once on the threaded scheduler, which gets the tasks in
batches of :data:`TASK_BATCH`: dask's threaded scheduler holds about 5 KB per task of a graph,
so one graph of a tall scan's every chunk grew a job's memory with the scan (CT simulate +31 %
from 4 to 32 GiB, 2615 against 20920 tasks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import zarr

from .format import (
    ATTRS_KEY,
    ScanError,
    ScanMetadata,
    now_iso,
)
from .store import missing_chunks, open_group

__all__ = ["SlabTask", "run_tasks", "task_groups", "prepare_scan", "finish_scan", "JobOutcome", "jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples → lists), for attributes and comparisons."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class SlabTask:
    """One unit of work: ``fn()`` writes whole stored objects ``outputs = [(array, index)]``."""

    name: str
    fn: Callable[[], None]
    outputs: list[tuple[zarr.Array, int]] = field(default_factory=list)


#: Tasks per dask graph on the threaded scheduler: the scheduler's bookkeeping is bounded by a
#: batch, not the scan, and a batch's last task leaves the other workers idle for at most one
#: task in every TASK_BATCH / workers.
TASK_BATCH = 256

#: Bytes (decompressed, read and written) a task of several stored objects aims at, where a job
#: groups them (:func:`task_groups`). Measured on 2048×128² CT, 192 angles, 8-slice chunks, 2
#: workers: simulate and FBP 2.1–3× faster than one object a task at 8 MiB (max RSS 534 against
#: 380 MiB), little more at 16 or 32 MiB (727 and 832–893 MiB).
TASK_BYTES = 8 << 20


def task_groups(depth: int, stored: int, bytes_per_slice: int, *, budget: int | None = None,
                min_tasks: int = 8) -> list[tuple[range, int, int]]:
    """Consecutive stored objects along D grouped into tasks: ``(objects, d0, d1)`` each.

    A group holds about ``budget`` bytes (:data:`TASK_BYTES`; ``bytes_per_slice`` counts what a
    slice reads and writes) but no more than ``1/min_tasks`` of the objects, so a small scan
    still resumes in pieces; ``budget=0`` gives one object a task. The grid depends only on the
    scan's shape and chunking. Jobs whose
    slices are independent use it (parallel-beam simulation and FBP): a projector call on a
    thin slab costs several times more per update than on a thick one (8 against 256 slices of
    128², 192 angles: 3.6× forward, 9× adjoint), and one task per 8-slice chunk ran simulate and
    preprocess of a 32 GiB CT scan at that rate.
    """
    budget = TASK_BYTES if budget is None else int(budget)
    stored = max(1, int(stored))
    n = -(-int(depth) // stored)
    k = max(1, min(budget // max(1, stored * int(bytes_per_slice)), -(-n // max(1, int(min_tasks)))))
    return [(range(j0, min(j0 + k, n)), j0 * stored, min((j0 + k) * stored, int(depth)))
            for j0 in range(0, n, k)]


#: Config fields that say how a job runs, not what it writes: a resumed job may change them.
RUN_SETTINGS = frozenset({"out", "overwrite", "workers", "scheduler", "progress", "block_bytes"})


def _pending(tasks: Sequence[SlabTask]) -> list[SlabTask]:
    by_array: dict[int, tuple[zarr.Array, set[int]]] = {}
    for task in tasks:
        for arr, index in task.outputs:
            by_array.setdefault(id(arr), (arr, set()))[1].add(index)
    missing: set[tuple[int, int]] = set()
    for key, (arr, indices) in by_array.items():
        for index in missing_chunks(arr, sorted(indices)):
            missing.add((key, index))
    return [
        t for t in tasks if not t.outputs or any((id(a), i) in missing for a, i in t.outputs)
    ]


_THREADS_SAID: set[str] = set()


def _set_threads(torch: Any, workers: int) -> None:
    """Set this rank's torch threads per task (:func:`pipeline.threads.choose_threads`); rank 0
    says the choice once per process."""
    from pipeline.distributed import rank_and_world
    from pipeline.log import say
    from pipeline.threads import choose_threads

    choice = choose_threads(None, what="slab tasks", workers=workers)
    torch.set_num_threads(choice.threads)
    rank = rank_and_world()[0] or int(os.environ.get("RANK") or 0)  # torchrun's, before any group
    if choice.reason not in _THREADS_SAID and rank == 0:
        _THREADS_SAID.add(choice.reason)
        say(f"[recon3d] torch threads per task: {choice.reason}", "data")


def run_tasks(
    tasks: Sequence[SlabTask],
    *,
    description: str,
    workers: int = 1,
    scheduler: str = "threads",
    progress: bool = True,
) -> int:
    """Run the tasks not yet done; returns how many ran.

    Args:
        tasks: the job's tasks (done ones are skipped).
        description: the progress bar's label.
        workers: parallel tasks on the threaded scheduler (memory: ``workers`` slabs).
        scheduler: ``threads``, ``sync`` (one at a time, in this thread) or ``distributed``
            (the active ``dask.distributed`` client).
        progress: show a rich progress bar on stderr.
    """
    import dask
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    todo = _pending(tasks)
    done_before = len(tasks) - len(todo)
    if not todo:
        return 0
    workers = max(1, int(workers))
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold cyan]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress,
        transient=False,
    )
    threads_before = torch.get_num_threads()
    if scheduler in ("threads", "sync"):
        # Dask runs `workers` tasks at once; share this rank's CPUs (affinity, cgroup quota, ranks
        # on the node: pipeline/threads.py) between them instead of letting each task's torch ops
        # spawn a full pool (OMP_NUM_THREADS=1 stays 1: on a shared machine 2 spinning threads
        # per op made the iterative methods 20x slower).
        _set_threads(torch, workers if scheduler == "threads" else 1)
    try:
        with bar:
            handle = bar.add_task(description, total=len(tasks), completed=done_before)
            if scheduler == "distributed":
                from pipeline.errors import require_extra

                distributed = require_extra("distributed", "distributed", "--scheduler distributed")
                client, as_completed = distributed.get_client(), distributed.as_completed
                futures = [client.submit(t.fn, key=f"{description}-{t.name}", pure=False) for t in todo]
                for fut in as_completed(futures):
                    fut.result()
                    bar.advance(handle)
            elif scheduler in ("threads", "sync"):
                from dask.callbacks import Callback

                class _Advance(Callback):
                    def _posttask(self, key, result, dsk, state, worker_id):  # noqa: D401
                        bar.advance(handle)

                with _Advance():
                    for b0 in range(0, len(todo), TASK_BATCH):
                        graph = [
                            dask.delayed(t.fn, pure=False, name=f"{description}-{t.name}")(
                                dask_key_name=f"{description}-{t.name}"
                            )
                            for t in todo[b0 : b0 + TASK_BATCH]
                        ]
                        dask.compute(
                            *graph,
                            scheduler="threads" if scheduler == "threads" else "sync",
                            num_workers=workers,
                        )
            else:
                raise ValueError(
                    f"scheduler must be 'threads', 'sync' or 'distributed', got {scheduler!r}"
                )
    finally:
        torch.set_num_threads(threads_before)
    return len(todo)


@dataclass
class JobOutcome:
    """What a write job did: ``created``, ``resumed`` or ``already complete``; tasks run."""

    path: str
    state: str
    tasks_run: int = 0
    tasks_total: int = 0


def prepare_scan(
    path: Any,
    metadata: ScanMetadata,
    parameters: Mapping[str, Any],
    *,
    tool: str,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    sources: Sequence[str] = (),
) -> tuple[zarr.Group, str]:
    """Create the scan group, or reopen an unfinished one made with the same parameters.

    Returns ``(group, state)`` with state ``created``, ``resumed`` or ``complete`` (then
    nothing needs to be written). Only a scan written by the same command (``tool``'s
    ``recon3d simulate``/``recon3d ingest``) may be resumed or, with ``overwrite``, replaced;
    one made with other parameters is an error unless ``overwrite``.

    Raises:
        OutputConflictError: ``path`` holds anything else (a scan of the other command, an
            output image, a run, a foreign zarr group, a non-empty folder, a file), or lies
            inside one of ``sources`` or inside a zarr group: refused with or without
            ``overwrite``.
    """
    from pipeline.outputs import check_output

    command = tool.split()[1] if tool.startswith("recon3d ") else tool
    target = check_output(path, command, inputs=sources, storage_options=storage_options)
    params = jsonable(dict(parameters))
    existing = None
    if target.kind != "missing":
        try:
            existing = open_group(path, mode="r", storage_options=storage_options)
        except (FileNotFoundError, ScanError):
            existing = None
    if existing is not None and target.kind == "empty":
        existing = None  # an empty group: nothing to resume or to keep
    if existing is not None and not overwrite:
        attrs = dict(existing.attrs).get(ATTRS_KEY) or {}
        old = jsonable((attrs.get("provenance") or {}).get("parameters"))
        if old != params:
            changed = sorted(
                k for k in set(old or {}) | set(params) if (old or {}).get(k) != params.get(k)
            )
            raise ScanError(
                f"scan '{path}' already exists and was made with other parameters "
                f"(differing: {changed}); rerun with the same parameters to finish it, pass "
                f"--overwrite to replace it (it is an output of recon3d {command}), or choose "
                "another --out"
            )
        group = open_group(path, mode="r+", storage_options=storage_options)
        return group, "complete" if attrs.get("status") == "complete" else "resumed"
    group = open_group(path, mode="w" if overwrite or existing is not None else "a",
                       storage_options=storage_options)
    provenance = {
        "tool": tool,
        "written_by": command,
        "recon3d_version": _version(),
        "created": now_iso(),
        "parameters": params,
        "sources": list(sources),
    }
    meta = metadata.replace(status="incomplete", provenance=provenance)
    group.attrs[ATTRS_KEY] = jsonable(meta.to_dict())
    return group, "created"


def finish_scan(group: zarr.Group, **updates: Any) -> None:
    """Mark the scan complete (after every task ran), with optional metadata ``updates``."""
    attrs = dict(dict(group.attrs)[ATTRS_KEY])
    for key, value in updates.items():
        attrs[key] = jsonable(value)
    attrs["status"] = "complete"
    attrs.setdefault("provenance", {})["completed"] = now_iso()
    group.attrs[ATTRS_KEY] = attrs


def update_attrs(group: zarr.Group, **updates: Any) -> None:
    """Set top-level keys of the scan's ``recon3d`` attributes (during a job)."""
    attrs = dict(dict(group.attrs)[ATTRS_KEY])
    for key, value in updates.items():
        attrs[key] = jsonable(value)
    group.attrs[ATTRS_KEY] = attrs


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("recon3d")
    except Exception:  # not installed (running from a checkout)
        return "unknown"
