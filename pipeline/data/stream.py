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
from .scan import Scan, open_scan

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
    """

    def __init__(self, config: SlabStreamConfig, infos: Sequence[_ScanInfo]) -> None:
        self.config = config
        self.infos = list(infos)
        self._scans: dict[int, Scan] = {}
        self._open_lock = threading.Lock()  # reader threads share one open Scan per scan

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "infos": self.infos}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.infos = state["infos"]
        self._scans = {}
        self._open_lock = threading.Lock()

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
                y = scan.measurements.read_torch(d_slice, check_finite=check)
                op: Any = OperatorRef(key.scan, key.d0, key.d1)
                meta["operator_key"] = (scan.path, key.d1 - key.d0)
            else:
                y, op = scan.slab(d_slice, check_finite=check)
                meta["operator_key"] = (scan.path, key.d0, key.d1)
            if self.config.include_reference and scan.reference is not None:
                meta["reference"] = scan.reference.read_torch(d_slice, check_finite=check)
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
    training). The samples come in the sampler's order whatever the readers; a reader's error
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
        self.infos = _catalogue(config)
        self.base = _base_keys(config, self.infos)
        if not self.base:
            raise ValueError("SlabStream: the scans give no samples")
        self.sampler = SlabSampler(self.base, self.infos, config, rank=rank, world_size=world_size)
        self.dataset = SlabDataset(config, self.infos)
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
        self.position = 0

    def _fingerprint(self) -> list[Any]:
        return [list(self.config.scans), self.config.mode, self.config.slab_thickness,
                list(self.config.crop_shape or ()), self.config.crops_per_scan, len(self.base)]

    def state_dict(self) -> dict[str, Any]:
        """The rank's position: ``{"epoch", "offset", "position", "seed", "world_size", ...}``."""
        return {
            "epoch": self.sampler.epoch,
            "offset": self.sampler.offset,
            "position": self.position,
            "seed": self.config.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last sample delivered when ``state`` was taken."""
        if state.get("seed") != self.config.seed or state.get("fingerprint") != self._fingerprint():
            raise ValueError(
                "SlabStream.load_state_dict: the state was saved for other scans or settings "
                f"(seed {state.get('seed')} vs {self.config.seed}, fingerprint "
                f"{state.get('fingerprint')} vs {self._fingerprint()})"
            )
        self.sampler.epoch = int(state["epoch"])
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
        if cfg.num_workers == 0:
            samples: Generator[SlabSample, None, None] = (self.dataset[key] for key in keys)
        else:
            depth = cfg.num_workers * cfg.prefetch_factor * (cfg.batch_size or 1)
            samples = read_ahead(self.dataset.__getitem__, keys, num_threads=cfg.num_workers, depth=depth)
        try:
            if cfg.batch_size is None:
                yield from samples
                return
            while batch := list(itertools.islice(samples, cfg.batch_size)):
                yield collate_slabs(batch)
        finally:
            samples.close()  # stops the reader threads now, not when collected

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
        self.position = 0

    def keys(self) -> list[SampleKey]:
        """The keys the next iteration will yield (from the current position)."""
        return self.sampler.keys()[self.position :]

