"""The CT operators of a scan, imported lazily from :mod:`operators3d.ct`.

Kept apart so that MRI-only use never imports the CT code, and so that every place that turns
scan metadata into a CT operator does it the same way. Reconstructions with them (FBP, FDK) are
:mod:`pipeline.classical`.
"""

from __future__ import annotations

import torch

from .format import CTGeometry, ScanError, ScanMetadata

__all__ = ["ct_operator", "cone_operator"]


def _geometry(meta: ScanMetadata) -> CTGeometry:
    geom = meta.geometry
    if not isinstance(geom, CTGeometry):
        raise ScanError(f"a CT operator needs a CT scan, got modality {meta.modality!r}")
    return geom


def ct_operator(meta: ScanMetadata, angles: torch.Tensor, *, volume_depth: int | None = None):
    """The whole-scan (or ``volume_depth``-slab) projector of a CT scan.

    Shape:
        parallel beam ``(D, H, W) → (D, A, U)``; cone beam ``(D, H, W) → (V, A, U)``.
    """
    geom = _geometry(meta)
    d, h, w = meta.volume_shape
    if volume_depth is not None:
        d = int(volume_depth)
    if geom.kind == "parallel":
        from operators3d.ct import ParallelBeamCT

        return ParallelBeamCT(
            volume_shape=(d, h, w),
            angles=angles,
            det_count=int(geom.det_shape[1]),
            voxel_size=geom.voxel_size,
            det_spacing=geom.det_spacing,
            allow_truncation=geom.allow_truncation,
        )
    return cone_operator(meta, angles)


def cone_operator(meta: ScanMetadata, angles: torch.Tensor):
    """The cone-beam projector of a scan (``operators3d.ct.ConeBeamCT``)."""
    geom = _geometry(meta)
    try:
        from operators3d.ct import ConeBeamCT
    except ImportError as err:
        raise ScanError(
            f"cone-beam CT needs operators3d.ct.ConeBeamCT, which this installation lacks ({err})"
        ) from None
    return ConeBeamCT(
        volume_shape=tuple(meta.volume_shape),
        angles=angles,
        src_dist=geom.src_dist,
        det_dist=geom.det_dist,
        det_shape=tuple(geom.det_shape),
        det_spacing=geom.det_spacing,
        voxel_size=geom.voxel_size,
    )
