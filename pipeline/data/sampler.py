"""What each rank of the slab stream reads, in which order (:mod:`pipeline.data.stream`).

* :class:`SampleKey` — one fully specified sample (scan, D-range, crop, epoch, position); the
  dataset's output is a pure function of the key. :class:`SlabSample` is what a key reads as,
  :class:`OperatorRef` how its operator travels between processes.
* :class:`SlabStreamConfig` — the scans and every setting of the stream.
* The catalogue — each scan opened once and checked for the stream's mode, and its base keys
  (every slab, or ``crops_per_scan`` random crops).
* :class:`SlabSampler` — the keys of one rank for one epoch: a permutation drawn from
  ``(seed, epoch)`` of the base keys, padded or cut to a multiple of the world size and dealt
  round-robin: rank ``r`` takes positions ``r, r + W, r + 2W, ...``. The shards are disjoint
  and together cover the epoch.

The order (``order``): ``shuffle`` permutes all slabs of all scans. ``shard_local`` (the
``auto`` choice for sharded scans on an object store) keeps each rank on one stored object
(shard) until it has taken all of that object's slabs: the stored objects are permuted, then
the slabs inside each (both drawn from ``(seed, epoch)``), the sequence is cut into ``W``
consecutive blocks (rank ``r`` takes block ``r``) and interleaved, so that dealing it
round-robin gives each rank its block. A rank then reads each stored object it visits once,
whole (see :class:`~pipeline.data._objectstore.ShardCache`), instead of one range of a
64 MiB object per slab; the blocks' edges split at most ``W - 1`` objects between two ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Sampler

from pipeline.config_base import PathStr, Settings
from pipeline.paths import is_url

from .format import CTGeometry, ScanError
from .phantoms import derive_seed
from .scan import open_scan, slab_slices

__all__ = ["SampleKey", "OperatorRef", "SlabSample", "SlabStreamConfig", "SlabSampler", "resolve_order"]


class SampleKey(NamedTuple):
    """One sample: scan ``scan`` rows ``d0:d1`` (and, for crops, ``h0:h1``, ``w0:w1``).

    ``epoch`` and ``position`` (the sample's place in the epoch's global order) identify it.
    """

    scan: int
    d0: int
    d1: int
    h0: int = 0
    h1: int = -1
    w0: int = 0
    w1: int = -1
    epoch: int = 0
    position: int = 0


class OperatorRef(NamedTuple):
    """Stands for the operator of a slab that depends on the scan's geometry only.

    Parallel-beam slab operators hold projection tables of several MB but no data of their
    own; sending one from a worker for every sample would cost more than the sample. Workers
    send this reference instead and :class:`SlabStream` swaps in the operator, built once per
    ``(scan, thickness)`` in the consuming process.
    """

    scan: int
    d0: int
    d1: int


class SlabSample(NamedTuple):
    """``(y, op, meta)``: measurements (or an image crop), the slab's operator (or None), info."""

    y: torch.Tensor
    op: Any
    meta: dict[str, Any]


