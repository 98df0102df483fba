"""Reading a D-range one stored object at a time (the read plan of :meth:`ScanArray.read`).

A sharded array stores several chunks along D in one object (a shard: the chunks' bytes, then
an index of their offsets at its end). zarr reads a selection shard by shard: when the
selection covers every chunk of a shard it fetches the whole shard with **one** request and
decodes its chunks locally; otherwise it fetches the shard's index (one request) and then one
byte range per chunk. Reading such an array chunk by chunk therefore costs two requests per
chunk (the index again each time, and the chunk); reading it shard by shard costs one request
per whole shard, and one index plus one range per chunk for a shard the range only partly
covers. On an object store a request has a large fixed cost (and some servers, moto among
them, answer a range in time proportional to the whole object), so :func:`read_d_range`
reads one *run* per stored object: the part of the D-range inside one shard (one chunk when
the array is not sharded — then nothing changes).

The peak memory of a read is the result plus one run (at most one shard).
Errors still name the chunk at fault: a run that does not decode is read again chunk by chunk
to find it, and a run holding NaN/Inf is checked chunk by chunk.

A read that covers only part of a shard (a slab of one chunk, as the slab stream reads) needs
the shard's index every time; :func:`index_caching_store_class` is the fsspec store that
:func:`~pipeline.data.store.open_store` opens a URL with read-only: it keeps the shard indexes
it has read (the only suffix reads zarr makes), so each later read of the shard is one request
(its presence check included).
A scan opened read-only is complete and immutable (writers write each shard whole, once); a
new :func:`~pipeline.data.scan.open_scan` starts with an empty cache.

A reader that takes a shard's slabs one after another (the slab stream in its ``shard_local``
order) reads the shard once, whole, through a :class:`ShardCache`: one request per shard
instead of one range per slab, the shard decoded once and its slabs served from memory.

Whole shards on an object store are decoded here, not by zarr's read (:func:`shard_layout`
says when: zarr v3 ``sharding_indexed`` with the plain codecs this project writes; anything
else keeps zarr's path): the shard's bytes in one GET, its index decoded by zarr's own index
codecs (CRC32C checked), then its inner chunks decoded by zarr's own codec objects on a small
shared thread pool (:data:`DECODE_THREADS`; Blosc and the CRC32C release the GIL), Blosc
straight into each chunk's buffer. The values are bitwise zarr's
(``tests/pipeline/s3/test_s3_shard_decode.py``); a shard that does not decode here (a flipped
bit, a bad index, NaN/Inf when checked, an absent object) is read through zarr, whose error
names the chunk. Measured on the 2-core benchmark machine against moto (``benchmarks/
object_store.py``, 2026-12-05 05:07–05:15 UTC, load 6.9–7.9: other sessions' jobs on the
cores): a 64 MiB shard (27 MB stored) took 151–212 ms here against 177–289 ms through zarr's
read (the GET alone 25–60 ms wall, 16 ms of this process's CPU and 10 ms of the server's),
and 8 local chunk files of the same D-range 109–232 ms; the slab stream over 128 slices
(``order: auto``) ran at 0.41× local disk against 0.24× with zarr decoding the same shards in
the same run.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Hashable, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .scan import ScanArray

__all__ = ["Run", "stored_runs", "read_d_range", "read_whole_shard", "shard_layout", "ShardLayout", "ShardCache",
           "index_caching_store_class", "INDEX_CACHE_ENTRIES", "DECODE_THREADS"]

INDEX_CACHE_ENTRIES = 4096  # shard indexes kept per store (16 bytes a chunk: a few MiB at most)
# Threads decoding the inner chunks of fetched shards, shared by every read of the process.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
# Shards a ShardCache fetches at once in the background (GETs in flight), in the order asked:
# one. On this project's 2-core benchmark machine against moto (benchmarks/object_store.py, the
# stream of an MRI scan, 2026-12-05 ~04:41 UTC, load 3.2-3.9), two GETs in flight streamed at
# 0.35x local disk against 0.44x for one (medians of 5 alternated rounds): concurrent GETs only
# share the cores the decode needs, and delay the shard needed first.
FETCH_THREADS = 1


class Run(NamedTuple):
    """The part ``lo:hi`` of a D-range inside one stored object; ``chunks`` the chunk indices
    along D it touches (consecutive)."""

    lo: int
    hi: int
    chunks: range


def stored_runs(start: int, stop: int, chunk_depth: int, stored_depth: int) -> list[Run]:
    """Split the D-range ``start:stop`` at the boundaries of the stored objects.

    ``stored_depth`` (a multiple of ``chunk_depth``) is the D-slices per stored object: the
    shard depth when sharded, else the chunk depth (then each run is one chunk).
    """
    if chunk_depth < 1 or stored_depth < chunk_depth or stored_depth % chunk_depth:
        raise ValueError(f"stored_runs: stored depth {stored_depth} is not a multiple of chunk depth {chunk_depth}")
    if stop <= start:
        raise ValueError(f"stored_runs: empty D-range {start}:{stop}")
    runs = []
    lo = start
    while lo < stop:
        hi = min(stop, (lo // stored_depth + 1) * stored_depth)
        runs.append(Run(lo, hi, range(lo // chunk_depth, (hi - 1) // chunk_depth + 1)))
        lo = hi
    return runs


def _along_d(ndim: int, axis: int, lo: int, hi: int) -> tuple[Any, ...]:
    sel: list[Any] = [slice(None)] * ndim
    sel[axis] = slice(lo, hi)
    return tuple(sel)


# ----------------------------------------------------------------------------- whole shards
class ShardLayout(NamedTuple):
    """How one whole shard of a sharded array on an object store is decoded here (see
    :func:`shard_layout`): zarr's own codec objects from the array's metadata, applied to the
    inner chunks of the fetched shard bytes by :func:`start_shard_read`."""

    sharding: Any  # zarr's ShardingCodec of the array
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]  # the inner chunks'
    chunks_per_shard: tuple[int, ...]
    index_size: int  # bytes of the encoded shard index
    index_at_end: bool  # zarr's default; else at the start
    index_codecs: tuple[Any, ...]  # (BytesCodec, *bytes-to-bytes codecs), as stored
    index_spec: Any  # zarr ArraySpec of the index: chunks_per_shard + (2,) uint64
    codecs: tuple[Any, ...]  # the inner chunks' (BytesCodec, *bytes-to-bytes codecs), as stored
    chunk_spec: Any  # zarr ArraySpec of one inner chunk
    dtype: np.dtype  # the values' (native) dtype, as zarr returns them
    fill_value: Any  # an inner chunk absent from its shard reads as this (zarr's rule)
    blosc_into: bool  # blosc (then crc32c or nothing) over native-order bytes: decode in place
    whole_chunks: bool  # each inner chunk spans the array on every axis but D (scan arrays)


_MAX_UINT64 = np.uint64(2**64 - 1)  # an index entry (offset, nbytes) of an absent inner chunk


def shard_layout(array: "ScanArray") -> ShardLayout | None:
    """The :class:`ShardLayout` of ``array`` when its whole shards can be decoded here, else
    ``None`` (then zarr's own read path is used, as before).

    Decoded here: arrays on an object store (an fsspec store other than a local disk) whose
    only codec is zarr v3 ``sharding_indexed`` with one shard across every axis but D, the
    index at either end with the codecs ``bytes`` (little-endian) and optionally ``crc32c``,
    and inner chunks encoded by ``bytes`` followed by any of ``blosc``, ``zstd``, ``gzip``,
    ``crc32c`` (what :class:`~pipeline.data.format.CodecConfig` writes: blosc, then crc32c),
    of fixed-size numeric or bool values. Anything else (nested sharding, ``transpose``,
    numcodecs' own codecs, local or memory stores, arrays without D) is ``None``.
    """
    if array.d_axis is None or array.stored_depth == array.chunk_depth:
        return None
    zarr_array = array.array
    fs = getattr(zarr_array.store_path.store, "fs", None)
    if fs is None:
        return None
    protocol = fs.protocol
    if set((protocol,) if isinstance(protocol, str) else protocol) & {"file", "local", "memory"}:
        return None  # local scans keep zarr's path (memory://: no request cost to save)
    try:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec, ZstdCodec
        from zarr.core.array_spec import ArraySpec
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.codecs.sharding import ShardingCodecIndexLocation

        meta = zarr_array.metadata
        if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
            return None
        if not isinstance(meta.chunk_grid, RegularChunkGrid):
            return None
        sharding = meta.codecs[0]
        shard_shape = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        chunk_shape = tuple(int(c) for c in sharding.chunk_shape)
        if len(shard_shape) != len(array.shape) or any(s % c for s, c in zip(shard_shape, chunk_shape)):
            return None
        if any(s < n for axis, (s, n) in enumerate(zip(shard_shape, array.shape)) if axis != array.d_axis):
            return None  # more than one shard across another axis: not a D-range of whole shards

        def plain(codecs: tuple[Any, ...]) -> bool:
            return (len(codecs) >= 1 and type(codecs[0]) is BytesCodec
                    and all(type(c) in (BloscCodec, Crc32cCodec, ZstdCodec, GzipCodec) for c in codecs[1:]))

        codecs, index_codecs = tuple(sharding.codecs), tuple(sharding.index_codecs)
        if not plain(codecs) or not plain(index_codecs):
            return None
        if index_codecs[0].endian is not None and index_codecs[0].endian.value != "little":
            return None
        dtype = np.dtype(meta.data_type.to_native_dtype())
        if dtype.kind not in "biufc" or dtype.hasobject:
            return None
        chunks_per_shard = tuple(s // c for s, c in zip(shard_shape, chunk_shape))
        config = getattr(zarr_array._async_array, "config", None)
        if config is None:
            return None
        chunk_spec = ArraySpec(shape=chunk_shape, dtype=meta.data_type, fill_value=meta.fill_value,
                               config=config, prototype=default_buffer_prototype())
        endian = codecs[0].endian
        native = endian is None or endian.value == sys.byteorder or dtype.itemsize == 1
        return ShardLayout(
            sharding=sharding, shard_shape=shard_shape, chunk_shape=chunk_shape,
            chunks_per_shard=chunks_per_shard, index_size=int(sharding._shard_index_size(chunks_per_shard)),
            index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
            index_codecs=index_codecs, index_spec=sharding._get_index_chunk_spec(chunks_per_shard),
            codecs=codecs, chunk_spec=chunk_spec, dtype=dtype,
            fill_value=meta.fill_value if meta.fill_value is not None else meta.data_type.default_scalar(),
            blosc_into=native and len(codecs) > 1 and type(codecs[1]) is BloscCodec
            and all(type(c) is Crc32cCodec for c in codecs[2:]),
            whole_chunks=all(c == n for axis, (c, n) in enumerate(zip(chunk_shape, array.shape))
                             if axis != array.d_axis),
        )
    except (ImportError, AttributeError, TypeError, ValueError):  # another zarr: its own path
        return None


def _decode(codecs: tuple[Any, ...], data: np.ndarray, spec: Any) -> np.ndarray:
    """``data`` (uint8, 1-d) decoded by zarr's codec objects ``codecs`` (``bytes`` first, as
    stored), last codec first, as zarr's pipeline does: no copy beyond each codec's own output."""
    buf = spec.prototype.buffer.from_array_like(data)
    for codec in reversed(codecs[1:]):
        buf = codec._decode_sync(buf, spec)
    return codecs[0]._decode_sync(buf, spec).as_numpy_array()


def _decode_into(layout: ShardLayout, data: np.ndarray, dest: np.ndarray) -> None:
    """Decode one inner chunk's bytes ``data`` into ``dest`` (writable, C-contiguous, the inner
    chunk's shape and native dtype): zarr's codec objects, last codec first; with
    ``layout.blosc_into``, Blosc (zarr's own numcodecs codec object) decompresses straight into
    ``dest`` — the bytes zarr's read returns, without its intermediate buffer and copy."""
    spec = layout.chunk_spec
    if not layout.blosc_into:
        dest[...] = _decode(layout.codecs, data, spec)
        return
    buf = spec.prototype.buffer.from_array_like(data)
    for codec in reversed(layout.codecs[2:]):  # crc32c: checked and stripped
        buf = codec._decode_sync(buf, spec)
    compressed = buf.as_numpy_array()
    # Blosc's 16-byte header: version, versionlz, flags, typesize, then nbytes (uint32 LE)...
    nbytes = int.from_bytes(compressed[4:8].tobytes(), "little") if compressed.size >= 16 else -1
    if nbytes != dest.nbytes:  # (Blosc checks only that ``out`` is large enough)
        raise ValueError(f"an inner chunk decompresses to {nbytes} bytes, not {dest.nbytes}")
    layout.codecs[1]._blosc_codec.decode(compressed, out=dest.reshape(-1).view(np.uint8))


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    """The process's pool of :data:`DECODE_THREADS` threads decoding inner chunks. Tasks run in
    the order submitted: a shard's chunks before those of a shard fetched after it. A task
    never waits on another, so a thread waiting on the pool cannot deadlock it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="recon3d-shard-decode")
        return _pool


class _ShardDecode:
    """The inner chunks of one fetched shard being decoded on the pool, each into a buffer of
    its own, then copied into ``out`` (one array: the shard's D-range) or kept as they are in
    ``pieces`` (one array per inner chunk along D, for :class:`ShardCache`); ``done`` is called
    once, by the last chunk's task, with ``out`` or ``pieces``, or with ``None`` when any chunk
    failed (a codec error, a CRC32C mismatch, a bad index entry, NaN/Inf when checked)."""

    def __init__(self, raw: np.ndarray, layout: ShardLayout, check_finite: bool, tasks: list[_Task],
                 out: np.ndarray | None, pieces: list[np.ndarray | None] | None,
                 done: Callable[[Any], None]) -> None:
        self.raw, self.layout, self.out, self.pieces, self.done = raw, layout, out, pieces, done
        self.check_finite = check_finite and layout.dtype.kind in "fc"
        self.left = len(tasks)
        self.failed = False
        self.lock = threading.Lock()
        pool = _decode_pool()
        for task in tasks:
            pool.submit(self._run, task)

    def _run(self, task: _Task) -> None:
        ok = False
        try:
            if not self.failed:
                dest = np.empty(self.layout.chunk_shape, dtype=self.layout.dtype)
                if task.offset == -1:  # absent from the shard: zarr reads the fill value
                    dest[...] = self.layout.fill_value
                else:
                    _decode_into(self.layout, self.raw[task.offset : task.offset + task.nbytes], dest)
                part = dest[task.chunk_sel]
                ok = not self.check_finite or bool(np.isfinite(part).all())
                if self.pieces is not None:
                    self.pieces[task.slot] = part
                else:
                    self.out[task.out_sel] = part  # type: ignore[index]
        except Exception:  # noqa: BLE001 -- any failure: zarr's own read raises the named error
            ok = False
        with self.lock:
            self.failed |= not ok
            self.left -= 1
            last = self.left == 0
        if last:
            result = None if self.failed else (self.pieces if self.pieces is not None else self.out)
            self.raw = self.out = self.pieces = None  # type: ignore[assignment]
            self.done(result)


class _Task(NamedTuple):
    """One inner chunk of a shard: its bytes ``offset`` (-1: absent) and ``nbytes``, where its
    part goes in the shard's D-range (``out_sel``) and which part of it (``chunk_sel``), and its
    position along D in the shard (``slot``)."""

    offset: int
    nbytes: int
    out_sel: tuple[slice, ...]
    chunk_sel: tuple[slice, ...]
    slot: int


def _shard_tasks(array: "ScanArray", layout: ShardLayout, index: int, raw: np.ndarray,
                 ) -> tuple[tuple[int, ...], list[_Task]]:
    """The output shape of shard ``index`` (its D-range, the array's other axes) and a
    :class:`_Task` per inner chunk that holds part of it. Raises ``ValueError`` for an index
    that does not decode or points outside the shard's bytes."""
    size = layout.index_size
    if raw.size < size:
        raise ValueError(f"a shard of {raw.size} bytes is shorter than its index ({size})")
    encoded = raw[raw.size - size :] if layout.index_at_end else raw[:size]
    entries = _decode(layout.index_codecs, encoded, layout.index_spec).reshape(-1, 2)
    absent = (entries[:, 0] == _MAX_UINT64) & (entries[:, 1] == _MAX_UINT64)
    present = entries[~absent]
    if present.size and ((present > raw.size).any() or (present[:, 0] + present[:, 1] > raw.size).any()):
        raise ValueError("the shard index points outside the shard")
    d, depth = array.d_axis, array.stored_depth
    lo, hi = index * depth, min((index + 1) * depth, array.depth)
    shape = list(array.shape)
    shape[d] = hi - lo
    tasks = []
    for flat, coords in enumerate(np.ndindex(*layout.chunks_per_shard)):
        out_sel, chunk_sel = [], []
        for axis, (c, size_c) in enumerate(zip(coords, layout.chunk_shape)):
            start = c * size_c + (lo if axis == d else 0)  # in array coordinates
            stop = min(start + size_c, hi if axis == d else array.shape[axis])
            if stop <= start:
                break
            origin = lo if axis == d else 0
            out_sel.append(slice(start - origin, stop - origin))
            chunk_sel.append(slice(0, stop - start))
        else:
            offset = -1 if absent[flat] else int(entries[flat, 0])
            tasks.append(_Task(offset, int(entries[flat, 1]) if offset >= 0 else 0, tuple(out_sel), tuple(chunk_sel),
                               coords[d]))
    return tuple(shape), tasks


def start_shard_read(array: "ScanArray", index: int, layout: ShardLayout, *, check_finite: bool,
                     done: Callable[[Any], None], pieces: bool = False) -> None:
    """Fetch shard ``index`` of ``array`` whole (one GET, in this thread), then decode its inner
    chunks on the decode pool and return at once: ``done(values)`` is called from the pool once
    the last chunk is in — ``values`` the shard's D-range as one array (as :meth:`ScanArray.read`
    returns it), or with ``pieces`` where ``layout.whole_chunks``, a list of one array per inner
    chunk along D (each C-contiguous but a cut last one; no copy into one array) — or
    ``done(None)`` (possibly from here) when the shard is absent, the GET fails or any part does
    not decode (or holds NaN/Inf with ``check_finite``): the caller then reads it through zarr,
    which raises the error naming the chunk. No presence request of its own: a GET of an
    absent object answers that."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from .store import chunk_key

    try:
        buf = sync(array.array.store_path.store.get(chunk_key(array.array, index), default_buffer_prototype()))
        if buf is None:
            done(None)
            return
        raw = buf.as_numpy_array()
        del buf
        shape, tasks = _shard_tasks(array, layout, index, raw)
    except Exception:  # noqa: BLE001 -- transient or corrupt: zarr's read decides and names it
        done(None)
        return
    if pieces and layout.whole_chunks:
        slots = -(-shape[array.d_axis] // layout.chunk_shape[array.d_axis])
        _ShardDecode(raw, layout, check_finite, tasks, None, [None] * slots, done)
    else:
        _ShardDecode(raw, layout, check_finite, tasks, np.empty(shape, dtype=layout.dtype), None, done)


def read_whole_shard(array: "ScanArray", index: int, *, check_finite: bool) -> np.ndarray | None:
    """Shard ``index`` of ``array`` (its whole D-range) fetched in one GET and decoded on the
    decode pool (:func:`start_shard_read`), this thread waiting; ``None`` when it is not
    decoded here (no :func:`shard_layout`) or did not decode (read it through zarr then)."""
    layout = shard_layout(array)
    if layout is None:
        return None
    result: list[np.ndarray | None] = []
    finished = threading.Event()

    def done(values: np.ndarray | None) -> None:
        result.append(values)
        finished.set()

    start_shard_read(array, index, layout, check_finite=check_finite, done=done)
    finished.wait()
    return result[0]


def _read_run(array: "ScanArray", run: Run) -> np.ndarray:
    """The values of ``run`` in one zarr read; a decode failure is pinned to its chunk."""
    if len(run.chunks) == 1:
        return array._read_chunk(run.chunks[0], run.lo, run.hi)
    try:
        return np.asarray(array.array[_along_d(len(array.shape), array.d_axis, run.lo, run.hi)])
    except Exception as err:  # codecs raise RuntimeError, ValueError, TypeError...
        failure = err
    # Error path only: read chunk by chunk, so that the error names the chunk at fault.
    cd = array.chunk_depth
    for index in run.chunks:
        array._read_chunk(index, max(run.lo, index * cd), min(run.hi, (index + 1) * cd))
    raise failure  # every chunk decoded on its own: the failure was not a chunk's (transient)


def _check_run(array: "ScanArray", values: np.ndarray, run: Run) -> None:
    if values.dtype.kind not in "fc" or np.isfinite(values).all():
        return
    cd = array.chunk_depth
    for index in run.chunks:
        lo, hi = max(run.lo, index * cd), min(run.hi, (index + 1) * cd)
        array._check_finite(values[_along_d(values.ndim, array.d_axis, lo - run.lo, hi - run.lo)], index)


def read_d_range(array: "ScanArray", start: int, stop: int, *, check_finite: bool) -> np.ndarray:
    """Rows ``start:stop`` along D of a scan array (with a ``d`` axis), one run per stored
    object, into one preallocated result (see the module docstring).

    Raises what :meth:`ScanArray._read_chunk` and :meth:`ScanArray._check_finite` raise
    (:class:`~pipeline.data.format.CorruptChunkError` naming the chunk).
    """
    depth = array.stored_depth
    runs = stored_runs(start, stop, array.chunk_depth, depth)
    out = None
    for run in runs:
        whole = run.lo % depth == 0 and run.hi == min(run.lo + depth, array.depth)
        part = read_whole_shard(array, run.lo // depth, check_finite=check_finite) if whole else None
        if part is None:  # not decoded here (or did not decode: zarr's read names the chunk)
            part = _read_run(array, run)
            if check_finite:
                _check_run(array, part, run)
        if len(runs) == 1:
            return part
        if out is None:
            shape = list(part.shape)
            shape[array.d_axis] = stop - start
            out = np.empty(shape, dtype=part.dtype)
        out[_along_d(out.ndim, array.d_axis, run.lo - start, run.hi - start)] = part
        del part
    assert out is not None
    return out


class _Shard:
    """A stored object being read (``ready`` unset) or read: its decoded D-range ``lo:hi`` as
    ``values`` (one array) or ``pieces`` (one array per inner chunk along D; ``None`` for one
    handed over), both ``None`` when the whole read failed."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.values: np.ndarray | None = None
        self.pieces: list[np.ndarray | None] | None = None
        self.ready = threading.Event()


class ShardCache:
    """Whole stored objects (shards) along D, each read once and decoded, shared by threads.

    :meth:`read` of a D-range inside one shard (and smaller than it) reads the whole shard on
    the first call and serves the range from memory on later ones; a thread asking for a
    shard another is reading waits for that read; :meth:`prefetch` queues a shard's read in
    the background (the next shard, while this one is served). Other ranges are read as they
    are. :meth:`release` drops a shard its reader is done with; at most ``shards_per_array``
    decoded shards of each array name are kept in any case, the first read dropped first: the
    memory is at most ``shards_per_array`` × the shard's decoded bytes per array name read,
    plus the fetched bytes of the shards being decoded. A shard dropped while a reader still
    needed it is read again: more requests, the same values.

    What a caller gets is its own: a copy of the range, or, for a range that is exactly one
    inner chunk of a shard held chunk by chunk (decoded here, chunks spanning every axis but
    D: the slab stream's slabs of scan arrays), that chunk's own buffer, which the shard then
    no longer holds (no copy; asking for the same range again reads it from the store).

    How a shard is read: on an object store, where :func:`shard_layout` applies, its bytes in
    one GET and its inner chunks decoded on the shared decode pool (:data:`DECODE_THREADS`
    threads, :func:`start_shard_read`), the finite check per chunk there too, and no presence
    request of its own (an absent shard fails its GET); otherwise with :meth:`ScanArray.read
    <pipeline.data.scan.ScanArray.read>` (zarr's path, its checks included), as is a shard
    that does not decode here. Prefetched shards are fetched one after another, in the order
    asked, by one background thread, which fetches the next while the pool decodes the last:
    the decode of shard *k* overlaps the GET of shard *k + 1*, and the pool decodes the shards
    in the order they were asked for.

    A shard whose whole read fails (a corrupt or missing chunk anywhere in it, a transient
    error) is not kept: each range of it is then read on its own, so an error is raised for,
    and names, the range's own chunk, as without the cache.

    Args:
        shards_per_array: the most decoded shards kept per array name (the slab stream
            allows one per reader thread and two more: see :mod:`pipeline.data.stream`).
    """

    def __init__(self, shards_per_array: int = 2) -> None:
        if shards_per_array < 1:
            raise ValueError(f"ShardCache: shards_per_array must be >= 1, got {shards_per_array}")
        self.shards_per_array = shards_per_array
        self._lock = threading.Lock()
        self._shards: dict[str, collections.OrderedDict[tuple[Hashable, int], _Shard]] = {}
        # prefetches not yet started, in the order asked; the fetch thread runs while any are left
        self._queue: collections.deque[tuple["ScanArray", Hashable, int, _Shard, bool]] = collections.deque()
        self._fetching = 0  # fetch threads running (at most FETCH_THREADS)

    def held(self) -> int:
        """Shards held now (read or being read), all arrays together."""
        with self._lock:
            return sum(len(v) for v in self._shards.values())

    def _span(self, array: "ScanArray", start: int, stop: int) -> tuple[int, int, int] | None:
        """``(index, lo, hi)`` of the shard holding ``start:stop``, or ``None`` when the range
        is not served from a cached shard (no D axis, across shards, or a whole shard)."""
        if array.d_axis is None:
            return None
        depth = array.stored_depth
        index = start // depth
        lo, hi = index * depth, min((index + 1) * depth, array.depth)
        if stop > hi or (start, stop) == (lo, hi):  # across shards, or a whole one: one read anyway
            return None
        return index, lo, hi

    def _claim(self, array: "ScanArray", owner: Hashable, index: int, lo: int, hi: int) -> tuple[_Shard, bool]:
        """The held shard, or a new one to read (then ``True``): the oldest dropped beyond the
        capacity (a thread still waiting on it keeps its own reference)."""
        with self._lock:
            held = self._shards.setdefault(array.name, collections.OrderedDict())
            shard = held.get((owner, index))
            if shard is not None:
                return shard, False
            shard = held[(owner, index)] = _Shard(lo, hi)
            while len(held) > self.shards_per_array:
                held.popitem(last=False)
            return shard, True

    def _read_zarr(self, array: "ScanArray", owner: Hashable, index: int, shard: _Shard, check_finite: bool) -> None:
        """Read the shard with :meth:`ScanArray.read` (zarr's path) and mark it ready; a failure
        drops it (each range is then read, and fails, on its own)."""
        try:
            shard.values = array.read(slice(shard.lo, shard.hi), check_finite=check_finite)
        except Exception:
            self._drop(array, owner, index, shard)
        finally:
            shard.ready.set()

    def _drop(self, array: "ScanArray", owner: Hashable, index: int, shard: _Shard) -> None:
        with self._lock:
            held = self._shards.get(array.name, {})
            if held.get((owner, index)) is shard:
                del held[(owner, index)]

    def _start(self, array: "ScanArray", owner: Hashable, index: int, shard: _Shard, check_finite: bool) -> None:
        """Start reading ``shard``: fetched here and decoded on the pool (returns once fetched),
        or, where that does not apply, read through zarr here (returns once read)."""
        layout = shard_layout(array)
        if layout is None:
            self._read_zarr(array, owner, index, shard, check_finite)
            return

        def done(values: Any) -> None:
            if values is None:  # did not decode here: zarr's read, which names what is wrong
                self._read_zarr(array, owner, index, shard, check_finite)
                return
            if isinstance(values, list):
                shard.pieces = values
            else:
                shard.values = values
            shard.ready.set()

        start_shard_read(array, index, layout, check_finite=check_finite, done=done, pieces=True)

    def _fetch_queued(self) -> None:
        """The background fetch thread: start the queued shards' reads one after another (each
        returns once its bytes are in and its decode is on the pool), then exit."""
        while True:
            with self._lock:
                if not self._queue:
                    self._fetching -= 1
                    return
                array, owner, index, shard, check_finite = self._queue.popleft()
            if not shard.ready.is_set():  # (cleared meanwhile: its readers read on their own)
                self._start(array, owner, index, shard, check_finite)

    def release(self, array: "ScanArray", owner: Hashable, start: int, stop: int) -> None:
        """Drop the shard holding ``start:stop`` (its reader has read all it needs from it)."""
        span = self._span(array, start, stop)
        if span is None:
            return
        with self._lock:
            self._shards.get(array.name, {}).pop((owner, span[0]), None)

    def clear(self) -> None:
        """Drop every shard held, and the prefetches not yet started (a thread waiting on one
        then reads its range on its own)."""
        with self._lock:
            self._shards.clear()
            queued, self._queue = list(self._queue), collections.deque()
        for item in queued:
            item[3].ready.set()

    def prefetch(self, array: "ScanArray", owner: Hashable, start: int, stop: int, *, check_finite: bool) -> None:
        """Queue the read of the shard holding ``start:stop`` for the background fetch thread,
        unless it is held or being read (or the range is not served from a shard); returns at
        once. A failure is not raised here: :meth:`read` then reads the range on its own."""
        span = self._span(array, start, stop)
        if span is None:
            return
        shard, fetch = self._claim(array, owner, *span)
        if not fetch:
            return
        with self._lock:
            self._queue.append((array, owner, span[0], shard, check_finite))
            idle = self._fetching < FETCH_THREADS
            self._fetching += idle
        if idle:
            threading.Thread(target=self._fetch_queued, name="recon3d-shard-fetch", daemon=True).start()

    def read(self, array: "ScanArray", owner: Hashable, start: int, stop: int, *, check_finite: bool) -> np.ndarray:
        """Rows ``start:stop`` along D of ``array`` (``owner`` names its scan: arrays of
        different scans share names), as :meth:`ScanArray.read` returns them.

        Shape:
            the array's shape with D cut to ``start:stop``.
        """
        span = self._span(array, start, stop)
        if span is None:
            return array.read(slice(start, stop), check_finite=check_finite)
        shard, fetch = self._claim(array, owner, *span)
        if fetch:
            self._start(array, owner, span[0], shard, check_finite)
        shard.ready.wait()
        if shard.pieces is not None:
            values = self._from_pieces(array, shard, start, stop)
            if values is not None:
                return values
        elif shard.values is not None:
            sel = _along_d(shard.values.ndim, array.d_axis, start - shard.lo, stop - shard.lo)
            return shard.values[sel].copy()  # a copy: a sample must not keep the whole shard alive
        return array.read(slice(start, stop), check_finite=check_finite)

    def _from_pieces(self, array: "ScanArray", shard: _Shard, start: int, stop: int) -> np.ndarray | None:
        """``start:stop`` from a shard held as inner chunks: one whole chunk is handed over as it
        is (no copy; the shard no longer holds it), a longer range is joined into a new array;
        ``None`` when a chunk it needs was handed over already (then it is read again)."""
        depth = array.chunk_depth
        first, end = (start - shard.lo) // depth, -(-(stop - shard.lo) // depth)
        with self._lock:
            parts = shard.pieces[first:end]  # type: ignore[index]
            whole = (end - first == 1 and (start - shard.lo) % depth == 0
                     and stop == min(shard.lo + end * depth, shard.hi))
            if whole and parts[0] is not None:
                shard.pieces[first] = None  # type: ignore[index]  # the caller's now
                return parts[0]
        if any(p is None for p in parts):
            return None
        base = shard.lo + first * depth
        joined = np.concatenate(parts, axis=array.d_axis)
        if (start, stop) == (base, base + joined.shape[array.d_axis]):
            return joined
        return joined[_along_d(joined.ndim, array.d_axis, start - base, stop - base)].copy()


_INDEX_CACHING_STORE = None


def index_caching_store_class():
    """zarr's ``FsspecStore`` that, opened read-only, keeps the suffix reads it has answered (the
    shard indexes zarr's sharding codec reads at the end of each shard) for later reads of the
    same shard: at most :data:`INDEX_CACHE_ENTRIES`, the oldest dropped first; and answers
    ``exists`` for a shard whose index it holds without a request. A writable one caches
    nothing."""
    global _INDEX_CACHING_STORE
    if _INDEX_CACHING_STORE is not None:
        return _INDEX_CACHING_STORE
    from zarr.abc.store import SuffixByteRequest
    from zarr.storage import FsspecStore

    class IndexCachingFsspecStore(FsspecStore):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._indexes: dict[str, tuple[int, bytes]] = {}  # key: (suffix length, its bytes)

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            if not (self.read_only and isinstance(byte_range, SuffixByteRequest)):
                return await super().get(key, prototype, byte_range)
            # zarr runs every store call on its one event-loop thread: no lock needed.
            found = self._indexes.get(key)
            if found is not None and found[0] == byte_range.suffix:
                return prototype.buffer.from_bytes(found[1])
            value = await super().get(key, prototype, byte_range)
            if value is not None and len(value) == byte_range.suffix:
                if len(self._indexes) >= INDEX_CACHE_ENTRIES:
                    del self._indexes[next(iter(self._indexes))]
                self._indexes[key] = (byte_range.suffix, value.to_bytes())
            return value

        async def exists(self, key: str) -> bool:
            # A shard whose index this read-only store has read is there (each key is
            # written whole, once): no request to ask again.
            if self.read_only and key in self._indexes:
                return True
            return await super().exists(key)

    _INDEX_CACHING_STORE = IndexCachingFsspecStore
    return IndexCachingFsspecStore
