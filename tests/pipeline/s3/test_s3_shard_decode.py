"""Whole shards on s3:// (moto on 127.0.0.1) fetched in one GET and decoded by
:mod:`pipeline.data._objectstore` (inner chunks on its decode pool) are bitwise what zarr's own
read returns — for the scans ``recon3d simulate`` writes and for other sharding layouts (index at
the start, other codecs and dtypes, absent inner chunks, a short last shard); layouts it does not
decode (a local store, no sharding, nested sharding) keep zarr's path; a shard that does not
decode here (a flipped bit, a bad index, NaN when checked, an absent shard) is read through
zarr, whose error names the chunk."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zarr

from pipeline.data import open_scan
from pipeline.data._objectstore import ShardCache, read_whole_shard, shard_layout
from pipeline.data.format import CorruptChunkError, MissingChunkError
from pipeline.data.scan import ScanArray
from pipeline.data.store import open_store

# D 10 in chunks of 1, 4 chunks per shard: shards D 0:4, 4:8 and a short one 8:10.
SIMULATE = ["simulate", "mri", "--shape", "10", "16", "16", "--coils", "2", "--acceleration", "2",
            "--calibration", "4", "--phantom", "shepp-logan", "--chunk-depth", "1", "--shard-chunks", "4",
            "--workers", "1", "--no-progress"]


def _zarr_read(arr: ScanArray, lo: int, hi: int) -> np.ndarray:
    """zarr's own read of D ``lo:hi`` (the reference)."""
    sel = [slice(None)] * len(arr.shape)
    sel[arr.d_axis] = slice(lo, hi)
    return np.asarray(arr.array[tuple(sel)])


def _assert_bitwise(got: np.ndarray | None, want: np.ndarray) -> None:
    assert got is not None
    assert (got.dtype, got.shape) == (want.dtype, want.shape)
    assert got.tobytes() == want.tobytes()  # NaN payloads and -0.0 included