class SlabStreamConfig(Settings):
    """Settings of a :class:`SlabStream`.

    Args:
        scans: scan paths or URLs.
        mode: ``measurements`` (slabs with their operators) or ``image`` (crops of derived
            volumes).
        slab_thickness: D-slices per slab, a multiple of every scan's chunk depth (default:
            one chunk).
        image_arrays: the ``derived/`` arrays read in image mode, stacked on a leading axis
            (``("n2i",)`` gives ``(K, d, h, w)``; ``("fbp",)`` gives ``(1, d, h, w)``).
        crop_shape: ``(d, h, w)`` of image crops (``d`` a multiple of the chunk depth).
        crops_per_scan: crops of each scan per epoch (image mode).
        include_reference: add ``meta["reference"]``, the reference slab or crop, when the scan
            has one (evaluation, supervised baselines).
        shuffle: permute the samples each epoch (else scan order).
        seed: the seed of the permutation and crop positions.
        remainder: when the sample count is not a multiple of the world size: ``pad``
            (repeat the first samples so every rank gets as many — DDP-safe), ``drop`` (cut
            the last ones), ``uneven`` (ranks differ by one sample; exactly a disjoint cover).
        num_workers: readers working ahead of the loop (0: each sample is read in the loop's
            thread when it is asked for).
        worker_type: what the readers are: ``thread`` (default; threads of this process,
            no inter-process copy, see the module docstring) or ``process`` (DataLoader
            worker processes).
        prefetch_factor: samples (batches when ``batch_size`` is set) each reader reads
            ahead: at most ``num_workers * prefetch_factor`` are read and not yet delivered.
        batch_size: ``None`` yields single samples; an int stacks samples with the same
            operator (CT slabs of one scan, image crops).
        check_finite: reject chunks holding NaN/Inf.
        multiprocessing_context: how worker processes start (``fork``, ``forkserver``,
            ``spawn``; ``None``: the process default). ``spawn``/``forkserver`` workers import
            torch and zarr afresh (seconds, once: workers persist across epochs). Process
            readers only.
        storage_options: passed to fsspec for URL scans.
        order: how the epoch's order groups the slabs (measurements mode): ``shuffle`` — a
            permutation of all slabs, dealt round-robin; ``shard_local`` — stored object by
            stored object (see the module docstring): consecutive slabs of a rank come from
            one shard, which the readers fetch whole once (one request; the next shard is
            fetched while this one is served) and serve from memory, holding at most
            ``num_workers + 1`` decoded shards of each array read (MRI: measurements and coil
            maps; 2 readers and ``shard_chunks: auto``: 3 × 2 × 64 MiB; thread readers, or
            none; process readers read slab by slab); ``auto`` (default) — ``shard_local``
            when a scan is a URL whose measurements hold more than one slab per stored object
            (sharded), else ``shuffle`` (local scans keep their order). ``shuffle=False``
            keeps the stored order in both.
    """

    _where: ClassVar[str] = "SlabStreamConfig"
    scans: tuple[PathStr, ...] = Field(min_length=1)
    mode: Literal["measurements", "image"] = "measurements"
    slab_thickness: int | None = None
    image_arrays: tuple[str, ...] = ("n2i",)
    crop_shape: tuple[int, int, int] | None = None
    crops_per_scan: int = 16
    include_reference: bool = False
    shuffle: bool = True
    seed: int = 0
    remainder: Literal["pad", "drop", "uneven"] = "pad"
    num_workers: int = Field(2, ge=0)
    worker_type: Literal["thread", "process"] = "thread"
    prefetch_factor: int = Field(2, ge=1)
    batch_size: int | None = Field(None, ge=1)
    check_finite: bool = True
    multiprocessing_context: str | None = None
    storage_options: dict[str, Any] = {}
    order: Literal["auto", "shuffle", "shard_local"] = "auto"

    @model_validator(mode="after")
    def _image_mode(self) -> "SlabStreamConfig":
        if self.mode == "image" and self.crop_shape is None:
            raise ValueError("mode 'image' needs crop_shape=(d, h, w)")
        if self.mode == "image" and self.order == "shard_local":
            raise ValueError("order 'shard_local' needs mode 'measurements' (image crops start at "
                             "random D positions); use order 'auto' or 'shuffle'")
        return self


# ----------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class _ScanInfo:
    path: str
    modality: str
    depth: int  # D of what is sliced: measurements (mode measurements) or volume (image)
    chunk_depth: int
    image_shape: tuple[int, int, int]
    cone: bool
    stored_depth: int  # D-slices per stored object of the measurements (the shard when sharded)
    url: bool


