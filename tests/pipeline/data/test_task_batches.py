"""The threaded task runner gives dask the tasks in batches (pipeline/data/writer.py): its
bookkeeping is bounded by a batch, not by the number of chunks of a tall scan."""

from __future__ import annotations

import threading
import time
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
    time.sleep(0.5)  # a task in flight when the batch failed may still finish its write
    missing = int((arr[:, 0, 0] == 0).sum())
    ran = run_tasks(_tasks(arr), description="t", workers=2, progress=False)
    assert ran == missing >= 5  # the failed task and the last batch at least
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


def test_task_groups_take_about_the_budget_and_keep_small_scans_in_pieces():
    from pipeline.data.writer import task_groups

    # 8-slice objects of 1 KiB a slice, 24 KiB a task: 3 objects per group, the last one short
    groups = task_groups(100, 8, 1024, budget=24 * 1024, min_tasks=1)
    assert [(g.start, g.stop, d0, d1) for g, d0, d1 in groups] == [
        (0, 3, 0, 24), (3, 6, 24, 48), (6, 9, 48, 72), (9, 12, 72, 96), (12, 13, 96, 100)]
    # a budget larger than the scan still leaves min_tasks tasks
    assert len(task_groups(100, 8, 1024, budget=1 << 30, min_tasks=4)) == 4
    assert [len(g) for g, _, _ in task_groups(16, 2, 1 << 30)] == [1] * 8  # over budget: one each


@pytest.mark.parametrize("geometry", ["parallel"])
def test_grouped_tasks_write_what_one_object_a_task_writes(tmp_path, monkeypatch, geometry):
    """Parallel-beam simulation and FBP with several stored objects a task store the same arrays
    as with one object a task."""
    from pipeline.data import PreprocessConfig, SimulateCTConfig, open_scan, preprocess, simulate_ct

    def run(name: str, budget: int) -> tuple[np.ndarray, ...]:
        monkeypatch.setattr(writer, "TASK_BYTES", budget)
        out = tmp_path / name
        job = simulate_ct(SimulateCTConfig(out=str(out), shape=(48, 24, 24), angles=20, chunk_depth=2,
                                           workers=2, noise_sigma=0.01, progress=False))
        tasks.append(job.tasks_total)
        preprocess(PreprocessConfig(scan=str(out), outputs=["fbp", "n2i"], workers=2, progress=False))
        scan = zarr.open_group(str(out), mode="r")
        return tuple(np.asarray(scan[k][:]) for k in ("measurements", "reference", "derived/fbp", "derived/n2i"))

    tasks: list[int] = []
    one, grouped = run("one.zarr", 1), run("grouped.zarr", 1 << 30)
    assert tasks == [1 + 24, 1 + 8]  # the angles, then 24 objects one by one or in 8 groups
    for name, a, b in zip(("measurements", "reference", "fbp", "n2i"), one, grouped):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * float(np.abs(a).max()), err_msg=name)
