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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .scan import ScanArray

__all__ = ["Run", "stored_runs", "read_d_range", "index_caching_store_class", "INDEX_CACHE_ENTRIES"]

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
