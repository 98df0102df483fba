"""Cone-beam CT jobs: simulation and FDK, exact, with memory bounded by a slab and a row block.

A cone-beam ray crosses many D-slices, so a D-slab of the volume is measured by every detector
row its shadow covers, and a block of detector rows sees a D-range of the volume that widens
with the cone angle. Neither is an exact sub-problem on its own, but the projector is linear:
the projection of the volume is the sum over D-slabs of the slabs' projections, each onto the
rows it reaches (``ConeBeamCT.slab(...).rows(...)``, which place the slab and the row window
where they sit), and FDK's backprojection is likewise a sum over blocks of detector rows. So
both jobs work piece by piece, out of core and exact (to float rounding):

* **Simulation** (``measurements (V, A, U)``): one task per block of detector rows (whole
  stored objects, about :data:`ROW_BLOCK_BYTES`). It asks the geometry which volume slices
  those rows can see (``ConeBeamCT.slices_seen_by``), evaluates them one slab at a time
  (slabs of about :data:`SLAB_BYTES` on a fixed grid aligned with the reference's chunks) and
  adds each slab's projection onto the rows of the block it reaches; then it applies the
  noise of each measurement chunk (a generator seeded by ``(seed, chunk index)``, as before)
  and writes each stored object once. The reference is written slab by slab by tasks of its
  own.
* **FDK** (``derived/fbp``, ``derived/n2i``): one task per slab of the volume (whole stored
  objects, about :data:`SLAB_BYTES`). It reads the detector rows the slab reaches
  (``ConeBeamCT.rows_hit_by``) one block of about :data:`ROW_BLOCK_BYTES` at a time (blocks
  on a fixed grid aligned with the measurements' chunks), weights and ramp-filters them (both
  act on each row alone) and adds their FDK backprojection into the slices of the slab they
  reach (``ConeBeamCT.slices_seen_by``); the filtering and the backprojection are
  :func:`pipeline.classical.fdk_filtered` and :func:`~pipeline.classical.fdk_backproject`.
  Blocks (of half :data:`ROW_BLOCK_BYTES`) are filtered whole and the last two are kept for the
  next slabs, which reach nearly the same rows (without that, 8-slice slabs read and filtered
  the detector 6 times at 512³).

Memory per worker: one slab, one block of rows and the projector's temporaries (its tables
for one chunk of angles, about a slice's worth), whatever the depth of the volume; FDK's two
kept filtered half-blocks are shared by the job's workers, and it filters a few MiB of rows at
a time. Work: a row whose rays cross ``k`` slabs is traced ``k`` times (each time over its
whole in-plane path), and each FDK slab backprojects every (voxel column, angle) pair once
per two half-blocks of rows it reaches, so the cost over a whole-volume computation grows with
the cone's spread (a row's rays cross more slices the further it is from the central plane)
relative to the slab thickness. Measured with ``benchmarks/cone_memory.py`` (512³, 24 angles,
default distances, 1 thread, CPU seconds against the whole-volume job of the same run,
2026-12-05), with 128 (the default), 32 and 8 MiB slabs (128, 32 and 8 slices) and 32 MiB row
blocks: simulation 0.93–1.07×, 0.97–1.13× and 1.08–1.25× (six or seven runs), FDK 1.01×, 0.98× and
1.16×; peak memory 1.87, 0.86 and 0.66 (simulation) and 0.73, 0.40 and 0.32 (FDK) of the
volume's size, against 5.0 and 2.6 for the whole-volume jobs (the volume here is only 4
default slabs). Larger :data:`SLAB_BYTES` trade memory for time.

Results do not depend on how the job runs: the tasks, slabs and row blocks depend only on the
scan's shape and chunking (not on workers, interruptions or which tasks remain), and the noise
is drawn per measurement chunk. A killed run resumes: rerunning recomputes the tasks with
missing stored objects and writes only those objects.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import zarr

from .format import ScanMetadata
from .store import missing_chunks, stored_depth_of
from .writer import SlabTask

__all__ = ["cone_simulation_tasks", "fdk_tasks", "SLAB_BYTES", "ROW_BLOCK_BYTES"]

#: Bytes (float32) of one slab of the volume held at a time (per worker).
SLAB_BYTES = 128 << 20
#: Bytes (float32) of one block of detector rows held at a time (per worker).
ROW_BLOCK_BYTES = 128 << 20


def _ranges(depth: int, step: int) -> list[tuple[int, int, int]]:
    return [(i, d0, min(d0 + step, depth)) for i, d0 in enumerate(range(0, depth, step))]


def _grid_step(bytes_per_slice: int, budget: int, stored: int) -> int:
    """Slices per piece: about ``budget`` bytes, a multiple of ``stored`` when that fits."""
    step = max(1, int(budget) // max(1, bytes_per_slice))
    return step // stored * stored if step >= stored else step


def _pieces(lo: int, hi: int, step: int) -> list[tuple[int, int]]:
    """The pieces ``[a, b)`` of the grid ``0, step, 2·step, ...`` that meet ``[lo, hi)``,
    clipped to it."""
    first = lo // step * step
    return [(max(a, lo), min(a + step, hi)) for a in range(first, hi, step)]


def _missing(arr: zarr.Array, indices: list[int]) -> list[int]:
    return sorted(missing_chunks(arr, indices))


def cone_simulation_tasks(
    meta: ScanMetadata,
    angles: torch.Tensor,
    meas: zarr.Array,
    ref: zarr.Array,
    reference_slab: Callable[[int, int], torch.Tensor],
    noisy: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    slab_bytes: int | None = None,
    row_block_bytes: int | None = None,
) -> list[SlabTask]:
    """Tasks that write ``reference`` slab by slab and the cone-beam ``measurements`` block of
    rows by block of rows (see the module docstring).

    ``reference_slab(d0, d1)`` evaluates slices ``[d0, d1)`` of the volume; ``noisy(p, k)``
    applies the noise of measurement chunk ``k`` to its clean rows ``p``. ``slab_bytes`` and
    ``row_block_bytes`` default to :data:`SLAB_BYTES` and :data:`ROW_BLOCK_BYTES`.

    Shape:
        ``reference (D, H, W)``; ``measurements (V, A, U)``.
    """
    from .ct_ops import cone_operator

    d, h, w = meta.volume_shape
    v = meta.measurement_depth
    cd = meta.chunk_depth
    tasks: list[SlabTask] = []
    stored_ref = stored_depth_of(ref)
    for i, d0, d1 in _ranges(d, stored_ref):
        def write_ref(a: int = d0, b: int = d1) -> None:
            ref[a:b] = reference_slab(a, b).numpy()

        tasks.append(SlabTask(f"reference{i}", write_ref, [(ref, i)]))

    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    row_block_bytes = ROW_BLOCK_BYTES if row_block_bytes is None else row_block_bytes
    op = cone_operator(meta, angles.to(torch.float32))
    num_a, num_u = op.range_shape[1:]
    slab = _grid_step(h * w * 4, slab_bytes, stored_ref)
    stored = stored_depth_of(meas)
    block = _grid_step(num_a * num_u * 4, row_block_bytes, stored)
    block = max(stored, block)  # whole stored objects: each written by one task, once
    objects = _ranges(v, stored)

    def project(first: int, last: int) -> None:
        todo = _missing(meas, list(range(first, last)))
        if not todo:
            return
        # The whole task's rows even when resuming: same pieces, same rounding.
        r0, r1 = first * stored, min(v, last * stored)
        p = torch.zeros(r1 - r0, num_a, num_u, dtype=torch.float32)
        seen = op.slices_seen_by(slice(r0, r1))
        with torch.no_grad():
            for a, b in _pieces(seen.start, seen.stop, slab):
                sub = op.slab(slice(a, b))
                hit = sub.rows_hit_by(slice(0, b - a))
                lo, hi = max(hit.start, r0), min(hit.stop, r1)
                if lo < hi:
                    p[lo - r0 : hi - r0] += sub.rows(slice(lo, hi))(reference_slab(a, b))
        for k0 in range(r0, r1, cd):
            k1 = min(k0 + cd, r1)
            p[k0 - r0 : k1 - r0] = noisy(p[k0 - r0 : k1 - r0], k0 // cd)
        for i in todo:
            a, b = i * stored, min(v, (i + 1) * stored)
            meas[a:b] = p[a - r0 : b - r0].numpy()

    per_task = block // stored
    for t, first in enumerate(range(0, len(objects), per_task)):
        last = min(first + per_task, len(objects))
        tasks.append(
            SlabTask(f"project{t}", (lambda a=first, b=last: project(a, b)),
                     [(meas, i) for i in range(first, last)])
        )
    return tasks


#: FDK's blocks of detector rows are this fraction of :data:`ROW_BLOCK_BYTES`.
_HALVES = 2


class _FilteredBlocks:
    """FDK-filtered blocks of detector rows on the fixed grid ``0, block, 2·block, ...``, the
    last :data:`KEEP` kept for the next slabs (a thin slab's rows are read and filtered by every
    slab that reaches them: 6× the detector at 512³ with 8-slice slabs, without this).

    A block is always filtered whole (weighting and filtering act per row and angle), so the
    rows a slab receives do not depend on which blocks were kept: results and resume are the same
    with or without a hit. Thread-safe; two tasks that miss the same block at once both filter it.
    """

    KEEP = 2
    #: Bytes of measurement rows filtered at once (the FFTs' temporaries are a few times this).
    FILTER_BYTES = 8 << 20

    def __init__(self, scan: Any, op: Any, block: int, filter: str) -> None:
        import threading

        self.scan, self.op, self.block, self.filter = scan, op, block, filter
        self.num_v = op.range_shape[0]
        self.kept: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def _block(self, a: int) -> torch.Tensor:
        from pipeline.classical import fdk_filtered

        with self.lock:
            hit = self.kept.get(a)
            if hit is not None:
                self.kept[a] = self.kept.pop(a)  # most recent last
                return hit
        b = min(self.num_v, a + self.block)
        rows = self.scan.measurements.read_torch(slice(a, b))
        # a few rows at a time: the filter's padded FFTs take several times their input
        step = max(1, self.FILTER_BYTES // max(1, rows[0].numel() * rows.element_size()))
        for r in range(a, b, step):
            e = min(b, r + step)
            rows[r - a : e - a] = fdk_filtered(rows[r - a : e - a], self.op.rows(slice(r, e)),
                                               filter=self.filter)
        with self.lock:
            self.kept[a] = rows
            while len(self.kept) > self.KEEP:
                self.kept.pop(next(iter(self.kept)))
        return rows

    def rows_of(self, pieces: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Filtered rows of each piece ``[r0, r1)`` (each within one block of the grid), the kept
        blocks taken first: slabs run in either direction, and a miss filtered first would
        evict a block the same call needs.

        Shape:
            ``(r1 − r0, A, U)`` each.
        """
        starts = []
        for r0, r1 in pieces:
            a = r0 // self.block * self.block
            if r1 > a + self.block:
                raise ValueError(f"rows [{r0}, {r1}) cross the row grid of {self.block}")
            starts.append(a)
        with self.lock:
            order = sorted(range(len(pieces)), key=lambda i: starts[i] not in self.kept)
        blocks = {i: self._block(starts[i]) for i in order}
        return [blocks[i][r0 - starts[i] : r1 - starts[i]] for i, (r0, r1) in enumerate(pieces)]


