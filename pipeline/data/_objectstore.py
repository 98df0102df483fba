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
instead of one range per slab, the shard decoded once and its slabs copied out of memory.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any, Hashable, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .scan import ScanArray

__all__ = ["Run", "stored_runs", "read_d_range", "ShardCache", "index_caching_store_class", "INDEX_CACHE_ENTRIES"]

INDEX_CACHE_ENTRIES = 4096  # shard indexes kept per store (16 bytes a chunk: a few MiB at most)


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
    runs = stored_runs(start, stop, array.chunk_depth, array.stored_depth)
    out = None
    for run in runs:
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
    """A stored object being read (``ready`` unset) or read: ``values`` its decoded D-range
    ``lo:hi``, or ``None`` when the whole read failed."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.values: np.ndarray | None = None
        self.ready = threading.Event()


class ShardCache:
    """Whole stored objects (shards) along D, each read once and decoded, shared by threads.

    :meth:`read` of a D-range inside one shard (and smaller than it) reads the whole shard
    with :meth:`ScanArray.read <pipeline.data.scan.ScanArray.read>` (one request, its checks
    included) on the first call and copies the range out of memory on later ones; a thread
    asking for a shard another is reading waits for that read; :meth:`prefetch` starts a
    shard's read in the background (the next shard, while this one is served). Other ranges
    are read as they are. :meth:`release` drops a shard its reader is done with; at most
    ``shards_per_array`` decoded shards of each array name are kept in any case, the first
    read dropped first: the memory is at most ``shards_per_array`` × the shard's decoded bytes
    per array name read (a copy of each range handed out is its caller's). A shard dropped
    while a reader still needed it is read again: more requests, the same values.

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

    def _fill(self, array: "ScanArray", owner: Hashable, index: int, shard: _Shard, check_finite: bool) -> None:
        try:
            shard.values = array.read(slice(shard.lo, shard.hi), check_finite=check_finite)
        except Exception:
            with self._lock:  # not kept: each range is read (and fails) on its own
                held = self._shards.get(array.name, {})
                if held.get((owner, index)) is shard:
                    del held[(owner, index)]
        finally:
            shard.ready.set()

    def release(self, array: "ScanArray", owner: Hashable, start: int, stop: int) -> None:
        """Drop the shard holding ``start:stop`` (its reader has read all it needs from it)."""
        span = self._span(array, start, stop)
        if span is None:
            return
        with self._lock:
            self._shards.get(array.name, {}).pop((owner, span[0]), None)

    def clear(self) -> None:
        """Drop every shard held."""
        with self._lock:
            self._shards.clear()

    def prefetch(self, array: "ScanArray", owner: Hashable, start: int, stop: int, *, check_finite: bool) -> None:
        """Start reading the shard holding ``start:stop`` in a background thread, unless it is
        held or being read (or the range is not served from a shard); returns at once. A
        failure is not raised here: :meth:`read` then reads the range on its own."""
        span = self._span(array, start, stop)
        if span is None:
            return
        shard, fetch = self._claim(array, owner, *span)
        if fetch:
            threading.Thread(target=self._fill, args=(array, owner, span[0], shard, check_finite),
                             name="recon3d-shard-prefetch", daemon=True).start()

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
            self._fill(array, owner, span[0], shard, check_finite)
        else:
            shard.ready.wait()
        if shard.values is None:
            return array.read(slice(start, stop), check_finite=check_finite)
        sel = _along_d(shard.values.ndim, array.d_axis, start - shard.lo, stop - shard.lo)
        return shard.values[sel].copy()  # a copy: a sample must not keep the whole shard alive


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
