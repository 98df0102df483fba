"""Opening scan stores and working at the level of their stored objects.

* :func:`open_store` / :func:`open_group` — a local folder or an fsspec URL as a zarr v3 store
  and group; a local store turns a full disk into one line naming the file and its bytes.
* :func:`metadata_error` / :func:`bad_metadata` — the ``zarr.json`` at fault when zarr cannot
  read a scan's metadata, named in one line.
* :func:`create_array` — a scan array chunked along D as :class:`~pipeline.data.format.ArraySpec`
  says, NaN-filled when float.
* chunk presence — :func:`chunk_key`, :func:`chunk_exists`, :func:`missing_chunks` and the
  stored depth of an array (the shard when sharded), which every read and every resumable
  writer relies on (see :mod:`pipeline.data.format` for the integrity rules).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import storage_error
from pipeline.paths import is_url, local_path

from ._objectstore import index_caching_store_class
from .format import ArraySpec, CodecConfig, ScanError, on_object_store

__all__ = [
    "open_store",
    "open_group",
    "bad_metadata",
    "metadata_error",
    "create_array",
    "d_axis_of",
    "stored_depth_of",
    "num_stored_objects",
    "chunk_key",
    "chunk_exists",
    "missing_chunks",
]


def _local_store_class():
    """``LocalStore`` whose writes turn a full disk into one line naming the file and bytes.

    zarr writes every object to a temporary file and renames it into place (removing the
    temporary file when the write fails), so a failed write leaves no torn chunk; this class
    changes the error: ``ENOSPC``/``EDQUOT``/``EFBIG`` become
    :class:`~pipeline.errors.StorageFullError` naming the object's path and its encoded size.

    zarr writes the chunks of a region concurrently and reports the first failure while the
    others go on in the background. So that no temporary file outlives the error, a write that
    runs out of space returns only once every write already under way on this store has
    finished, and from then on this store object refuses to start another chunk write (it
    raises the same error at once; metadata documents are still written). Reopen the scan
    after freeing space.
    """
    import asyncio

    from zarr.storage import LocalStore

    class CheckedLocalStore(LocalStore):
        _inflight = 0
        _full: Exception | None = None

        def _refused(self, key: str) -> Exception | None:
            if self._full is not None and not key.endswith("zarr.json"):
                return type(self._full)(str(self._full))
            return None

        async def _quiesce(self) -> None:
            while self._inflight > 0:  # the region's other writes, already under way
                await asyncio.sleep(0.001)

        def _failure(self, err: OSError, key: str, value) -> Exception:
            """``err`` as :class:`StorageFullError` when the disk is full (then remembered:
            later chunk writes are refused), else ``err`` itself."""
            mapped = _mapped_storage_error(err, self.root / key, value)
            if mapped is not err:
                self._full = self._full or mapped
            return mapped

        async def _set(self, key: str, value, exclusive: bool = False) -> None:
            refused = self._refused(key)
            if refused is not None:
                await self._quiesce()
                raise refused
            self._inflight += 1
            try:
                await super()._set(key, value, exclusive=exclusive)
                return
            except OSError as err:
                mapped = self._failure(err, key, value)
                if mapped is err:
                    raise
            finally:
                self._inflight -= 1
            await self._quiesce()
            raise mapped from None

        def set_sync(self, key: str, value) -> None:
            refused = self._refused(key)
            if refused is not None:
                raise refused
            try:
                return super().set_sync(key, value)
            except OSError as err:
                mapped = self._failure(err, key, value)
                if mapped is err:
                    raise
                raise mapped from None

    return CheckedLocalStore


def _mapped_storage_error(err: OSError, path: Any, value: Any) -> Exception:
    try:
        needed = len(value)
    except TypeError:
        needed = None
    return storage_error(err, path, needed)


_CHECKED_LOCAL_STORE = None


def open_store(path: Any, *, read_only: bool, storage_options: Mapping[str, Any] | None = None):
    """A zarr store for a local folder or an fsspec URL (``s3://``, ``gs://``, ``memory://``...).

    A local store raises :class:`~pipeline.errors.StorageFullError` (path and bytes) when the
    disk fills up while writing an object. A URL opened read-only keeps the shard indexes it has
    read (see :func:`pipeline.data._objectstore.index_caching_store_class`).
    """
    global _CHECKED_LOCAL_STORE
    from zarr.storage import FsspecStore

    if is_url(path):
        cls = index_caching_store_class() if read_only else FsspecStore
        return cls.from_url(str(path), read_only=read_only, storage_options=dict(storage_options or {}))
    text = str(local_path(path))
    if _CHECKED_LOCAL_STORE is None:
        _CHECKED_LOCAL_STORE = _local_store_class()
    return _CHECKED_LOCAL_STORE(text, read_only=read_only)


def _metadata_problem(doc_bytes: bytes) -> str | None:
    """Why a ``zarr.json`` is not valid zarr v3 metadata (``None`` when it is)."""
    import json

    try:
        doc = json.loads(doc_bytes)
    except (ValueError, UnicodeDecodeError) as err:
        return f"invalid JSON: {err}"
    if not isinstance(doc, dict):
        return f"a JSON object is required, got {type(doc).__name__}"
    if doc.get("zarr_format") != 3:
        return f"zarr_format must be 3, got {doc.get('zarr_format')!r}"
    kind = doc.get("node_type")
    try:
        if kind == "array":
            from zarr.core.metadata.v3 import ArrayV3Metadata

            ArrayV3Metadata.from_dict(dict(doc))
        elif kind == "group":
            from zarr.core.group import GroupMetadata

            GroupMetadata.from_dict(dict(doc))
        else:
            return f"node_type must be 'array' or 'group', got {kind!r}"
    except Exception as err:  # zarr raises ValueError, TypeError, KeyError... for bad fields
        return f"not valid zarr v3 {kind} metadata ({type(err).__name__}: {err})"
    if not isinstance(doc.get("attributes", {}), dict):
        return "'attributes' must be a JSON object"
    return None


def bad_metadata(store: Any) -> tuple[str, str] | None:
    """The first ``zarr.json`` of a store that is not valid zarr v3 metadata: ``(key, why)``.

    Used on the error path only: it lists the store and parses every metadata document.
    """
    from zarr.core.buffer import default_buffer_prototype

    async def _scan() -> tuple[str, str] | None:
        keys = sorted([k async for k in store.list_prefix("")], key=lambda k: (k.count("/"), k))
        for key in keys:
            if key.rsplit("/", 1)[-1] != "zarr.json":
                continue
            buf = await store.get(key, prototype=default_buffer_prototype())
            if buf is None:
                continue
            why = _metadata_problem(buf.to_bytes())
            if why is not None:
                return key, why
        return None

    return sync(_scan())


def metadata_error(path: Any, err: BaseException, *, storage_options: Mapping[str, Any] | None = None,
                   what: str = "scan") -> ScanError:
    """The one-line error for zarr metadata of ``path`` that zarr could not read.

    Names the ``zarr.json`` at fault (the group's or an array's) and the scan, and says what
    to do; falls back to zarr's own message when every document parses.
    """
    try:
        found = bad_metadata(open_store(path, read_only=True, storage_options=storage_options))
    except Exception:  # the store itself is unreadable: report zarr's error below
        found = None
    if found is not None:
        key, why = found
        sep = "" if str(path).endswith("/") else "/"
        return ScanError(
            f"{what} '{path}': metadata file '{path}{sep}{key}' is not readable: {why}; the file is "
            "truncated or corrupt: restore it, or rewrite the scan with the command that made it"
        )
    return ScanError(f"{what} '{path}': not a readable zarr v3 group ({type(err).__name__}: {err})")


def open_group(path: Any, *, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open (``r``, ``r+``) or create (``a``, ``w``) the zarr v3 group of a scan.

    Raises:
        FileNotFoundError: no group at ``path``.
        ScanError: (``r``, ``r+``) a ``zarr.json`` that is not valid zarr v3 metadata (named).
    """
    read_only = mode == "r"
    store = open_store(path, read_only=read_only, storage_options=storage_options)
    try:
        return zarr.open_group(store=store, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise FileNotFoundError(f"scan '{path}': no zarr group there") from None
    except Exception as err:  # zarr raises several kinds for a missing or non-v3 group
        if mode in ("r", "r+"):
            raise metadata_error(path, err, storage_options=storage_options) from None
        if mode == "a":
            # Opening to resume reads the existing metadata: a corrupt zarr.json is named too
            # (other errors, e.g. permissions, stay as they are).
            found = metadata_error(path, err, storage_options=storage_options)
            if "metadata file" in str(found):
                raise found from None
        raise


def _fill_value(dtype: str):
    kind = np.dtype(dtype).kind
    if kind == "f":
        return np.nan
    if kind == "c":
        return complex(np.nan, np.nan)
    return 0


def create_array(
    group: zarr.Group,
    spec: ArraySpec,
    *,
    chunk_depth: int,
    codec: CodecConfig,
    overwrite: bool = False,
) -> zarr.Array:
    """Create ``spec`` in ``group``: chunked along ``d`` by ``chunk_depth``, whole elsewhere.

    Arrays without a ``d`` dimension are one chunk. Float arrays get NaN as fill value (a
    chunk missing inside a shard reads as NaN and fails the finite check, never as zeros).
    """
    axis = spec.d_axis
    chunks = list(spec.shape)
    shards = None
    if axis is not None:
        chunks[axis] = min(int(chunk_depth), spec.shape[axis])
        per_shard = codec.chunks_per_shard(int(np.prod(chunks)) * np.dtype(spec.dtype).itemsize,
                                           -(-spec.shape[axis] // chunks[axis]), object_store=on_object_store(group))
        if per_shard > 0:
            shards = list(spec.shape)
            shards[axis] = min(chunks[axis] * per_shard, spec.shape[axis])
            # A shard holds whole chunks: round the shard depth down to a multiple.
            shards[axis] = max(chunks[axis], shards[axis] // chunks[axis] * chunks[axis])
    kwargs: dict[str, Any] = {}
    if shards is not None:
        kwargs["shards"] = tuple(shards)
    return group.create_array(
        spec.name,
        shape=spec.shape,
        chunks=tuple(chunks),
        dtype=spec.dtype,
        compressors=codec.compressors(),
        fill_value=_fill_value(spec.dtype),
        dimension_names=spec.dims,
        config={"write_empty_chunks": True},
        overwrite=overwrite,
        **kwargs,
    )


def d_axis_of(array: zarr.Array) -> int | None:
    """The position of the ``d`` dimension of a scan array (from its dimension names)."""
    names = array.metadata.dimension_names
    if names is None or "d" not in names:
        return None
    return list(names).index("d")


def stored_depth_of(array: zarr.Array) -> int:
    """D-slices per stored object: the shard depth when sharded, else the chunk depth."""
    axis = d_axis_of(array)
    if axis is None:
        return int(array.shape[0]) if array.ndim else 1
    shards = array.shards
    return int(shards[axis] if shards is not None else array.chunks[axis])


def num_stored_objects(array: zarr.Array) -> int:
    axis = d_axis_of(array)
    if axis is None:
        return 1
    return math.ceil(array.shape[axis] / stored_depth_of(array))


def chunk_key(array: zarr.Array, index: int | tuple[int, ...]) -> str:
    """The store key of a stored object (chunk, or shard when sharded).

    ``index`` is the object's position along D (the other coordinates 0), or its full grid
    coordinates as a tuple.
    """
    if isinstance(index, tuple):
        coords = tuple(int(i) for i in index)
    else:
        axis = d_axis_of(array)
        coords_list = [0] * array.ndim
        if axis is not None:
            coords_list[axis] = int(index)
        coords = tuple(coords_list)
    key = array.metadata.encode_chunk_key(coords)
    prefix = array.store_path.path
    return f"{prefix}/{key}" if prefix else key


def chunk_exists(array: zarr.Array, index: int | tuple[int, ...]) -> bool:
    """Whether a stored object (see :func:`chunk_key`) is in the store."""
    return bool(sync(array.store_path.store.exists(chunk_key(array, index))))


def missing_chunks(array: zarr.Array, indices: Sequence[Any] | None = None) -> list[Any]:
    """The stored objects (of ``indices``, default all along D) absent from the store."""
    if indices is None:
        indices = range(num_stored_objects(array))
    indices = list(indices)
    store = array.store_path.store

    async def _check() -> list[Any]:
        import asyncio

        missing = []
        # a bounded number of checks in flight: one coroutine per object of a tall scan at once
        # held memory in proportion to the scan (tens of MB for 20 k objects)
        for b0 in range(0, len(indices), 1024):
            batch = indices[b0 : b0 + 1024]
            found = await asyncio.gather(*(store.exists(chunk_key(array, i)) for i in batch))
            missing += [i for i, ok in zip(batch, found) if not ok]
        return missing

    return sync(_check())
