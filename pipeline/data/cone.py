"""Cone-beam CT jobs: simulation and FDK, exact, with memory bounded by the volume.

A cone-beam ray crosses many D-slices, so a D-slab of the volume has no exact operator of its
own, and a block of detector rows sees a D-range of the volume that widens with the cone
angle. ``operators3d.ct.ConeBeamCT`` describes a volume centred on the source plane and a
centred detector, with no sub-volume or detector-window offsets, so these jobs project and
reconstruct the whole volume at once: exact, with memory of about the volume plus the
sinogram (float32) — not bounded by a slab as parallel beam and MRI are. Everything around it
stays chunked: the reference is written slab by slab, the noise is drawn per measurement
chunk (so results do not depend on how the work is split), and the outputs are written chunk
by chunk (a rerun after a kill redoes the projection or FDK and writes the missing chunks).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import zarr

from .format import ScanMetadata, stored_depth_of
from .writer import SlabTask

__all__ = ["cone_simulation_tasks", "fdk_tasks"]


def _ranges(depth: int, step: int) -> list[tuple[int, int, int]]:
    return [(i, d0, min(d0 + step, depth)) for i, d0 in enumerate(range(0, depth, step))]


def cone_simulation_tasks(
    meta: ScanMetadata,
    angles: torch.Tensor,
    meas: zarr.Array,
    ref: zarr.Array,
    reference_slab: Callable[[int, int], torch.Tensor],
    noisy: Callable[[torch.Tensor, int], torch.Tensor],
) -> list[SlabTask]:
    """Tasks that write ``reference`` slab by slab and the cone-beam ``measurements``.

    ``noisy(p, k)`` applies the noise of measurement chunk ``k`` to its rows ``p``.

    Shape:
        ``reference (D, H, W)``; ``measurements (V, A, U)``.
    """
    from .ct_ops import cone_operator

    d = meta.volume_shape[0]
    v = meta.measurement_depth
    cd = meta.chunk_depth
    tasks: list[SlabTask] = []
    for i, d0, d1 in _ranges(d, stored_depth_of(ref)):
        def write_ref(a: int = d0, b: int = d1) -> None:
            ref[a:b] = reference_slab(a, b).numpy()

        tasks.append(SlabTask(f"reference{i}", write_ref, [(ref, i)]))

    stored = stored_depth_of(meas)
    objects = _ranges(v, stored)

    def project() -> None:
        op = cone_operator(meta, angles.to(torch.float32))
        with torch.no_grad():
            p = op(reference_slab(0, d))
        for k0 in range(0, v, cd):
            k1 = min(k0 + cd, v)
            p[k0:k1] = noisy(p[k0:k1], k0 // cd)
        for _, r0, r1 in objects:
            meas[r0:r1] = p[r0:r1].numpy()

    tasks.append(SlabTask("project", project, [(meas, i) for i, _, _ in objects]))
    return tasks


def fdk_tasks(scan: Any, arrays: dict[str, zarr.Array], config: Any) -> list[SlabTask]:
    """One task computing FDK (``fbp``) and Noise2Inverse subsets (``n2i``) of a cone scan."""
    from operators3d.ct import fdk

    d = scan.metadata.volume_shape[0]
    outputs = []
    for arr in arrays.values():
        outputs += [(arr, i) for i, _, _ in _ranges(d, stored_depth_of(arr))]

    def work() -> None:
        y = scan.measurements.read_torch()
        op = scan.full_operator()
        with torch.no_grad():
            if "fbp" in arrays:
                arrays["fbp"][...] = fdk(y, op, filter=config.filter).to(torch.float32).numpy()
            if "n2i" in arrays:
                k = config.n2i_splits
                for j in range(k):
                    sub = fdk(y[:, j::k].contiguous(), op.subset(slice(j, None, k)), filter=config.filter)
                    arrays["n2i"][j] = sub.to(torch.float32).numpy()

    return [SlabTask("fdk", work, outputs)]
