"""The threaded task runner gives dask the tasks in batches (pipeline/data/writer.py): its
bookkeeping is bounded by a batch, not by the number of chunks of a tall scan."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
import zarr

import pipeline.data.writer as writer
from pipeline.data.writer import SlabTask, run_tasks


def _array(tmp_path, n: int) -> zarr.Array:
    """D-major, one stored object per slice, as the scans' arrays."""
    return zarr.create_array(str(tmp_path / "a.zarr"), shape=(n, 2, 2), chunks=(1, 2, 2), dtype="float32",
                             dimension_names=("d", "h", "w"), fill_value=0)


def _tasks(arr: zarr.Array, fail_at: int | None = None) -> list[SlabTask]:
    def write(i: int) -> None:
        if i == fail_at:
            raise RuntimeError(f"task {i} failed")
        arr[i] = i + 1

    return [SlabTask(f"slab{i}", (lambda i=i: write(i)), [(arr, i)]) for i in range(arr.shape[0])]


def test_every_task_runs_once_in_batches_of_task_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "TASK_BATCH", 3)
    import dask

    sizes: list[int] = []
    compute = dask.compute
    monkeypatch.setattr(dask, "compute", lambda *g, **kw: (sizes.append(len(g)), compute(*g, **kw))[1])
    arr = _array(tmp_path, 10)
    assert run_tasks(_tasks(arr), description="t", workers=2, progress=False) == 10
    assert sizes == [3, 3, 3, 1]
    np.testing.assert_array_equal(arr[:, 0, 0], np.arange(1, 11))
    assert run_tasks(_tasks(arr), description="t", workers=2, progress=False) == 0  # all done


def test_a_failure_stops_the_job_and_a_rerun_does_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "TASK_BATCH", 4)
    arr = _array(tmp_path, 12)
    with pytest.raises(RuntimeError, match="task 5 failed"):
        run_tasks(_tasks(arr, fail_at=5), description="t", workers=2, progress=False)
    done = arr[:, 0, 0]
    assert done[:4].tolist() == [1, 2, 3, 4]  # the first batch finished
    assert done[8:].tolist() == [0, 0, 0, 0]  # no batch after the failing one started
    ran = run_tasks(_tasks(arr), description="t", workers=2, progress=False)
    assert ran == int((done == 0).sum())
    np.testing.assert_array_equal(arr[:, 0, 0], np.arange(1, 13))


def _peak_of_run(n: int, monkeypatch) -> int:
    """Peak traced bytes of run_tasks over ``n`` no-op tasks (no outputs: always pending)."""
    lock = threading.Lock()
    count = [0]

    def tick() -> None:
        with lock:
            count[0] += 1

    tasks = [SlabTask(f"slab{i}", tick) for i in range(n)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        run_tasks(tasks, description="t", workers=2, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count[0] == n
    return peak - base


def test_the_runners_memory_does_not_grow_with_the_number_of_tasks(monkeypatch):
    small, large = _peak_of_run(512, monkeypatch), _peak_of_run(8192, monkeypatch)
    # one graph of every task held several KB per task (tens of MB for 8192); in batches the
    # difference is the task list's own growth
    assert large - small < 2 * 1024 * 1024, (small, large)
