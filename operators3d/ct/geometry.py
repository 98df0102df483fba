"""CT geometry as immutable objects, made by keyword-only factories.

The picture, in words (DESIGN.md, "CT"). The volume ``(D, H, W)`` sits with its centre on the
rotation axis; ``x`` runs along W, ``y`` along H and ``z`` along D (the rotation axis), voxel
``(d, h, w)`` has its centre at ``x = (w − (W−1)/2)·voxel_size``, ``y = (h − (H−1)/2)·voxel_size``,
``z = (d − (D−1)/2)·voxel_size``. At angle θ (radians) the rays travel along
``d(θ) = (−sin θ, cos θ)`` in the (x, y) plane and the detector's columns run along
``e(θ) = (cos θ, sin θ)``; at θ = 0 the rays go up the H axis and the detector row lies along W.

* **Parallel beam**: detector column ``u`` is the line ``s · e(θ) + t · d(θ)`` with
  ``s = (u − (U−1)/2) · det_spacing``; every D-slice is its own 2D problem.
* **Cone beam** (circular orbit, flat detector): the source sits at ``−src_dist · d(θ)`` (in the
  central plane ``z = 0``), the detector centre at ``+det_dist · d(θ)``, perpendicular to
  ``d(θ)``; pixel ``(v, u)`` is at ``det_dist · d(θ) + s_u · e(θ) + z_v · ẑ`` with
  ``s_u = (u − (U−1)/2) · det_spacing_u`` and ``z_v = (v − (V−1)/2) · det_spacing_v`` measured on
  the detector (magnification ``(src_dist + det_dist) / src_dist`` at the axis). Each ray runs
  from the source to a pixel centre.

Sub-volumes and detector windows (cone beam): a volume may sit off-centre along D by
``d_offset`` voxels, so that voxel ``d`` is at ``z = (d − (D−1)/2 + d_offset) · voxel_size``, and
a detector may be a window of a larger one, shifted by ``row_offset`` rows: ``z_v = (v − (V−1)/2
+ row_offset) · det_spacing_v``. :meth:`VolumeGeometry.slab` and :meth:`ConeGeometry.rows` set
these offsets so that the slab or window sits exactly where it sits in the whole (the offsets
are half-integers then, and every coordinate is computed without rounding). Both default to 0,
the centred picture above.

Geometry objects are frozen: :meth:`VolumeGeometry.slab`, :meth:`ConeGeometry.rows` and
``subset`` return new ones (tomosipo-style slicing into sub-volumes, detector windows and angle
subsets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "VolumeGeometry",
    "ParallelGeometry",
    "ConeGeometry",
    "volume",
    "parallel_beam",
    "cone_beam",
]


def _positive(value, what: str, owner: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}") from err
    if not math.isfinite(out) or out <= 0:
        raise ValueError(f"{owner}: {what} must be positive and finite, got {value!r}")
    return out


def _pair(value, what: str, owner: str) -> tuple[float, float]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {what} must be a number or (rows, columns), got {value!r}")
        return _positive(value[0], what, owner), _positive(value[1], what, owner)
    v = _positive(value, what, owner)
    return v, v


def _angles(angles, owner: str) -> torch.Tensor:
    """A float64 CPU copy of ``angles`` (1-D, finite, at least one)."""
    if not isinstance(angles, torch.Tensor):
        try:
            angles = torch.as_tensor(angles, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"{owner}: angles must be a 1-D tensor of radians, got {type(angles).__name__}"
            ) from err
    if angles.ndim != 1:
        raise ValueError(
            f"{owner}: angles must be 1-D (radians), got shape {tuple(angles.shape)}"
        )
    if angles.numel() == 0:
        raise ValueError(f"{owner}: angles must hold at least one angle, got none")
    if angles.is_complex() or angles.dtype == torch.bool:
        raise TypeError(f"{owner}: angles must be real (radians), got dtype {angles.dtype}")
    out = angles.detach().to("cpu", torch.float64).clone()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{owner}: angles must be finite")
    return out


def _shape3(shape, owner: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"{owner}: volume_shape must be (D, H, W), got {shape!r}") from err
    if len(out) != 3 or any(s <= 0 for s in out):
        raise ValueError(f"{owner}: volume_shape must be (D, H, W) positive, got {out}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeGeometry:
    """A ``(D, H, W)`` voxel grid centred on the rotation axis (in-plane), ``d_offset`` voxels
    along D from the source plane.

    Voxel ``(d, h, w)`` has its centre at ``((w − (W−1)/2), (h − (H−1)/2), (d − (D−1)/2 +
    d_offset)) · voxel_size`` in ``(x, y, z)``; ``z`` is the rotation axis. ``d_offset = 0``
    (the default) centres the volume on the source plane; :meth:`slab` sets it.
    """

    shape: tuple[int, int, int]
    voxel_size: float = 1.0
    d_offset: float = 0.0

    def slab(self, d_slice: slice) -> "VolumeGeometry":
        """The sub-volume of the D-slab ``d_slice`` (contiguous), where it sits in this one.

        Its ``d_offset`` is ``self.d_offset + start + (thickness − D)/2``, so voxel ``i`` of the
        slab lies exactly at voxel ``start + i`` of this volume.
        """
        start, stop = _slab_bounds(d_slice, self.shape[0], "VolumeGeometry.slab")
        offset = self.d_offset + start + ((stop - start) - self.shape[0]) / 2
        return VolumeGeometry((stop - start,) + self.shape[1:], self.voxel_size, offset)

    @property
    def d_axis(self) -> float:
        """The (fractional) D index of the source plane ``z = 0``: ``(D − 1)/2 − d_offset``."""
        return (self.shape[0] - 1) / 2 - self.d_offset

    def z_coords(self, *, device=None) -> torch.Tensor:
        """Heights ``z`` of the D-slices' centres, float64 ``(D,)`` (physical units)."""
        index = torch.arange(self.shape[0], device=device, dtype=torch.float64)
        return (index - self.d_axis) * self.voxel_size

    @property
    def centre(self) -> tuple[float, float, float]:
        """Index of the grid centre along (D, H, W): ``(N − 1) / 2``."""
        return tuple((n - 1) / 2 for n in self.shape)  # type: ignore[return-value]

    @property
    def radius(self) -> float:
        """Radius of the cylinder (about the axis) that holds every voxel, physical units."""
        _, h, w = self.shape
        return 0.5 * math.hypot(h, w) * self.voxel_size