def _shards(arr: ScanArray) -> list[tuple[int, int, int]]:
    depth = arr.stored_depth
    return [(i, i * depth, min((i + 1) * depth, arr.depth)) for i in range(-(-arr.depth // depth))]


def test_simulated_scan_shards_decode_bitwise_as_zarr_one_get_each(s3, scan_url, requests):
    scan = open_scan(scan_url, storage_options=s3.options)
    arrays = [a for a in (scan.measurements, scan.coil_maps, scan.reference) if a is not None]
    assert len(arrays) == 3
    for arr in arrays:
        layout = shard_layout(arr)
        assert layout is not None and layout.index_at_end, arr.name
        assert [type(c).__name__ for c in layout.codecs] == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
        assert [lo_hi[1:] for lo_hi in _shards(arr)] == [(0, 4), (4, 8), (8, 10)]
        for index, lo, hi in _shards(arr):
            want = _zarr_read(arr, lo, hi)
            requests.lines.clear()
            _assert_bitwise(read_whole_shard(arr, index, check_finite=True), want)
            assert requests.gets(arr.name) == [200], (arr.name, index)  # the whole shard, once
            _assert_bitwise(arr.read(slice(lo, hi)), want)  # ScanArray.read takes the same path


def test_the_shard_cache_serves_slabs_bitwise_as_zarr(s3, scan_url, requests):
    scan = open_scan(scan_url, storage_options=s3.options)
    arr = scan.measurements
    cache = ShardCache(shards_per_array=2)
    order = (4, 7, 5, 6, 0, 3, 9, 8)
    want = {d: _zarr_read(arr, d, d + 1) for d in order}
    requests.lines.clear()
    cache.prefetch(arr, "scan", 4, 5, check_finite=True)  # queued for the fetch thread
    for d in order:
        _assert_bitwise(cache.read(arr, "scan", d, d + 1, check_finite=True), want[d])
    assert requests.gets("measurements") == [200] * 3  # each of the 3 shards once
    # a range across shards, or a whole one, is read as it is
    _assert_bitwise(cache.read(arr, "scan", 3, 6, check_finite=True), _zarr_read(arr, 3, 6))


def test_a_slab_handed_over_is_the_callers_and_is_read_again_if_asked_again(s3, scan_url, requests):
    arr = open_scan(scan_url, storage_options=s3.options).coil_maps
    want = _zarr_read(arr, 0, 4)
    cache = ShardCache()
    first = cache.read(arr, "scan", 1, 2, check_finite=True)  # an inner chunk: handed over, no copy
    assert first.flags.writeable and first.flags.c_contiguous
    first[...] = 0  # the caller's own: nothing the cache holds changes
    requests.lines.clear()
    _assert_bitwise(cache.read(arr, "scan", 0, 3, check_finite=True), want[:, 0:3])  # joined anew
    # chunk 1 is gone from the shard held: D 0:3 read from the store (its index, a range per chunk)
    assert requests.gets("coil_maps") == [206] * 4
    _assert_bitwise(cache.read(arr, "scan", 1, 2, check_finite=True), want[:, 1:2])
    _assert_bitwise(cache.read(arr, "scan", 2, 4, check_finite=True), want[:, 2:4])


def _codecs(name: str) -> list:
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

    return {
        "bytes": [BytesCodec()],
        "zstd": [BytesCodec(), ZstdCodec(level=1)],
        "gzip+crc32c": [BytesCodec(), GzipCodec(level=1), Crc32cCodec()],
        "blosc-lz4-bitshuffle+crc32c": [BytesCodec(), BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),
                                        Crc32cCodec()],
    }[name]


def _values(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        return rng.random(shape) < 0.3
    if dtype == "complex64":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return (rng.standard_normal(shape) * 100).astype(dtype)


@pytest.mark.parametrize(("codecs", "index_location", "dtype", "d_axis"), [
    ("bytes", "end", "float32", 0),
    ("zstd", "start", "float32", 1),
    ("gzip+crc32c", "start", "int16", 0),
    ("blosc-lz4-bitshuffle+crc32c", "end", "complex64", 1),
    ("zstd", "end", "bool", 0),
])
def test_other_sharding_layouts_decode_bitwise_as_zarr(s3, codecs, index_location, dtype, d_axis):
    from zarr.codecs import ShardingCodec
    from zarr.storage import FsspecStore

    shape, dims = ((11, 3, 5), ("d", "y", "x")) if d_axis == 0 else ((3, 11, 5), ("c", "d", "x"))
    # inner chunks along x too: 2 per shard (x 0:3, 3:6), the second cut at the array's x=5
    inner, outer = [3, 3], [3, 6]
    inner.insert(d_axis, 2)
    outer.insert(d_axis, 4)
    store = FsspecStore.from_url(s3.url("layouts.zarr"), read_only=False, storage_options=s3.options)
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    fill = False if dtype == "bool" else 0
    array = group.create_array(
        "a", shape=shape, chunks=tuple(outer), dtype=dtype, compressors=None, fill_value=fill,
        serializer=ShardingCodec(chunk_shape=tuple(inner), codecs=_codecs(codecs), index_location=index_location),
        dimension_names=dims, config={"write_empty_chunks": False})
    values = _values(dtype, shape)
    sel = [slice(None)] * 3
    sel[d_axis] = slice(2, 4)
    values[tuple(sel)] = fill  # inner chunks of fill values only: absent from their shard
    array[...] = values

    read_only = zarr.open_group(store=open_store(s3.url("layouts.zarr"), read_only=True, storage_options=s3.options),
                                mode="r")
    arr = ScanArray(read_only["a"], "a", "layouts")
    layout = shard_layout(arr)
    assert layout is not None and layout.index_at_end == (index_location == "end")
    assert [lo_hi[1:] for lo_hi in _shards(arr)] == [(0, 4), (4, 8), (8, 11)]
    for index, lo, hi in _shards(arr):
        _assert_bitwise(read_whole_shard(arr, index, check_finite=True), _zarr_read(arr, lo, hi))
    cache = ShardCache()  # inner chunks across x too: shards held as one array, slabs copied out
    for d in range(0, 11, 2):
        _assert_bitwise(cache.read(arr, "layouts", d, min(d + 2, 11), check_finite=True),
                        _zarr_read(arr, d, min(d + 2, 11)))
    # the absent chunks read as the fill value, as zarr reads them
    np.testing.assert_array_equal(read_whole_shard(arr, 0, check_finite=False), values[tuple(
        slice(0, 4) if axis == d_axis else slice(None) for axis in range(3))])


def test_layouts_not_decoded_here_keep_zarrs_path(s3, tmp_path):
    from zarr.codecs import BytesCodec, ShardingCodec
    from zarr.storage import FsspecStore

    local = str(tmp_path / "scan.zarr")
    from pipeline.cli import main

    assert main([*SIMULATE, "--out", local]) == 0
    assert shard_layout(open_scan(local).measurements) is None  # a local disk
    assert read_whole_shard(open_scan(local).measurements, 0, check_finite=True) is None

    store = FsspecStore.from_url(s3.url("other.zarr"), read_only=False, storage_options=s3.options)
    group = zarr.open_group(store=store, mode="w", zarr_format=3)
    group.create_array("plain", shape=(8, 4), chunks=(2, 4), dtype="float32", dimension_names=("d", "x"))
    nested = ShardingCodec(chunk_shape=(2, 4), codecs=[ShardingCodec(chunk_shape=(1, 4), codecs=[BytesCodec()])])
    group.create_array("nested", shape=(8, 4), chunks=(4, 4), dtype="float32", compressors=None,
                       serializer=nested, dimension_names=("d", "x"))
    for name in ("plain", "nested"):
        group[name][...] = np.arange(32, dtype="float32").reshape(8, 4)
    read_only = zarr.open_group(store=open_store(s3.url("other.zarr"), read_only=True, storage_options=s3.options),
                                mode="r")
    for name in ("plain", "nested"):
        arr = ScanArray(read_only[name], name, "other")
        assert shard_layout(arr) is None, name
        np.testing.assert_array_equal(arr.read(slice(0, 8)), np.arange(32, dtype="float32").reshape(8, 4))


def _shard_path(s3, scan, name: str, index: int) -> str:
    arr = getattr(scan, name)
    key = arr.array.store_path.path + f"/c/0/{index}/0/0"  # (C, D, kH, kW): shard ``index`` along D
    return f"{s3.name}/scan.zarr/{key}"


def test_a_flipped_bit_or_bad_index_falls_back_to_zarr_which_names_the_chunk(s3, scan_url):
    scan = open_scan(scan_url, storage_options=s3.options)
    path = _shard_path(s3, scan, "measurements", 1)  # D 4:8
    good = s3.fs.cat_file(path)
    shard = bytearray(good)
    offset, nbytes = struct.unpack_from("<QQ", shard, len(shard) - 4 - 16 * 4 + 16 * 1)  # chunk 5
    shard[offset + nbytes // 2] ^= 0xFF
    s3.fs.pipe_file(path, bytes(shard))
    scan = open_scan(scan_url, storage_options=s3.options)
    assert read_whole_shard(scan.measurements, 1, check_finite=True) is None
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 5, 0, 0\) \(D 5:6\)"):
        scan.measurements.read(slice(4, 8))
    cache = ShardCache()
    np.testing.assert_array_equal(cache.read(scan.measurements, "s", 4, 5, check_finite=True),
                                  _zarr_read(scan.measurements, 4, 5))  # the shard's other slabs still read
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 5, 0, 0\)"):
        cache.read(scan.measurements, "s", 5, 6, check_finite=True)

    shard = bytearray(good)
    shard[-6] ^= 0xFF  # the index (its CRC32C no longer matches)
    s3.fs.pipe_file(path, bytes(shard))
    scan = open_scan(scan_url, storage_options=s3.options)
    assert read_whole_shard(scan.measurements, 1, check_finite=True) is None
    with pytest.raises(CorruptChunkError):
        scan.measurements.read(slice(4, 8))


def test_nan_is_named_and_an_absent_shard_is_missing(s3, scan_url):
    from pipeline.data.store import open_group

    writable = open_group(scan_url, mode="r+", storage_options=s3.options)["coil_maps"]
    values = np.asarray(writable[:, 8:10])
    values[0, 1, 3, 3] = np.nan  # D 9
    writable[:, 8:10] = values
    scan = open_scan(scan_url, storage_options=s3.options)
    assert read_whole_shard(scan.coil_maps, 2, check_finite=True) is None
    _assert_bitwise(read_whole_shard(scan.coil_maps, 2, check_finite=False), _zarr_read(scan.coil_maps, 8, 10))
    with pytest.raises(CorruptChunkError, match=r"chunk \(0, 9, 0, 0\) \(D 9:10\): holds 1 NaN/Inf"):
        scan.coil_maps.read(slice(8, 10))

    s3.fs.rm(_shard_path(s3, scan, "measurements", 0))
    scan = open_scan(scan_url, storage_options=s3.options)
    assert read_whole_shard(scan.measurements, 0, check_finite=True) is None
    with pytest.raises(MissingChunkError, match=r"shard 0 \(D 0:4\)"):
        ShardCache().read(scan.measurements, "s", 1, 2, check_finite=True)