def fdk_tasks(
    scan: Any,
    arrays: dict[str, zarr.Array],
    config: Any,
    *,
    slab_bytes: int | None = None,
    row_block_bytes: int | None = None,
) -> list[SlabTask]:
    """Tasks computing FDK (``fbp``) and Noise2Inverse subsets (``n2i``) of a cone scan, one
    slab of the volume per task (see the module docstring).

    ``slab_bytes`` and ``row_block_bytes`` default to :data:`SLAB_BYTES` and
    :data:`ROW_BLOCK_BYTES`.

    Shape:
        ``fbp (D, H, W)``; ``n2i (K, D, H, W)``; measurements ``(V, A, U)`` read by blocks of
        rows.
    """
    from pipeline.classical import fdk_backproject

    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    row_block_bytes = ROW_BLOCK_BYTES if row_block_bytes is None else row_block_bytes
    d, h, w = scan.metadata.volume_shape
    stored = min(stored_depth_of(arr) for arr in arrays.values())
    op = scan.full_operator()
    num_v, num_a, num_u = op.range_shape
    rows_stored = scan.measurements.array.chunks[0]
    # blocks of half the budget: the two kept (_FilteredBlocks.KEEP), or the two backprojected
    # together, hold one budget
    block = max(1, _grid_step(num_a * num_u * 4, row_block_bytes // _HALVES, rows_stored))
    per_slab = 4 * (1 + (config.n2i_splits if "n2i" in arrays else 0))
    slab = max(stored, _grid_step(h * w * per_slab, slab_bytes, stored))
    k = config.n2i_splits
    filtered = _FilteredBlocks(scan, op, block, config.filter)

    def work(first: int, last: int) -> None:
        todo = {name: _missing(arr, list(range(first, last))) for name, arr in arrays.items()}
        every = sorted({i for missing in todo.values() for i in missing})
        if not every:
            return
        d0, d1 = first * stored, min(d, last * stored)  # the whole task's, as for projections
        sub = op.slab(slice(d0, d1))
        hit = sub.rows_hit_by(slice(0, d1 - d0))
        rec = torch.zeros(d1 - d0, h, w) if todo.get("fbp") else None
        subsets = torch.zeros(k, d1 - d0, h, w) if todo.get("n2i") else None
        pieces = _pieces(hit.start, hit.stop, block)
        # Two half-blocks backprojected at a time (one row budget): each call visits every
        # (voxel column, angle) pair of the slab, so a thin slab pays per call, not per row.
        group = _HALVES
        with torch.no_grad():
            for g in range(0, len(pieces), group):
                r0, r1 = pieces[g][0], pieces[min(len(pieces), g + group) - 1][1]
                # Only the slices of the slab that these rows reach get a contribution.
                seen = sub.rows(slice(r0, r1)).slices_seen_by(slice(0, r1 - r0))
                if seen.start == seen.stop:
                    continue
                part = sub.slab(seen).rows(slice(r0, r1))
                # Weighting and filtering act per row and angle: once for all angle subsets, and
                # once for the neighbouring slabs that reach the same block of the row grid.
                qs = filtered.rows_of(pieces[g : g + group])
                q = qs[0] if len(qs) == 1 else torch.cat(qs)
                del qs
                if rec is not None:
                    rec[seen] += fdk_backproject(q, part)
                if subsets is not None:
                    for j in range(k):
                        q_j = q[:, j::k].contiguous()
                        subsets[j, seen] += fdk_backproject(q_j, part.subset(slice(j, None, k)))
        for name, out in (("fbp", rec), ("n2i", subsets)):
            for i in todo.get(name, ()):
                a, b = i * stored, min(d, (i + 1) * stored)
                arrays[name][..., a:b, :, :] = out[..., a - d0 : b - d0, :, :].numpy()

    tasks = []
    num_objects = -(-d // stored)
    per_task = slab // stored
    # zero-padded: dask runs independent tasks by their names, so neighbouring slabs (which
    # share kept row blocks) run one after the other
    digits = len(str(max(0, -(-num_objects // per_task) - 1)))
    for t, first in enumerate(range(0, num_objects, per_task)):
        last = min(first + per_task, num_objects)
        tasks.append(
            SlabTask(f"fdk{t:0{digits}d}", (lambda a=first, b=last: work(a, b)),
                     [(arr, i) for arr in arrays.values() for i in range(first, last)])
        )
    return tasks