def _slab_bounds(d_slice: slice, depth: int, owner: str) -> tuple[int, int]:
    if not isinstance(d_slice, slice) or d_slice.step not in (None, 1):
        raise ValueError(f"{owner}: expected a contiguous slice, got {d_slice!r}")
    start, stop, _ = d_slice.indices(depth)
    if stop <= start:
        raise ValueError(f"{owner}: empty slab {d_slice!r} of D={depth}")
    return start, stop


def _finite(value, what: str, owner: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{owner}: {what} must be a number, got {value!r}") from err
    if not math.isfinite(out):
        raise ValueError(f"{owner}: {what} must be finite, got {value!r}")
    return out


def volume(
    *, shape: Sequence[int], voxel_size: float = 1.0, d_offset: float = 0.0
) -> VolumeGeometry:
    """A volume geometry: ``shape=(D, H, W)``, isotropic ``voxel_size`` (physical units),
    centred ``d_offset`` voxels along D from the source plane (cone beam; default 0)."""
    return VolumeGeometry(
        _shape3(shape, "volume"), _positive(voxel_size, "voxel_size", "volume"),
        _finite(d_offset, "d_offset", "volume"),
    )


@dataclass(frozen=True, eq=False)
class ParallelGeometry:
    """Parallel-beam projection geometry: angles and a detector row of ``det_count`` columns.

    Column ``u`` measures ``p(θ, s) = ∫ f(s cos θ − t sin θ, s sin θ + t cos θ) dt`` at
    ``s = (u − (U−1)/2) · det_spacing``; the rays run along ``d(θ) = (−sin θ, cos θ)``.
    """

    angles: torch.Tensor = field(repr=False)  # float64, CPU, (A,)
    det_count: int
    det_spacing: float = 1.0

    @property
    def num_angles(self) -> int:
        return int(self.angles.numel())

    def subset(self, index) -> "ParallelGeometry":
        """The same detector at a subset of the angles (a slice, an index list or a mask)."""
        return ParallelGeometry(_subset(self.angles, index), self.det_count, self.det_spacing)

    def __repr__(self) -> str:
        return (
            f"ParallelGeometry(num_angles={self.num_angles}, det_count={self.det_count}, "
            f"det_spacing={self.det_spacing})"
        )


def _subset(angles: torch.Tensor, index) -> torch.Tensor:
    out = angles[index] if not isinstance(index, torch.Tensor) else angles[index.cpu()]
    out = out.reshape(-1)
    if out.numel() == 0:
        raise ValueError(f"subset: the angle index {index!r} selects no angle")
    return out.clone()


def parallel_beam(
    *, angles, det_count: int, det_spacing: float = 1.0
) -> ParallelGeometry:
    """A parallel-beam geometry: ``angles`` (radians, 1-D), ``det_count`` columns of pitch
    ``det_spacing``."""
    owner = "parallel_beam"
    count = int(det_count)
    if count <= 0:
        raise ValueError(f"{owner}: det_count must be positive, got {det_count!r}")
    return ParallelGeometry(
        _angles(angles, owner), count, _positive(det_spacing, "det_spacing", owner)
    )


@dataclass(frozen=True, eq=False)
class ConeGeometry:
    """Circular-orbit cone-beam geometry with a flat detector of ``det_shape = (V, U)`` pixels.

    Source at ``−src_dist · d(θ)``, detector centre at ``+det_dist · d(θ)``, pixel ``(v, u)`` at
    ``det_dist · d(θ) + s_u e(θ) + z_v ẑ`` with ``z_v = (v − (V−1)/2 + row_offset) · dv``;
    ``det_spacing = (rows, columns)`` is the physical pitch on the detector. ``row_offset = 0``
    (the default) centres the detector on the source plane; :meth:`rows` sets it for a window
    of rows of a larger detector.
    """

    angles: torch.Tensor = field(repr=False)
    src_dist: float
    det_dist: float
    det_shape: tuple[int, int]
    det_spacing: tuple[float, float] = (1.0, 1.0)
    row_offset: float = 0.0

    @property
    def num_angles(self) -> int:
        return int(self.angles.numel())

    @property
    def magnification(self) -> float:
        """``(src_dist + det_dist) / src_dist``: detector size of an object at the axis."""
        return (self.src_dist + self.det_dist) / self.src_dist

    def subset(self, index) -> "ConeGeometry":
        """The same orbit and detector at a subset of the angles."""
        return ConeGeometry(
            _subset(self.angles, index), self.src_dist, self.det_dist, self.det_shape,
            self.det_spacing, self.row_offset,
        )

    def rows(self, v_slice: slice) -> "ConeGeometry":
        """The window of detector rows ``v_slice`` (contiguous), where it sits on this detector.

        Its ``row_offset`` is ``self.row_offset + start + (rows − V)/2``, so row ``j`` of the
        window is exactly row ``start + j`` of this detector.
        """
        num_v, num_u = self.det_shape
        start, stop = _slab_bounds(v_slice, num_v, "ConeGeometry.rows")
        offset = self.row_offset + start + ((stop - start) - num_v) / 2
        return ConeGeometry(
            self.angles, self.src_dist, self.det_dist, (stop - start, num_u), self.det_spacing,
            offset,
        )

    @property
    def row_axis(self) -> float:
        """The (fractional) row index of the source plane ``z = 0``: ``(V − 1)/2 − row_offset``."""
        return (self.det_shape[0] - 1) / 2 - self.row_offset

    def row_heights(self, *, device=None) -> torch.Tensor:
        """Heights ``z_v`` of the detector rows' centres, float64 ``(V,)`` (physical units)."""
        index = torch.arange(self.det_shape[0], device=device, dtype=torch.float64)
        return (index - self.row_axis) * self.det_spacing[0]

    def __repr__(self) -> str:
        offset = f", row_offset={self.row_offset}" if self.row_offset else ""
        return (
            f"ConeGeometry(num_angles={self.num_angles}, src_dist={self.src_dist}, "
            f"det_dist={self.det_dist}, det_shape={self.det_shape}, "
            f"det_spacing={self.det_spacing}{offset})"
        )


def cone_beam(
    *,
    angles,
    src_dist: float,
    det_dist: float,
    det_shape: Sequence[int],
    det_spacing: float | Sequence[float] = 1.0,
    row_offset: float = 0.0,
) -> ConeGeometry:
    """A circular cone-beam geometry; ``det_spacing`` is a number or ``(rows, columns)``;
    ``row_offset`` shifts the detector's rows along D (a window of a larger detector)."""
    owner = "cone_beam"
    try:
        shape = tuple(int(s) for s in det_shape)
    except TypeError as err:
        raise TypeError(f"{owner}: det_shape must be (V, U), got {det_shape!r}") from err
    if len(shape) != 2 or any(s <= 0 for s in shape):
        raise ValueError(f"{owner}: det_shape must be (V, U) positive, got {det_shape!r}")
    return ConeGeometry(
        _angles(angles, owner),
        _positive(src_dist, "src_dist", owner),
        _positive(det_dist, "det_dist", owner),
        shape,  # type: ignore[arg-type]
        _pair(det_spacing, "det_spacing", owner),
        _finite(row_offset, "row_offset", owner),
    )
