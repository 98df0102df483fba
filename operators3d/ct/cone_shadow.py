"""Where a cone-beam volume's shadow falls: detector size, ray columns, rows and slices reached.

Diverging rays spread a volume over more detector than its own size, and a D-slab over more
rows than its own thickness. These functions bound that spread from the geometry alone
(:class:`~operators3d.ct.ConeBeamCT` uses them to check its detector, to skip detector columns
no ray through the volume reaches, and for :meth:`~operators3d.ct.ConeBeamCT.rows_hit_by` /
:meth:`~operators3d.ct.ConeBeamCT.slices_seen_by`); :func:`min_det_shape` is the smallest
detector that sees a whole volume.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .geometry import (
    ConeGeometry,
    VolumeGeometry,
    _angles,
    _pair,
    _positive,
    _shape3,
)

__all__ = ["min_det_shape"]


def _shadow(vol: VolumeGeometry, geom: ConeGeometry) -> tuple[float, float]:
    """Physical (height, width) on the detector of the volume's shadow over all angles."""
    num_d, num_h, num_w = vol.shape
    vs = vol.voxel_size
    src, det = geom.src_dist, geom.det_dist
    theta = geom.angles
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    half_w, half_h = num_w * vs / 2, num_h * vs / 2
    cx = torch.tensor([-half_w, half_w, -half_w, half_w], dtype=torch.float64)
    cy = torch.tensor([-half_h, -half_h, half_h, half_h], dtype=torch.float64)
    along_e = cx * cos + cy * sin  # corner coordinates along the detector columns
    along_d = -cx * sin + cy * cos  # ... and along the central ray
    scale = (src + det) / (src + along_d)
    # The box projects to the hull of its corners' shadows (a perspective map of a convex set).
    return float(scale.max()) * num_d * vs, float((along_e * scale).abs().max()) * 2


