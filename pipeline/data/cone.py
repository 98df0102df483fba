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

Memory per worker: one slab, one block of rows and the projector's temporaries (its tables
for one chunk of angles, about a slice's worth), whatever the depth of the volume. Work: a
row whose rays cross ``k`` slabs is traced ``k`` times (each time over its whole in-plane
path), and a block of rows is read and filtered once per FDK slab that reaches it, so the cost
over a whole-volume computation grows with the cone's spread (a row's rays cross more slices
the further it is from the central plane) relative to the slab thickness. Measured with
``benchmarks/cone_memory.py`` (512³, 24 angles, default distances, 1 thread, CPU seconds against
the whole-volume job of the same run, 2026-12-05): simulation 0.94×, 1.02× and 1.15× with 128
(the default), 32 and 8 MiB slabs (128, 32 and 8 slices), FDK 1.07×, 1.13× and 1.72×; peak
memory 1.87, 0.86 and 0.67 (simulation) and 1.01, 0.61 and 0.48 (FDK) of the volume's size
against 5.0 and 3.5 for the whole-volume jobs (the volume here is only 4 default slabs).
Larger :data:`SLAB_BYTES` trade memory for time.

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
    from pipeline.classical import fdk_backproject, fdk_filtered

    slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
    row_block_bytes = ROW_BLOCK_BYTES if row_block_bytes is None else row_block_bytes
    d, h, w = scan.metadata.volume_shape
    stored = min(stored_depth_of(arr) for arr in arrays.values())
    op = scan.full_operator()
    num_v, num_a, num_u = op.range_shape
    rows_stored = scan.measurements.array.chunks[0]
    block = max(1, _grid_step(num_a * num_u * 4, row_block_bytes, rows_stored))
    per_slab = 4 * (1 + (config.n2i_splits if "n2i" in arrays else 0))
    slab = max(stored, _grid_step(h * w * per_slab, slab_bytes, stored))
    k = config.n2i_splits

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
        with torch.no_grad():
            for r0, r1 in _pieces(hit.start, hit.stop, block):
                # Only the slices of the slab that these rows reach get a contribution.
                seen = sub.rows(slice(r0, r1)).slices_seen_by(slice(0, r1 - r0))
                if seen.start == seen.stop:
                    continue
                part = sub.slab(seen).rows(slice(r0, r1))
                # Weighting and filtering act per row and angle: once for all angle subsets.
                q = fdk_filtered(scan.measurements.read_torch(slice(r0, r1)), part, filter=config.filter)
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
    for t, first in enumerate(range(0, num_objects, per_task)):
        last = min(first + per_task, num_objects)
        tasks.append(
            SlabTask(f"fdk{t}", (lambda a=first, b=last: work(a, b)),
                     [(arr, i) for arr in arrays.values() for i in range(first, last)])
        )
    return tasks
