"""Reader threads (``worker_type="thread"``): the same samples in the same order as worker
processes and as reading in the loop, exact mid-epoch resume, reader errors raised unchanged in
the loop, and no reader thread left running after the loop stops."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.data import CorruptChunkError, MissingChunkError, SlabStream, SlabStreamConfig, open_scan
from pipeline.data.stream import READER_THREAD_PREFIX, read_ahead


def _config(*scans, **kw):
    kw.setdefault("num_workers", 2)
    kw.setdefault("worker_type", "thread")
    return SlabStreamConfig(scans=tuple(scans), **kw)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(READER_THREAD_PREFIX)]


def _chunk_file(scan: str, array: str, d_index: int) -> Path:
    arr = getattr(open_scan(scan), array).array
    coords = [0] * arr.ndim
    coords[list(arr.metadata.dimension_names).index("d")] = d_index
    return Path(scan) / array / arr.metadata.encode_chunk_key(tuple(coords))


def _assert_same(a, b):
    assert [s.meta["position"] for s in a] == [s.meta["position"] for s in b]
    for s, t in zip(a, b):
        assert s.meta["d_slice"] == t.meta["d_slice"] and s.meta["scan"] == t.meta["scan"]
        assert torch.equal(s.y, t.y)
        maps = getattr(s.op, "coil_maps", None)
        if maps is not None:
            assert torch.equal(maps, t.op.coil_maps)
            assert torch.equal(s.op.mask, t.op.mask)
        if "reference" in s.meta:
            assert torch.equal(s.meta["reference"], t.meta["reference"])


@pytest.fixture(autouse=True)
def _no_reader_left_behind():
    yield
    assert _readers() == []


def test_threads_are_the_default():
    assert SlabStreamConfig(scans=("a.zarr",)).worker_type == "thread"
    with pytest.raises(ValueError, match="worker_type must be 'thread' or 'process'"):
        SlabStreamConfig(scans=("a.zarr",), worker_type="threads")


def test_threads_match_processes_and_the_loop(mri_scan, ct_scan):
    scans = (mri_scan, ct_scan)
    inline = list(SlabStream(_config(*scans, num_workers=0, seed=5, include_reference=True)))
    threads = list(SlabStream(_config(*scans, num_workers=3, prefetch_factor=1, seed=5, include_reference=True)))
    processes = list(SlabStream(_config(*scans, worker_type="process", seed=5, include_reference=True)))
    assert len(inline) == 9
    _assert_same(threads, inline)
    _assert_same(processes, inline)
    # The operators are the same too: apply both to one image.
    for s, t in zip(threads, inline):
        x = torch.randn(*s.meta["reference"].shape, dtype=s.meta["reference"].dtype)
        assert torch.allclose(s.op(x), t.op(x), rtol=1e-6, atol=1e-6)


def test_thread_batches_match_the_loop(ct_scan):
    inline = list(SlabStream(_config(ct_scan, num_workers=0, batch_size=3)))
    threads = list(SlabStream(_config(ct_scan, batch_size=3)))
    assert [b.y.shape[0] for b in threads] == [3, 1]
    for a, b in zip(threads, inline):
        assert torch.equal(a.y, b.y)
        assert [m["position"] for m in a.meta] == [m["position"] for m in b.meta]


def test_thread_mid_epoch_resume_yields_exactly_the_rest(mri_scan, ct_scan):
    config = _config(mri_scan, ct_scan, num_workers=2, prefetch_factor=3, seed=7)
    full = list(SlabStream(config))
    assert full[0].meta["epoch"] == 0
    stream = SlabStream(config)
    seen = []
    for sample in stream:
        seen.append(sample)
        if len(seen) == 3:
            break  # the readers had read up to 6 more samples; the state counts 3
    state = stream.state_dict()
    assert state["position"] == 3 and state["epoch"] == 0
    resumed = SlabStream(config)
    resumed.load_state_dict(state)
    _assert_same(seen + list(resumed), full)
    assert resumed.epoch == 1 and resumed.state_dict()["position"] == 0
    # The interrupted stream continues where its loop stopped, then starts epoch 1 afresh.
    _assert_same(list(stream), full[3:])
    assert stream.epoch == 1
    assert [s.meta["epoch"] for s in stream][:1] == [1]


def test_thread_batched_resume_counts_samples(ct_scan):
    config = _config(ct_scan, batch_size=2, shuffle=False)
    stream = SlabStream(config)
    first = next(iter(stream))
    assert stream.state_dict()["position"] == 2
    resumed = SlabStream(config)
    resumed.load_state_dict(stream.state_dict())
    rest = list(resumed)
    assert [m["position"] for m in first.meta] + [m["position"] for b in rest for m in b.meta] == [0, 1, 2, 3]


def test_missing_chunk_error_reaches_the_loop_after_the_samples_before_it(copy_scan, mri_scan):
    path = copy_scan(mri_scan)
    _chunk_file(path, "measurements", 2).unlink()
    stream = SlabStream(_config(path, shuffle=False, num_workers=2, prefetch_factor=4))
    delivered = []
    with pytest.raises(MissingChunkError) as info:
        for sample in stream:
            delivered.append(sample.meta["d_slice"])
    assert delivered == [(0, 2), (2, 4)]  # in sampler order, up to the damaged slab
    message = str(info.value)
    assert f"scan '{path}'" in message
    assert "array 'measurements': chunk (0, 2, 0, 0) (D 4:6)" in message and "missing" in message
    assert stream.state_dict()["position"] == 2
    assert _readers() == []


def test_corrupt_coil_map_chunk_error_names_it(copy_scan, mri_scan):
    path = copy_scan(mri_scan)
    target = _chunk_file(path, "coil_maps", 1)
    target.write_bytes(target.read_bytes()[:40])
    expected = r"array 'coil_maps': chunk \(0, 1, 0, 0\) \(D 2:4\): cannot be decoded"
    with pytest.raises(CorruptChunkError, match=expected):
        list(SlabStream(_config(path, shuffle=False)))


def test_early_break_stops_the_readers(mri_scan, ct_scan):
    stream = SlabStream(_config(mri_scan, ct_scan, num_workers=3, prefetch_factor=2))
    for _ in stream:
        assert len(_readers()) >= 1
        break
    assert _readers() == []
    it = iter(stream)
    next(it)
    assert _readers()
    it.close()
    assert _readers() == []
    assert stream.state_dict()["position"] == 2


def test_read_ahead_keeps_order_and_bounds_the_work_in_flight():
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.01) for _ in range(40)]
    lock = threading.Lock()
    started: list[int] = []

    def read(i):
        with lock:
            started.append(i)
        time.sleep(delays[i])
        return i * i

    out = []
    for i, value in enumerate(read_ahead(read, range(40), num_threads=4, depth=5)):
        with lock:
            assert len(started) <= i + 5  # never more than `depth` ahead of the consumer
        out.append(value)
    assert out == [i * i for i in range(40)]


def test_read_ahead_raises_the_readers_exception_unchanged():
    def read(i):
        if i == 3:
            raise KeyError(f"chunk {i} is gone")
        return i

    got = []
    with pytest.raises(KeyError, match="chunk 3 is gone"):
        for value in read_ahead(read, range(10), num_threads=2, depth=4):
            got.append(value)
    assert got == [0, 1, 2]
