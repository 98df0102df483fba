"""Reads of a sharded scan on s3:// (moto on 127.0.0.1) go one stored object at a time: a D-range
that covers a whole shard costs one GET of the shard (counted in the server's request log), a
range inside a shard one GET of its index (once per opened scan) and one per chunk; the values
are zarr's, and errors still name the chunk."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pipeline.data import open_scan
from pipeline.data._objectstore import Run, stored_runs
from pipeline.data.format import CorruptChunkError

SIMULATE = ["simulate", "mri", "--shape", "8", "16", "16", "--coils", "2", "--acceleration", "2",
            "--calibration", "4", "--phantom", "shepp-logan", "--chunk-depth", "1", "--shard-chunks", "4",
            "--workers", "1", "--no-progress"]


def test_stored_runs_split_at_shard_boundaries():
    assert stored_runs(0, 8, 1, 4) == [Run(0, 4, range(0, 4)), Run(4, 8, range(4, 8))]
    assert stored_runs(3, 6, 1, 4) == [Run(3, 4, range(3, 4)), Run(4, 6, range(4, 6))]
    assert stored_runs(2, 7, 2, 2) == [Run(2, 4, range(1, 2)), Run(4, 6, range(2, 3)), Run(6, 7, range(3, 4))]
    with pytest.raises(ValueError, match="multiple"):
        stored_runs(0, 4, 2, 3)


def test_a_whole_shard_read_is_one_get_per_shard(s3, scan_url, requests):
    scan = open_scan(scan_url, storage_options=s3.options)
    arr = scan.measurements
    assert (arr.chunk_depth, arr.stored_depth) == (1, 4)
    expected = np.asarray(arr.array[...])

    requests.lines.clear()
    np.testing.assert_array_equal(arr.read(slice(0, 8)), expected)
    assert requests.gets("measurements") == [200, 200]  # two shards, each one whole-object GET

    requests.lines.clear()
    np.testing.assert_array_equal(arr.read(slice(1, 3)), expected[:, 1:3])
    # inside one shard: its index once, then one range per chunk (chunk by chunk: 2 + 2)
    assert sorted(requests.gets("measurements")) == [206, 206, 206]

    requests.lines.clear()
    np.testing.assert_array_equal(arr.read(slice(3, 4)), expected[:, 3:4])
    # the shard's index is kept, and with it the shard's presence: the chunk alone
    assert [(m, s) for m, p, s in requests.lines if "/measurements/c/" in p] == [("GET", 206)]


def test_a_writable_store_keeps_no_shard_index(s3, scan_url, requests):
    from pipeline.data.store import open_group

    arr = open_group(scan_url, mode="r+", storage_options=s3.options)["measurements"]
    for _ in range(2):
        requests.lines.clear()
        arr[:, 1:2]
        assert requests.gets("measurements") == [206, 206]  # index and chunk, each time


def test_a_corrupt_chunk_in_a_whole_shard_read_is_named(s3, scan_url):
    scan = open_scan(scan_url, storage_options=s3.options)
    key = scan.measurements.array.store_path.path + "/c/0/1/0/0"  # shard 1: D 4:8
    path = f"{s3.name}/scan.zarr/{key}"
    shard = bytearray(s3.fs.cat_file(path))
    # the shard index at its end: (offset, nbytes) per chunk, little-endian, then a CRC32C
    offset, nbytes = struct.unpack_from("<QQ", shard, len(shard) - 4 - 16 * 4 + 16 * 2)  # chunk 6
    shard[offset + nbytes // 2] ^= 0xFF
    s3.fs.pipe_file(path, bytes(shard))
    scan = open_scan(scan_url, storage_options=s3.options)
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 6, 0, 0\) \(D 6:7\)"):
        scan.measurements.read(slice(0, 8))