def _column_ranges(vol: VolumeGeometry, geom: ConeGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Per angle, the detector columns ``[lo, hi)`` whose rays can meet the volume.

    The box is grown by one voxel on each side (Joseph's interpolation reaches half a voxel
    past the outer voxel centres' box), so every skipped ray has only zero weights.
    """
    _, num_h, num_w = vol.shape
    vs = vol.voxel_size
    src, det = geom.src_dist, geom.det_dist
    num_u = geom.det_shape[1]
    du = geom.det_spacing[1]
    cos, sin = torch.cos(geom.angles)[:, None], torch.sin(geom.angles)[:, None]
    half_w, half_h = num_w * vs / 2 + vs, num_h * vs / 2 + vs
    cx = torch.tensor([-half_w, half_w, -half_w, half_w], dtype=torch.float64)
    cy = torch.tensor([-half_h, -half_h, half_h, half_h], dtype=torch.float64)
    along_e = cx * cos + cy * sin
    along_d = (-cx * sin + cy * cos).clamp_max(src * (1 - 1e-9))  # corners behind the source
    s = (src + det) * along_e / (src + along_d) / du + (num_u - 1) / 2
    lo = torch.where(along_d.max(1).values >= src * (1 - 1e-9), 0.0, s.min(1).values - 1)
    hi = torch.where(along_d.max(1).values >= src * (1 - 1e-9), float(num_u), s.max(1).values + 2)
    lo = torch.floor(lo).clamp(0, num_u).to(torch.int64)
    hi = torch.ceil(hi).clamp(0, num_u).to(torch.int64)
    return lo, hi


def min_det_shape(
    *,
    volume_shape: Sequence[int],
    angles,
    src_dist: float,
    det_dist: float,
    det_spacing: float | Sequence[float] = 1.0,
    voxel_size: float = 1.0,
) -> tuple[int, int]:
    """The smallest flat detector ``(V, U)`` that sees the whole volume at every angle."""
    name = "min_det_shape"
    vol = VolumeGeometry(_shape3(volume_shape, name), _positive(voxel_size, "voxel_size", name))
    geom = ConeGeometry(
        _angles(angles, name), _positive(src_dist, "src_dist", name),
        _positive(det_dist, "det_dist", name), (1, 1), _pair(det_spacing, "det_spacing", name),
    )
    need_v, need_u = _shadow(vol, geom)
    dv, du = geom.det_spacing
    return math.ceil(need_v / dv - 1e-9), math.ceil(need_u / du - 1e-9)


def _distance_range(vol: VolumeGeometry, geom: ConeGeometry, grow: float) -> tuple[float, float]:
    """Over all angles, the least and greatest distance ``L`` from the source, along the central
    ray, of a point of the in-plane box of the volume grown by ``grow`` on each side."""
    _, num_h, num_w = vol.shape
    vs = vol.voxel_size
    half_w, half_h = num_w * vs / 2 + grow, num_h * vs / 2 + grow
    cos, sin = torch.cos(geom.angles)[:, None], torch.sin(geom.angles)[:, None]
    cx = torch.tensor([-half_w, half_w, -half_w, half_w], dtype=torch.float64)
    cy = torch.tensor([-half_h, -half_h, half_h, half_h], dtype=torch.float64)
    along_d = -cx * sin + cy * cos
    return geom.src_dist + float(along_d.min()), geom.src_dist + float(along_d.max())


def _heights_through(
    lo: float, hi: float, near: float, far: float, scale: float
) -> tuple[float, float]:
    """The range of ``z · scale / L`` for ``z`` in ``[lo, hi]`` and ``L`` in ``[near, far]``
    (``0 < near ≤ far``): heights carried along rays from the source between two distances."""
    return min(lo * scale / near, lo * scale / far), max(hi * scale / near, hi * scale / far)


def _vertical_shadow(vol: VolumeGeometry, geom: ConeGeometry) -> tuple[float, float]:
    """Detector heights ``(lowest, highest)`` of the volume's shadow over all angles."""
    vs = vol.voxel_size
    near, far = _distance_range(vol, geom, 0.0)
    bottom = (-vol.d_axis - 0.5) * vs
    top = (vol.shape[0] - 0.5 - vol.d_axis) * vs
    return _heights_through(bottom, top, near, far, geom.src_dist + geom.det_dist)


def _rows_hit(vol: VolumeGeometry, geom: ConeGeometry, start: int, stop: int) -> tuple[int, int]:
    """Rows ``[v0, v1)`` of ``geom``'s detector that rays through the slices ``[start, stop)``
    of ``vol`` can reach (conservative; ``v0 == v1`` when none).

    Joseph's interpolation reaches less than one slice pitch past the slab's outer slice
    centres along D and less than half a voxel past the in-plane box (its samples lie on the
    voxel-centre planes, with weight across them only within one voxel of a centre), and a
    ray's height grows linearly with the distance from the source (in-plane), so the rows lie
    between the extreme magnifications of that support; one more row on each side absorbs the
    rounding of the kernels' positions.
    """
    num_v = geom.det_shape[0]
    vs = vol.voxel_size
    near, far = _distance_range(vol, geom, vs / 2)
    if near <= geom.src_dist * 1e-9:  # the grown box reaches the source: every row
        return 0, num_v
    lo, hi = _heights_through(
        (start - 1 - vol.d_axis) * vs, (stop - vol.d_axis) * vs, near, far,
        geom.src_dist + geom.det_dist,
    )
    dv = geom.det_spacing[0]
    v0 = math.floor(lo / dv + geom.row_axis) - 1
    v1 = math.floor(hi / dv + geom.row_axis) + 2
    v0, v1 = min(max(v0, 0), num_v), min(max(v1, 0), num_v)
    return v0, max(v0, v1)


def _slices_seen(vol: VolumeGeometry, geom: ConeGeometry, start: int, stop: int) -> tuple[int, int]:
    """Slices ``[d0, d1)`` of ``vol`` that rays to the rows ``[start, stop)`` of ``geom``'s
    detector can cross with a nonzero weight (conservative; ``d0 == d1`` when none)."""
    num_d = vol.shape[0]
    vs = vol.voxel_size
    near, far = _distance_range(vol, geom, vs / 2)  # the support, as in _rows_hit
    if near <= geom.src_dist * 1e-9:
        return 0, num_d
    dv = geom.det_spacing[0]
    big = geom.src_dist + geom.det_dist
    # Heights in the volume along those rays: z = z_v · L / (src + det), L in [near, far].
    low, high = (start - geom.row_axis) * dv, (stop - 1 - geom.row_axis) * dv
    lo = min(low * near, low * far) / big
    hi = max(high * near, high * far) / big
    # Slice d has weight where |z / vs − (d − d_axis)| < 1; one more slice of margin each side.
    d0 = math.floor(lo / vs + vol.d_axis) - 1
    d1 = math.ceil(hi / vs + vol.d_axis + 1) + 1
    d0, d1 = min(max(d0, 0), num_d), min(max(d1, 0), num_d)
    return d0, max(d0, d1)


def _check_cone(vol: VolumeGeometry, geom: ConeGeometry, allow_truncation: bool) -> None:
    name = "ConeBeamCT"
    num_d, num_h, num_w = vol.shape
    vs = vol.voxel_size
    src = geom.src_dist
    radius = vol.radius
    if src <= radius:
        raise ValueError(
            f"{name}: the source must lie outside the volume: src_dist={src:g} but the volume "
            f"(H, W) = ({num_h}, {num_w}) × voxel_size={vs:g} reaches {radius:.4g} from the axis"
        )
    if allow_truncation:
        return
    need_v, need_u = _shadow(vol, geom)
    num_v, num_u = geom.det_shape
    dv, du = geom.det_spacing
    # Half a pixel of slack: an overhang that small only clips a sliver of the edge voxels.
    if vol.d_offset == 0 and geom.row_offset == 0:
        rows_ok = need_v <= (num_v + 0.5) * dv
    else:  # off-centre: the shadow's extent along D against the window's, a quarter each side
        low, high = _vertical_shadow(vol, geom)
        rows_ok = (
            low >= (-geom.row_axis - 0.75) * dv and high <= (num_v - 0.25 - geom.row_axis) * dv
        )
    if need_u > (num_u + 0.5) * du or not rows_ok:
        where = ""
        if vol.d_offset or geom.row_offset:
            where = f" (volume d_offset={vol.d_offset:g}, detector row_offset={geom.row_offset:g})"
        raise ValueError(
            f"{name}: the detector is too small to see the volume: det_shape (V, U) = "
            f"({num_v}, {num_u}) × det_spacing (rows, columns) = ({dv:g}, {du:g}) covers "
            f"{num_v * dv:g} × {num_u * du:g}, but the volume (D, H, W) = {vol.shape} × "
            f"voxel_size={vs:g}{where} casts a shadow up to {need_v:.4g} × {need_u:.4g}; use "
            f"det_shape >= ({math.ceil(need_v / dv - 0.5)}, {math.ceil(need_u / du - 0.5)}) "
            "(see min_det_shape) or allow_truncation=True"
        )
