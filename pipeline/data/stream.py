"""The slab stream: training samples ``(y_slab, op_slab, meta)`` from many scans, resumable.

Pieces (the sample keys, the config and :class:`~pipeline.data.sampler.SlabSampler`, which deals
each rank its keys of an epoch, are in :mod:`pipeline.data.sampler`):

* :class:`SlabDataset` — map-style; each process opens the scans itself and reads
  exactly the chunks of the key's D-range (slabs are aligned to chunks), with the presence,
  decode and finite checks of :class:`~pipeline.data.scan.ScanArray`.
* :class:`SlabStream` — reads the sampler's keys ahead of the training loop (reader threads or
  DataLoader worker processes, see ``worker_type``) and counts the samples *delivered to the
  loop*, so ``state_dict()`` / ``load_state_dict()`` resume exactly after the last sample the
  loop saw, however far the readers had read ahead.

Readers: ``worker_type="thread"`` (default) runs ``num_workers`` threads in the training
process. Reading a slab is almost all zarr/Blosc decoding and numpy checks, which release the
GIL, so threads decode in parallel and hand the tensors over without a copy. A DataLoader
worker process (``worker_type="process"``) must send every tensor back through a fresh shared
memory segment, which costs about as much as decoding it; processes are still the choice when
the per-sample Python work is heavy (custom transforms holding the GIL).

Shard-local reads: when the sampler's order is ``shard_local`` (see
:mod:`pipeline.data.sampler`; the default for sharded scans on an object store) and the readers
are threads (or there are none), the dataset reads each stored object once, whole, through a
:class:`~pipeline.data._objectstore.ShardCache` and serves the slabs from memory: one request
per shard visited instead of one per slab. While the first slab of a stored object is read,
the next object of the rank's order is fetched in the background; a shard is dropped when
the last of its slabs has been read. Decoded shards held, per array read (measurements; coil
maps for MRI; the reference when asked for): at most ``num_workers + 1`` in this order (one
per reader thread, one fetched ahead), ``num_workers + 2`` in any case: with the default 2
reader threads and ``shard_chunks: auto`` (about 64 MiB a shard), at most 3 × 64 MiB per
array (an MRI stream: 2 arrays, 384 MiB).

Modes: ``measurements`` yields ``(y, op, meta)`` with ``y`` the slab's measurements (CT
``(d, A, U)``, MRI ``(C, d, kH, kW)``) and ``op`` its exact operator (parallel-beam CT and MRI);
``image`` yields ``(x, None, meta)`` with ``x`` a random crop ``(K, d, h, w)`` of derived
volumes (``derived/n2i`` for Noise2Inverse; any geometry, cone beam included).
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generator, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.distributed import rank_and_world

from .sampler import (
    OperatorRef,
    SampleKey,
    SlabSample,
    SlabSampler,
    SlabStreamConfig,
    _base_keys,
    _catalogue,
    _ScanInfo,
)
from ._objectstore import ShardCache
from .scan import Scan, ScanArray, open_scan

__all__ = ["SlabDataset", "SlabStream", "collate_slabs"]


# ----------------------------------------------------------------------------- dataset
class SlabDataset(Dataset):
    """Map-style dataset from :class:`SampleKey` to :class:`SlabSample`.

    Scans are opened on first use in each process (DataLoader workers open their own; reader
    threads share their process's: zarr reads are thread-safe, and the lazily filled caches
    of a :class:`~pipeline.data.scan.Scan` (mask, operators) get the same value whoever fills
    them).
    Parallel-beam CT samples carry an :class:`OperatorRef` (see there); :meth:`resolve` turns
    it into the operator in the consuming process (``SlabStream`` does this for you).
    With ``shard_reads`` the D-ranges are read through a
    :class:`~pipeline.data._objectstore.ShardCache` (each shard whole, once; keys in
    shard-local order): the values are the same.
    """

    def __init__(self, config: SlabStreamConfig, infos: Sequence[_ScanInfo], *, shard_reads: bool = False) -> None:
        self.config = config
        self.infos = list(infos)
        self.shard_reads = shard_reads
        self._scans: dict[int, Scan] = {}
        self._open_lock = threading.Lock()  # reader threads share one open Scan per scan
        # shard-local order: one shard per reader thread being read, one fetched ahead, and one
        # more a thread may be finishing (the stream releases each when its slabs are read)
        self.shards = ShardCache(shards_per_array=config.num_workers + 2) if shard_reads else None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "infos": self.infos, "shard_reads": self.shard_reads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["infos"], shard_reads=state.get("shard_reads", False))

    def _arrays(self, key: SampleKey) -> list[ScanArray]:
        """The D-sliced arrays a measurements-mode ``key`` reads."""
        scan = self.scan(key.scan)
        arrays = [scan.measurements]
        if scan.modality == "mri" and scan.coil_maps is not None:
            arrays.append(scan.coil_maps)
        if self.config.include_reference and scan.reference is not None:
            arrays.append(scan.reference)
        return arrays

    def prefetch(self, key: SampleKey) -> None:
        """Start reading, in the background, the shards that ``key`` reads (with
        ``shard_reads``; else nothing): the next stored object while this one is served."""
        if self.shards is None or self.config.mode != "measurements":
            return
        for array in self._arrays(key):
            self.shards.prefetch(array, key.scan, key.d0, key.d1, check_finite=self.config.check_finite)

    def release(self, key: SampleKey) -> None:
        """Drop the shards that ``key`` read (with ``shard_reads``): no later key needs them."""
        if self.shards is None or self.config.mode != "measurements":
            return
        for array in self._arrays(key):
            self.shards.release(array, key.scan, key.d0, key.d1)

    def _read(self, index: int, array: ScanArray, d_slice: slice) -> torch.Tensor:
        check = self.config.check_finite
        if self.shards is None:
            return array.read_torch(d_slice, check_finite=check)
        values = self.shards.read(array, index, d_slice.start, d_slice.stop, check_finite=check)
        return torch.from_numpy(np.ascontiguousarray(values))

    def scan(self, index: int) -> Scan:
        scan = self._scans.get(index)
        if scan is None:
            with self._open_lock:
                scan = self._scans.get(index)
                if scan is None:
                    scan = open_scan(self.infos[index].path, storage_options=self.config.storage_options)
                    self._scans[index] = scan
        return scan

    def __len__(self) -> int:  # map-style datasets are indexed by keys, not 0..n-1
        raise TypeError("SlabDataset is indexed by SampleKey; iterate a SlabStream")

    def operator(self, ref: OperatorRef) -> Any:
        """The operator a :class:`OperatorRef` stands for (cached per scan and thickness)."""
        return self.scan(ref.scan).operator(slice(ref.d0, ref.d1))

    def resolve(self, sample: SlabSample) -> SlabSample:
        """``sample`` with an :class:`OperatorRef` replaced by its operator."""
        if isinstance(sample.op, OperatorRef):
            return sample._replace(op=self.operator(sample.op))
        return sample

    def __getitem__(self, key: SampleKey) -> SlabSample:
        scan = self.scan(key.scan)
        check = self.config.check_finite
        d_slice = slice(key.d0, key.d1)
        meta: dict[str, Any] = {
            "scan": scan.path,
            "scan_index": key.scan,
            "modality": scan.modality,
            "d_slice": (key.d0, key.d1),
            "epoch": key.epoch,
            "position": key.position,
            "noise_model": scan.metadata.noise_model,
            "acquisition_noise": scan.metadata.acquisition_noise,
            "detector": scan.metadata.detector,
        }
        if self.config.mode == "measurements":
            if scan.modality == "ct":
                y = self._read(key.scan, scan.measurements, d_slice)
                op: Any = OperatorRef(key.scan, key.d0, key.d1)
                meta["operator_key"] = (scan.path, key.d1 - key.d0)
            elif self.shards is None:
                y, op = scan.slab(d_slice, check_finite=check)
                meta["operator_key"] = (scan.path, key.d0, key.d1)
            else:
                # Scan.slab's operator, its coil maps read through the shard cache as well.
                op = scan.operator(d_slice, coil_maps=self._read(key.scan, scan.coil_maps, d_slice))
                y = self._read(key.scan, scan.measurements, d_slice)
                meta["operator_key"] = (scan.path, key.d0, key.d1)
            if self.config.include_reference and scan.reference is not None:
                meta["reference"] = self._read(key.scan, scan.reference, d_slice)
            return SlabSample(y, op, meta)
        crop = (slice(key.h0, key.h1), slice(key.w0, key.w1))
        parts = []
        for name in self.config.image_arrays:
            arr = scan.derived(name)
            values = arr.read(d_slice, check_finite=check)
            if values.ndim == 3:
                values = values[None]
            parts.append(values[(...,) + crop])
        x = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=0)))
        meta["crop"] = (key.d0, key.d1, key.h0, key.h1, key.w0, key.w1)
        meta["operator_key"] = None
        if self.config.include_reference and scan.reference is not None:
            ref = scan.reference.read(d_slice, check_finite=check)[(...,) + crop]
            meta["reference"] = torch.from_numpy(np.ascontiguousarray(ref))
        return SlabSample(x, None, meta)


def _identity(sample: SlabSample) -> SlabSample:
    return sample


def collate_slabs(samples: Sequence[SlabSample]) -> SlabSample:
    """Stack samples that share one operator: ``y`` gains a leading batch axis, ``op`` (which
    broadcasts over leading axes) is kept once, ``meta`` becomes a list.

    Raises:
        ValueError: samples with different operators (MRI slabs at different D positions
            have different coil maps: use ``batch_size=None``).
    """
    keys = {repr(s.meta.get("operator_key")) for s in samples}
    if len(keys) > 1:
        raise ValueError(
            "collate_slabs: these samples have different operators "
            f"({sorted(keys)[:3]}...); stream them one at a time (batch_size=None)"
        )
    shapes = {tuple(s.y.shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"collate_slabs: samples of different shapes {sorted(shapes)} cannot be stacked")
    return SlabSample(torch.stack([s.y for s in samples]), samples[0].op, [s.meta for s in samples])


def _worker_init(_: int) -> None:
    # Workers decode; one intra-op thread each keeps them from fighting over the cores.
    torch.set_num_threads(1)


READER_THREAD_PREFIX = "recon3d-slab-reader"

_T = TypeVar("_T")
_R = TypeVar("_R")


def read_ahead(
    read: Callable[[_T], _R], items: Iterable[_T], *, num_threads: int, depth: int
) -> Generator[_R, None, None]:
    """``read(item)`` for each item, in order, computed by ``num_threads`` threads.

    At most ``depth`` results are in flight (read or being read, not yet yielded). An
    exception raised by ``read`` is raised here, unchanged, when its item's turn comes (the
    items before it are yielded first). The threads (named ``recon3d-slab-reader-*``) stop,
    and reads not yet started are dropped, when the iteration ends, raises or is closed (a
    ``break`` in the consuming loop closes it); a read already running is waited for.
    """
    if num_threads < 1 or depth < 1:
        raise ValueError(f"read_ahead: need num_threads >= 1 and depth >= 1, got {num_threads}, {depth}")
    pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix=READER_THREAD_PREFIX)
    pending: collections.deque[Future] = collections.deque()
    todo = iter(items)
    try:
        for item in itertools.islice(todo, depth):
            pending.append(pool.submit(read, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(todo, 1):
                pending.append(pool.submit(read, item))
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- stream
class SlabStream:
    """An iterable of :class:`SlabSample` (or stacked batches) for one rank, resumable.

    Iterating runs one epoch from the current position; at its end the epoch advances and the
    position returns to 0. ``state_dict()`` taken at any point and loaded into a new stream
    (same scans and config) makes it yield exactly the samples the old one had not delivered.
    Loading a state saved at another world size continues from the global position the ranks
    had reached together (this assumes the ranks ran in lockstep, as in data-parallel
    training; with the ``shard_local`` order the rest of that epoch is the old order's rest,
    dealt round-robin: each slab still once, no longer shard by shard). The samples come in the
    sampler's order whatever the readers; a reader's error
    (a missing or corrupt chunk, naming scan, array and chunk) is raised in the loop at that
    sample's turn; a loop that stops early (``break``) stops the reader threads with it.

    Args:
        config: :class:`SlabStreamConfig`.
        rank, world_size: default from ``torch.distributed`` when initialised, else 0 and 1.
    """

    def __init__(self, config: SlabStreamConfig, *, rank: int | None = None, world_size: int | None = None) -> None:
        if rank is None or world_size is None:
            r, w = rank_and_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        self.config = config
        opened: list[Scan] = []
        self.infos = _catalogue(config, opened)
        self.base = _base_keys(config, self.infos)
        if not self.base:
            raise ValueError("SlabStream: the scans give no samples")
        self.sampler = SlabSampler(self.base, self.infos, config, rank=rank, world_size=world_size)
        # Whole-shard reads pay off when a reader's consecutive slabs share a shard: the
        # shard-local order, read by threads of this process (worker processes are dealt
        # samples round-robin by the DataLoader, so each would fetch every shard).
        threads = config.num_workers == 0 or config.worker_type == "thread"
        shard_reads = self.sampler.order == "shard_local" and threads
        self.dataset = SlabDataset(config, self.infos, shard_reads=shard_reads)
        # The reader threads reuse the catalogue's open scans (on s3 each open cost 100-160 ms:
        # stream 0.46x local against 0.39x, BENCHMARKS.md 17.1); worker processes open their
        # own (SlabDataset.__getstate__ leaves them out).
        self.dataset._scans.update(enumerate(opened))
        self._loader: DataLoader | None = None
        self.position = 0  # samples of this rank delivered since sampler.offset in this epoch

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def rank(self) -> int:
        return self.sampler.rank

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration."""
        self.sampler.epoch = int(epoch)
        self.sampler.offset = 0
        self.sampler.order_world_size = self.world_size
        self.position = 0

    def _fingerprint(self) -> list[Any]:
        out = [list(self.config.scans), self.config.mode, self.config.slab_thickness,
               list(self.config.crop_shape or ()), self.config.crops_per_scan, len(self.base)]
        if self.sampler.order != "shuffle":  # states saved before ``order`` existed still load
            out.append(self.sampler.order)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The rank's position: ``{"epoch", "offset", "position", "seed", "world_size", ...}``
        (``order_world_size``: the ranks the epoch's order was laid out for)."""
        return {
            "epoch": self.sampler.epoch,
            "offset": self.sampler.offset,
            "position": self.position,
            "seed": self.config.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "order_world_size": self.sampler.order_world_size,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last sample delivered when ``state`` was taken."""
        if state.get("seed") != self.config.seed or state.get("fingerprint") != self._fingerprint():
            raise ValueError(
                "SlabStream.load_state_dict: the state was saved for other scans or settings "
                f"(seed {state.get('seed')} vs {self.config.seed}, fingerprint "
                f"{state.get('fingerprint')} vs {self._fingerprint()}; a last entry 'shard_local' "
                "is the order, see SlabStreamConfig.order)"
            )
        self.sampler.epoch = int(state["epoch"])
        # The rest of this epoch follows the order it was started in (laid out for that many ranks).
        self.sampler.order_world_size = int(state.get("order_world_size", state["world_size"]))
        if int(state["world_size"]) == self.world_size:
            self.sampler.offset = int(state["offset"])
            self.position = int(state["position"])
        else:
            self.sampler.offset = int(state["offset"]) + int(state["position"]) * int(state["world_size"])
            self.position = 0

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        """Samples (or batches) this rank delivers in a full epoch from its start."""
        n = len(self.sampler.keys(offset=0))
        if self.config.batch_size is None:
            return n
        return math.ceil(n / self.config.batch_size)

    def _make_loader(self) -> DataLoader:
        cfg = self.config
        batched = cfg.batch_size is not None
        return DataLoader(
            self.dataset,
            sampler=self.sampler,
            batch_size=cfg.batch_size if batched else None,
            collate_fn=collate_slabs if batched else _identity,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor,
            persistent_workers=True,
            worker_init_fn=_worker_init,
            multiprocessing_context=cfg.multiprocessing_context,
        )

    def _items(self) -> Generator[SlabSample, None, None]:
        """Samples (or batches) from the current position on, as read (operators unresolved)."""
        cfg = self.config
        if cfg.num_workers > 0 and cfg.worker_type == "process":
            if self._loader is None:
                self._loader = self._make_loader()
            self.sampler.start = self.position
            yield from self._loader
            return
        keys = self.keys()
        read = self._shard_reader(keys) if self.dataset.shards is not None else self.dataset.__getitem__
        if cfg.num_workers == 0:
            samples: Generator[SlabSample, None, None] = (read(key) for key in keys)
        else:
            depth = cfg.num_workers * cfg.prefetch_factor * (cfg.batch_size or 1)
            samples = read_ahead(read, keys, num_threads=cfg.num_workers, depth=depth)
        try:
            if cfg.batch_size is None:
                yield from samples
                return
            while batch := list(itertools.islice(samples, cfg.batch_size)):
                yield collate_slabs(batch)
        finally:
            samples.close()  # stops the reader threads now, not when collected
            if self.dataset.shards is not None:
                self.dataset.shards.clear()  # a loop stopped early leaves shards no one will read

    def _shard_reader(self, keys: Sequence[SampleKey]) -> Callable[[SampleKey], SlabSample]:
        """The dataset's read over ``keys`` (shard-local order) which, on the first slab of a
        stored object, starts reading its arrays' shards side by side and the next stored
        object's in the background, and drops a stored object's shards once the last of its
        slabs in ``keys`` is read."""
        infos = self.infos
        groups = [(k.scan, k.d0 // infos[k.scan].stored_depth) for k in keys]
        ahead: dict[SampleKey, SampleKey] = {}
        first = 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or groups[i] != groups[first]:
                if i < len(keys):
                    ahead[keys[first]] = keys[i]
                first = i
        group_of = dict(zip(keys, groups))
        left = collections.Counter(groups)  # slabs of each stored object still to read
        lock = threading.Lock()
        dataset = self.dataset

        def read(key: SampleKey) -> SlabSample:
            following = ahead.get(key)
            if following is not None or key == keys[0]:
                dataset.prefetch(key)  # this object's arrays side by side (held ones: nothing)
            if following is not None:
                dataset.prefetch(following)
            try:
                return dataset[key]
            finally:
                group = group_of[key]
                with lock:
                    left[group] -= 1
                    done = left[group] == 0
                if done:
                    dataset.release(key)

        return read

    def __iter__(self) -> Iterator[SlabSample]:
        step = 1 if self.config.batch_size is None else None
        items = self._items()
        try:
            for item in items:
                self.position += step if step is not None else len(item.meta)
                yield self.dataset.resolve(item)
        finally:
            items.close()  # a loop that stops early stops the readers too
        self.sampler.epoch += 1
        self.sampler.offset = 0
        self.sampler.start = 0
        self.sampler.order_world_size = self.world_size
        self.position = 0

    def keys(self) -> list[SampleKey]:
        """The keys the next iteration will yield (from the current position)."""
        return self.sampler.keys()[self.position :]