def _catalogue(config: SlabStreamConfig, opened: list | None = None) -> list[_ScanInfo]:
    """What the stream needs to know of each scan; with ``opened``, the open scans are appended
    to it (a stream's reader threads reuse them: an open on an object store is ~13 requests)."""
    out = []
    for path in config.scans:
        scan = open_scan(path, storage_options=config.storage_options)
        if opened is not None:
            opened.append(scan)
        meta = scan.metadata
        cone = isinstance(meta.geometry, CTGeometry) and meta.geometry.kind == "cone"
        if config.mode == "measurements" and cone:
            raise ScanError(
                f"scan '{path}': cone-beam slabs have no exact operator of their own; stream "
                "it with mode='image' over derived volumes (recon3d preprocess)"
            )
        if config.mode == "image":
            for name in config.image_arrays:
                scan.derived(name)  # raises, naming the scan, when missing or incomplete
        depth = meta.measurement_depth if config.mode == "measurements" else meta.volume_shape[0]
        out.append(
            _ScanInfo(path, meta.modality, depth, meta.chunk_depth, tuple(meta.volume_shape), cone,
                      scan.measurements.stored_depth if config.mode == "measurements" else meta.chunk_depth,
                      is_url(path))
        )
    return out


def _base_keys(config: SlabStreamConfig, infos: Sequence[_ScanInfo]) -> list[SampleKey]:
    keys: list[SampleKey] = []
    for i, info in enumerate(infos):
        if config.mode == "measurements":
            t = info.chunk_depth if config.slab_thickness is None else int(config.slab_thickness)
            try:
                slices = slab_slices(info.depth, t, info.chunk_depth)
            except ValueError as err:
                raise ValueError(f"scan '{info.path}': {err}") from None
            keys += [SampleKey(i, s.start, s.stop) for s in slices]
        else:
            cd, ch, cw = (int(v) for v in config.crop_shape)  # type: ignore[union-attr]
            d, h, w = info.image_shape
            if cd % info.chunk_depth or cd > d or ch > h or cw > w or min(cd, ch, cw) < 1:
                raise ValueError(
                    f"scan '{info.path}': crop_shape {config.crop_shape} must fit the volume "
                    f"{info.image_shape} with d a multiple of the chunk depth {info.chunk_depth}"
                )
            keys += [SampleKey(i, 0, cd, 0, ch, 0, cw, position=k) for k in range(config.crops_per_scan)]
    return keys


def _thickness(config: SlabStreamConfig, info: _ScanInfo) -> int:
    return info.chunk_depth if config.slab_thickness is None else int(config.slab_thickness)


def resolve_order(config: SlabStreamConfig, infos: Sequence[_ScanInfo]) -> Literal["shuffle", "shard_local"]:
    """``config.order`` with ``auto`` made ``shard_local`` (a URL scan whose measurements hold
    more than one slab per stored object, measurements mode) or ``shuffle``."""
    if config.order != "auto":
        return config.order
    if config.mode == "measurements" and any(i.url and i.stored_depth > _thickness(config, i) for i in infos):
        return "shard_local"
    return "shuffle"


def _interleave_blocks(sequence: list[int], world_size: int) -> list[int]:
    """``sequence`` cut into ``world_size`` consecutive blocks (the first ``len % world_size``
    one longer), laid out so that dealing the result round-robin (rank ``r`` takes positions
    ``r, r + W, ...``) gives rank ``r`` block ``r``, in its order."""
    n, w = len(sequence), world_size
    out = [0] * n
    start = 0
    for r in range(w):
        count = n // w + (1 if r < n % w else 0)
        out[r : r + count * w : w] = sequence[start : start + count]
        start += count
    return out


