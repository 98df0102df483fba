"""Computed tomography in pure torch: parallel- and cone-beam projectors, FBP and FDK.

The geometry in words (DESIGN.md, "CT"): a volume ``(B, D, H, W)`` turns about its D axis;
``x`` runs along W and ``y`` along H, both centred at ``(N − 1)/2`` (times ``voxel_size``). At
angle θ (radians) rays travel along ``d(θ) = (−sin θ, cos θ)`` and detector columns run along
``e(θ) = (cos θ, sin θ)``.

* :class:`ParallelBeamCT` — sinogram ``(B, D, A, U)``, column ``u`` at
  ``s = (u − (U−1)/2) · det_spacing``: ``p(θ, s) = ∫ f(s cos θ − t sin θ, s sin θ + t cos θ) dt``.
  D-slices are independent, so :meth:`ParallelBeamCT.slab` is exact.
* :class:`ConeBeamCT` — circular orbit, flat detector ``(V, U)``: source at
  ``−src_dist · d(θ)``, detector centre at ``+det_dist · d(θ)``, pixel pitch measured on the
  detector; tends to :class:`ParallelBeamCT` as ``src_dist → ∞``.
* :func:`fbp`, :func:`fdk` — filtered backprojection and Feldkamp–Davis–Kress.

Both projectors use Joseph's method, matrix-free (index/weight tables built per chunk of
angles and dropped), and their adjoints are exact transposes written as kernels of their own;
CPU and CUDA, float32 and float64, from the same code. Geometry objects (:func:`volume`,
:func:`parallel_beam`, :func:`cone_beam`) are immutable and slice into slabs and angle subsets.

Example::

    import math, torch
    from operators3d.ct import ParallelBeamCT, fbp

    angles = torch.arange(180) * math.pi / 180
    op = ParallelBeamCT(volume_shape=(64, 128, 128), angles=angles)
    y = op(x)                  # (64, 180, 182) sinogram
    x_fbp = fbp(y, op, filter="hann")
    x_back = op.adjoint(y)     # exact transpose; also the backward of op(x)
"""

from .geometry import (
    ConeGeometry,
    ParallelGeometry,
    VolumeGeometry,
    cone_beam,
    parallel_beam,
    volume,
)
from .analytic import FILTERS, fbp, fdk, fdk_filter, filter_rows, ramp_filter
from .cone import ConeBeamCT
from .cone_shadow import min_det_shape
from .parallel import ParallelBeamCT, default_det_count

__all__ = [
    "ParallelBeamCT",
    "ConeBeamCT",
    "min_det_shape",
    "fbp",
    "fdk",
    "fdk_filter",
    "ramp_filter",
    "filter_rows",
    "FILTERS",
    "default_det_count",
    "VolumeGeometry",
    "ParallelGeometry",
    "ConeGeometry",
    "volume",
    "parallel_beam",
    "cone_beam",
]