# ----------------------------------------------------------------------------- sampler
class SlabSampler(Sampler[SampleKey]):
    """The sample keys of one rank, a pure function of ``(seed, epoch, rank, world_size)``.

    The epoch's global order is a permutation of the base samples drawn from
    ``(seed, epoch)``; it is padded/cut to a multiple of the world size (``remainder``) and,
    from global position ``offset`` on, dealt round-robin to the ranks. ``start`` skips the
    rank's first samples (mid-epoch resume).

    With ``order`` ``shard_local`` (:func:`resolve_order`) the permutation is of the stored
    objects, then of the slabs inside each, and the sequence is laid out in one block per
    rank for ``order_world_size`` ranks (the world size, except for the rest of an epoch
    resumed at another world size: then the old order is kept and its rest dealt
    round-robin, each slab still once).
    """

    def __init__(
        self,
        base: Sequence[SampleKey],
        infos: Sequence[_ScanInfo],
        config: SlabStreamConfig,
        *,
        rank: int,
        world_size: int,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"SlabSampler: need 0 <= rank < world_size, got {rank}, {world_size}")
        self.base = list(base)
        self.infos = list(infos)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self.start = 0
        self.order = resolve_order(config, self.infos)
        self.order_world_size = world_size  # the ranks the current epoch's order was laid out for
        self._groups = self._stored_groups() if self.order == "shard_local" else []

    def _stored_groups(self) -> list[list[int]]:
        """Indices into the base samples grouped by the stored object of the measurements
        holding their first D-slice, in scan and D order."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(self.base):
            groups.setdefault((key.scan, key.d0 // self.infos[key.scan].stored_depth), []).append(i)
        return list(groups.values())

    def _shard_local_order(self, epoch: int) -> list[int]:
        groups = self._groups
        if self.config.shuffle:
            rng = np.random.default_rng(derive_seed(self.config.seed, "shard-order", epoch))
            objects = [groups[j] for j in rng.permutation(len(groups))]
            groups = [[g[i] for i in rng.permutation(len(g))] for g in objects]
        order = [i for g in groups for i in g]
        n, w = len(order), self.order_world_size
        if self.config.remainder == "pad" and n % w:
            order += (order * w)[: w - n % w]
        elif self.config.remainder == "drop":
            order = order[: n - n % w]
        return _interleave_blocks(order, w)

    def global_order(self, epoch: int) -> list[int]:
        """Indices into the base samples, in the epoch's order, padded or cut."""
        if self.order == "shard_local":
            return self._shard_local_order(epoch)
        n = len(self.base)
        if self.config.shuffle:
            rng = np.random.default_rng(derive_seed(self.config.seed, "order", epoch))
            order = rng.permutation(n).tolist()
        else:
            order = list(range(n))
        w = self.world_size
        if self.config.remainder == "pad" and n % w:
            order += (order * w)[: w - n % w]
        elif self.config.remainder == "drop":
            order = order[: n - n % w]
        return order

    def _key(self, base_index: int, epoch: int, position: int) -> SampleKey:
        key = self.base[base_index]
        if self.config.mode == "image":
            info = self.infos[key.scan]
            d, h, w = info.image_shape
            cd, ch, cw = key.d1 - key.d0, key.h1 - key.h0, key.w1 - key.w0
            rng = np.random.default_rng(derive_seed(self.config.seed, "crop", epoch, base_index))
            steps = (d - cd) // info.chunk_depth
            d0 = int(rng.integers(0, steps + 1)) * info.chunk_depth
            h0 = int(rng.integers(0, h - ch + 1))
            w0 = int(rng.integers(0, w - cw + 1))
            key = key._replace(d0=d0, d1=d0 + cd, h0=h0, h1=h0 + ch, w0=w0, w1=w0 + cw)
        return key._replace(epoch=epoch, position=position)

    def keys(self, epoch: int | None = None, *, offset: int | None = None) -> list[SampleKey]:
        """This rank's keys of ``epoch`` from global position ``offset`` on (before ``start``)."""
        epoch = self.epoch if epoch is None else epoch
        offset = self.offset if offset is None else offset
        order = self.global_order(epoch)
        positions = range(offset + self.rank, len(order), self.world_size)
        return [self._key(order[p], epoch, p) for p in positions]

    def __iter__(self) -> Iterator[SampleKey]:
        return iter(self.keys()[self.start :])

    def __len__(self) -> int:
        return max(0, len(range(self.offset + self.rank, len(self.global_order(self.epoch)), self.world_size)) - self.start)
