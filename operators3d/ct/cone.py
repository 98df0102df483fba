"""Cone-beam CT (circular orbit, flat detector): Joseph's projector and its exact transpose.

The picture in words: the volume ``(D, H, W)`` is centred on the rotation axis D. At angle θ
the source is a point at ``−src_dist · d(θ)`` in the central plane (``d(θ) = (−sin θ, cos θ)``
in the (x, y) = (W, H) plane), and a flat detector of ``(V, U)`` pixels faces it with its
centre at ``+det_dist · d(θ)``: columns run along ``e(θ) = (cos θ, sin θ)``, rows along D,
pixel ``(v, u)`` at ``det_dist · d(θ) + s_u e(θ) + z_v ẑ`` with ``s_u = (u − (U−1)/2) · du``,
``z_v = (v − (V−1)/2) · dv`` (physical pitch on the detector, as in ASTRA's cone geometry; an
object at the axis appears magnified by ``(src_dist + det_dist) / src_dist``). One ray joins
the source to each pixel centre; as ``src_dist → ∞`` the rays become parallel and the operator
tends to :class:`~operators3d.ct.ParallelBeamCT`.

Discretisation (Joseph, in 3D): each ray steps plane by plane along the in-plane image axis
closest to its own direction (rows of H or columns of W; chosen per detector column), takes
the bilinear interpolation across the plane (linear in the other in-plane axis, linear in D,
zero outside the volume) and weighs each step by its length
``voxel_size · |r| / max(|r_x|, |r_y|)`` for ray direction ``r``.

Kernels: all rays of one detector column lie in one plane through the source, so their
in-plane crossing points (and weights) are shared by every detector row: a ray column gathers
the two contiguous D-rows it crosses in each plane once (volume laid out as rows
``(H·W, B, D)``) and interpolates them along D at the rows' heights, which are affine in v.
The tables keep only the (ray column, plane) *pairs* that meet the volume (about two thirds
of ``A·U·S``), sorted by D-slope, and the kernels work on blocks of pairs
(:mod:`~operators3d.ct._cone_kernels`): the forward fetches both D-neighbours of every sample
by 1-D ``index_select`` from the interpolated lines and sums the planes with an
``index_add_`` of whole rows; the adjoint is its exact transpose with the same tables and the
same position arithmetic (1-D ``scatter_add_`` into the lines, ``index_add_`` of the weighted
lines into the D-rows). A block computes only the detector rows its pairs can reach (similar
slopes reach nearly the same rows). Blocks default to ``_kernels.CPU_CONE_BLOCK_BYTES``
(8 MiB) on CPU. On CPU (float32/float64) the same tables go by default to an optional compiled
kernel (:mod:`~operators3d.ct._cone_native`: plain C built on first use, the same
discretisation in one fused pass per pair that visits only the rows each pair reaches, about
2× the torch kernel's speed whole and 5× by thin slabs at one thread, BENCHMARKS.md);
``RECON3D_CONE_KERNEL=torch|c|auto`` chooses, and ``auto`` falls back to the torch kernel,
with one warning, where no C compiler works. The tables of each chunk of angles depend
neither on D nor on the detector rows: they are kept in a process-wide LRU cache
(:mod:`~operators3d.ct._table_cache`, at most ``_kernels.CPU_TABLE_CACHE_BYTES`` = 256 MiB on
CPU, 2 GiB per CUDA device; keyed by in-plane geometry, angles, chunk, dtype and device), so
repeated calls and every slab and row window of the same volume skip rebuilding them; only the
step lengths (per row) are made per call. FDK's voxel-driven backprojector
(``backproject(method="fdk")``) is the same pair structure with voxel columns in place of ray
columns and detector columns in place of D-rows: it runs on the same kernels (compiled on CPU)
and its tables are cached the same way.

Sub-volumes and detector windows: diverging rays cross D-slices, so a D-slab of the volume is
measured by all the rows its shadow covers, and a block of rows sees a D-range of the volume
that widens with the cone angle. :meth:`ConeBeamCT.slab` (a D-slab where it sits in the volume)
and :meth:`ConeBeamCT.rows` (a window of detector rows) give the exact pieces: the projector is
linear, so the projection of the whole volume is the sum over D-slabs of the slabs'
projections, and row ``v`` of a window is row ``v`` of the whole. :meth:`ConeBeamCT.rows_hit_by`
and :meth:`ConeBeamCT.slices_seen_by` say which rows a slab reaches and which slices a window
sees (conservatively), so out-of-core jobs touch only those (``pipeline/data/cone.py``). Slabs
and windows get bitwise the same interpolation weights as the whole (the fraction of the
D-offset is rounded alone, see :func:`~operators3d.ct._kernels.z_tables`), so the pieces add
up to the whole to the rounding of the additions.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from . import _cone_native
from . import _kernels as K
from . import _table_cache
from .cone_shadow import _check_cone, _column_ranges, _rows_hit, _slices_seen
from .geometry import (
    ConeGeometry,
    VolumeGeometry,
    _angles,
    _finite,
    _pair,
    _positive,
    _shape3,
    _slab_bounds,
)
from .projector import CTProjector

__all__ = ["ConeBeamCT"]


class ConeBeamCT(CTProjector):
    """Circular cone-beam CT projector with a flat detector (Joseph's method, 3D).

    Geometry in words: the source circles the D axis at distance ``src_dist`` in the central
    plane, at ``−src_dist · d(θ)`` with ``d(θ) = (−sin θ, cos θ)`` in the (x, y) = (W, H)
    plane; the flat detector faces it across the axis, centred at ``+det_dist · d(θ)``,
    columns along ``(cos θ, sin θ)`` and rows along D, pixel ``(v, u)`` at detector
    coordinates ``((u − (U−1)/2) · du, (v − (V−1)/2) · dv)``. Each measurement is the line
    integral along the ray from the source through a pixel centre (the whole line, so a
    detector placed inside the volume's extent still sees full rays).

    Pieces: ``op.slab(d_slice)`` is the projector of a D-slab where it sits in the volume,
    ``op.rows(v_slice)`` the projector onto a window of detector rows, and
    ``op.rows_hit_by(d_slice)`` / ``op.slices_seen_by(v_slice)`` the rows a slab reaches and
    the slices a window sees; ``A x = Σ_k A.slab(s_k).rows(A.rows_hit_by(s_k))(x[s_k])``
    placed at those rows, for slabs ``s_k`` covering the volume.

    Shape:
        forward ``(*batch, D, H, W) → (*batch, V, A, U)``; adjoint the reverse.

    Math:
        ``p(θ, v, u) = ∫ f(S_θ + t (P_θ(v, u) − S_θ)) |P_θ(v, u) − S_θ| dt``, discretised by
        Joseph's method with bilinear interpolation across each plane; ``Aᴴ = Aᵀ`` exactly.

    Args:
        volume_shape: ``(D, H, W)``.
        angles: 1-D projection angles in radians (a full turn for FDK).
        src_dist: distance from the source to the rotation axis (> the volume's radius).
        det_dist: distance from the rotation axis to the detector plane.
        det_shape: ``(V, U)`` detector rows and columns.
        det_spacing: detector pitch, a number or ``(rows, columns)`` (physical units).
        voxel_size: voxel edge length.
        allow_truncation: accept a detector that does not see the whole volume.
        block_bytes, table_bytes: sizes of the per-block temporaries and per-chunk tables.
        d_offset: the volume's centre sits ``d_offset`` voxels along +D from the source plane
            (voxel ``d`` at ``z = (d − (D−1)/2 + d_offset) · voxel_size``): a slab of a larger
            volume. Default 0; :meth:`slab` sets it.
        row_offset: the detector's rows are shifted by ``row_offset`` rows along +D (row ``v``
            at ``z_v = (v − (V−1)/2 + row_offset) · dv``): a window of a larger detector.
            Default 0; :meth:`rows` sets it.
    """

    kind = "cone"

    def __init__(
        self,
        *,
        volume_shape: Sequence[int],
        angles,
        src_dist: float,
        det_dist: float,
        det_shape: Sequence[int],
        det_spacing: float | Sequence[float] = 1.0,
        voxel_size: float = 1.0,
        allow_truncation: bool = False,
        block_bytes: int | None = None,
        table_bytes: int | None = None,
        d_offset: float = 0.0,
        row_offset: float = 0.0,
    ) -> None:
        name = "ConeBeamCT"
        shape = _shape3(volume_shape, name)
        vs = _positive(voxel_size, "voxel_size", name)
        try:
            dshape = tuple(int(s) for s in det_shape)
        except TypeError as err:
            raise TypeError(f"{name}: det_shape must be (V, U), got {det_shape!r}") from err
        if len(dshape) != 2 or any(s <= 0 for s in dshape):
            raise ValueError(f"{name}: det_shape must be (V, U) positive, got {det_shape!r}")
        geom = ConeGeometry(
            _angles(angles, name),
            _positive(src_dist, "src_dist", name),
            _positive(det_dist, "det_dist", name),
            dshape,  # type: ignore[arg-type]
            _pair(det_spacing, "det_spacing", name),
            _finite(row_offset, "row_offset", name),
        )
        vol = VolumeGeometry(shape, vs, _finite(d_offset, "d_offset", name))
        num_v, num_u = geom.det_shape
        super().__init__(
            vol.shape,
            (num_v, geom.num_angles, num_u),
            domain_complex=False,
            range_complex=False,
        )
        _check_cone(vol, geom, allow_truncation)
        self._setup(vol, geom, angles, allow_truncation, block_bytes, table_bytes)
        self._column_lo, self._column_hi = _column_ranges(vol, geom)
        sig = (shape[1:], vs, geom.det_shape[1], geom.det_spacing[1], geom.src_dist,
               geom.det_dist, hashlib.sha1(geom.angles.numpy().tobytes()).hexdigest())
        self.__dict__["_plane_key"] = sig

    @staticmethod
    def _arguments(vol: VolumeGeometry, geom: ConeGeometry) -> dict:
        """The constructor's arguments that a volume and a :func:`~operators3d.ct.cone_beam`
        geometry stand for (:meth:`from_geometry`)."""
        return dict(
            volume_shape=vol.shape, angles=geom.angles, src_dist=geom.src_dist,
            det_dist=geom.det_dist, det_shape=geom.det_shape, det_spacing=geom.det_spacing,
            voxel_size=vol.voxel_size, d_offset=vol.d_offset, row_offset=geom.row_offset,
        )

    # ------------------------------------------------------------------ structure
    def slab(self, d_slice: slice) -> "ConeBeamCT":
        """The projector of the D-slab ``d_slice`` of the volume, where it sits, onto the same
        detector (use :meth:`rows` with :meth:`rows_hit_by` to keep only the rows it reaches).

        The projector is linear, so for slabs that cover the volume
        ``A x = Σ_k A.slab(s_k)(x[s_k])``; it is exact, not an approximation. Its adjoint is
        the slab ``s_k`` of ``Aᵀ y``.

        Shape:
            ``(*batch, d, H, W) → (*batch, V, A, U)`` with ``d`` the slab thickness.
        """
        start, stop = _slab_bounds(d_slice, self.domain_shape[0], f"{self.name}.slab")
        return self._rebuild(self.volume_geometry.slab(slice(start, stop)), self.geometry)

    def rows(self, v_slice: slice) -> "ConeBeamCT":
        """The projector onto the window ``v_slice`` of detector rows (the same rays).

        Row ``j`` of ``A.rows(v_slice)(x)`` is row ``start + j`` of ``A(x)``; the window may
        cut the volume's shadow, so the operator allows truncation.

        Shape:
            ``(*batch, D, H, W) → (*batch, v, A, U)`` with ``v`` the window's rows.
        """
        start, stop = _slab_bounds(v_slice, self.range_shape[0], f"{self.name}.rows")
        return self._rebuild(self.volume_geometry, self.geometry.rows(slice(start, stop)), True)

    def rows_hit_by(self, d_slice: slice) -> slice:
        """The detector rows that rays through the D-slab ``d_slice`` can reach.

        Conservative: every row outside it has exactly zero weight on the slab's voxels (one
        row of margin each side); an empty slice when the slab's shadow misses the detector.
        Indices are of this operator's volume and detector.
        """
        start, stop = _slab_bounds(d_slice, self.domain_shape[0], f"{self.name}.rows_hit_by")
        v0, v1 = _rows_hit(self.volume_geometry, self.geometry, start, stop)
        return slice(v0, v1)

    def slices_seen_by(self, v_slice: slice) -> slice:
        """The D-slices of the volume that rays to the detector rows ``v_slice`` can cross.

        Conservative: every slice outside it has exactly zero weight in those rows (one slice
        of margin each side); an empty slice when none. Indices are of this operator's volume
        and detector.
        """
        start, stop = _slab_bounds(
            v_slice, self.geometry.det_shape[0], f"{self.name}.slices_seen_by"
        )
        d0, d1 = _slices_seen(self.volume_geometry, self.geometry, start, stop)
        return slice(d0, d1)

    def subset(self, angle_index) -> "ConeBeamCT":
        """The operator restricted to a subset of the angles."""
        return self._rebuild(self.volume_geometry, self.geometry.subset(angle_index))

    def extra_repr(self) -> str:
        g = self.geometry
        offsets = ""
        if self.volume_geometry.d_offset:
            offsets += f", d_offset={self.volume_geometry.d_offset:g}"
        if g.row_offset:
            offsets += f", row_offset={g.row_offset:g}"
        return (
            f"{self.range_shape} ← {self.domain_shape}, src_dist={g.src_dist:g}, "
            f"det_dist={g.det_dist:g}{offsets}"
        )

    # ------------------------------------------------------------------ tables
    def _chunks(self, per_angle_bytes: int, table_bytes: int):
        count = self.num_angles
        size = max(1, min(count, table_bytes // max(1, per_angle_bytes)))
        for a0 in range(0, count, size):
            yield slice(a0, min(count, a0 + size))

    def _columns(self, sl: slice) -> tuple[int, int]:
        """The union over the chunk's angles of the columns whose rays can meet the volume."""
        lo, hi = int(self._column_lo[sl].min()), int(self._column_hi[sl].max())
        return lo, max(lo, hi)

    def _ray_tables(self, sl: slice, u0: int, u1: int, dtype, device):
        """In-plane Joseph tables of the chunk's ray columns (computed in float64).

        Columns ``u0 ≤ u < u1``. Returns, for the ``Q`` (ray column, plane) pairs that meet the
        volume (in increasing ``zslope``), ``row_index, row_weight (Q, 2)``, ``zslope (Q,)``
        (voxel units of D per physical detector height) and ``ray (Q,)`` (the ray column,
        ``angle · Ur + u − u0``); they do not depend on D or the detector rows, so slabs and
        windows share them (:meth:`_tables`).
        """
        _, num_h, num_w = self.domain_shape
        g, vs = self.geometry, self.volume_geometry.voxel_size
        num_u, du = g.det_shape[1], g.det_spacing[1]
        src, big = g.src_dist, g.src_dist + g.det_dist
        f64 = torch.float64
        theta = g.angles[sl].to(device=device, dtype=f64)[:, None, None]
        cos, sin = torch.cos(theta), torch.sin(theta)
        s_u = ((torch.arange(u0, u1, device=device, dtype=f64) - (num_u - 1) / 2) * du)[
            None, :, None
        ]
        r_x = -big * sin + s_u * cos  # (A_c, U, 1) in-plane ray direction (unnormalised)
        r_y = big * cos + s_u * sin
        use_y = r_y.abs() >= r_x.abs()
        num_s = max(num_h, num_w)
        step = torch.arange(num_s, device=device, dtype=f64)[None, None, :]
        cy, cx = (num_h - 1) / 2, (num_w - 1) / 2
        # Primary y: plane h crosses the ray at x; primary x: plane w crosses it at y. Both
        # written so that no large quantity cancels (stable as src_dist → ∞).
        y_h = (step - cy) * vs
        x_at = (s_u * (src + y_h * cos) / big - y_h * sin) / (cos + (s_u / big) * sin)
        tau_y = (y_h + src * cos) / r_y
        x_w = (step - cx) * vs
        y_at = (x_w * cos - s_u * (src - x_w * sin) / big) / (-sin + (s_u / big) * cos)
        tau_x = (x_w - src * sin) / r_x
        pos = torch.where(use_y, x_at / vs + cx, y_at / vs + cy)
        tau = torch.where(use_y, tau_y, tau_x)
        length2 = torch.where(use_y, num_w, num_h)
        in_axis = torch.where(use_y, step < num_h, step < num_w)
        j0 = torch.floor(pos)
        w0 = 1 - (pos - j0)
        w1 = 1 - ((j0 + 1) - pos)
        ok0 = in_axis & (j0 >= 0) & (j0 <= length2 - 1)
        ok1 = in_axis & (j0 >= -1) & (j0 <= length2 - 2)
        j0 = j0.clamp(-1, max(num_h, num_w)).to(torch.int64)
        stride2 = torch.where(use_y, 1, num_w)
        base = torch.where(use_y, step.to(torch.int64) * num_w, step.to(torch.int64))
        row0 = base + j0 * stride2
        zero = num_h * num_w
        row_index = torch.stack(
            (torch.where(ok0, row0, zero), torch.where(ok1, row0 + stride2, zero)), dim=-1
        )
        row_weight = torch.stack((torch.where(ok0, w0, 0), torch.where(ok1, w1, 0)), dim=-1)
        n = theta.shape[0] * (u1 - u0)
        row_index = row_index.reshape(n, num_s, 2)
        # Only the (ray column, plane) pairs that meet the volume, sorted by D-slope so that
        # the pairs of a block reach nearly the same detector rows (_cone_kernels.py; the
        # compiled kernel, which bounds each pair's rows itself, measured no faster with the
        # pairs by angle, plane and column).
        keep = (row_index != zero).any(-1)
        zslope = (tau / vs).expand(theta.shape[0], u1 - u0, num_s).reshape(n, num_s)[keep]
        order = torch.sort(zslope.to(dtype), stable=True).indices
        ray = torch.arange(n, device=device)[:, None].expand(n, num_s)[keep][order]
        return (
            row_index[keep][order].to(K.index_dtype(zero + 1)),
            row_weight.reshape(n, num_s, 2)[keep][order].to(dtype),
            zslope[order].to(dtype),
            ray,
        )

    def _ray_factors(self, sl: slice, u0: int, u1: int, dtype, device):
        """The in-plane parts of the step lengths, per ray column of the chunk (in float64 as
        :meth:`_ray_tables`, then in ``dtype``): ``|r_xy|²`` and
        ``voxel_size / max(|r_x|, |r_y|)``. Like the tables they depend only on the in-plane
        geometry, so slabs and windows share them from the cache (:meth:`_tables`).

        Shape:
            ``in_plane, factor (A_c·Ur, 1)``.
        """
        g = self.geometry
        num_u = g.det_shape[1]
        big = g.src_dist + g.det_dist
        f64 = torch.float64
        theta = g.angles[sl].to(device=device, dtype=f64)[:, None]
        cos, sin = torch.cos(theta), torch.sin(theta)
        s_u = ((torch.arange(u0, u1, device=device, dtype=f64) - (num_u - 1) / 2)
               * g.det_spacing[1])[None, :]
        r_x = -big * sin + s_u * cos
        r_y = big * cos + s_u * sin
        in_plane = (r_x**2 + r_y**2).reshape(-1, 1).to(dtype)
        factor = (self.volume_geometry.voxel_size / torch.maximum(r_x.abs(), r_y.abs()))
        return in_plane, factor.reshape(-1, 1).to(dtype)

    def _step_lengths(self, in_plane: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``(A_c·Ur, 1, V)`` step lengths ``voxel_size · |r| / max(|r_x|, |r_y|)`` of this
        operator's detector rows, from the chunk's :meth:`_ray_factors`: the three passes over
        every ray (``|r|² = |r_xy|² + z_v²``, its root, the factor) in their dtype; a thin
        slab's call makes them for its rows, so they are kept few."""
        num_v = self.geometry.det_shape[0]
        z_v = self.geometry.row_heights(device=in_plane.device)
        step_len = torch.add(in_plane, (z_v**2).to(in_plane.dtype)[None, :]).sqrt_()
        return step_len.mul_(factor).view(-1, 1, num_v)

    def _tables(self, sl: slice, u0: int, u1: int, dtype, device):
        """:meth:`_ray_tables` and :meth:`_ray_factors` from the process-wide cache
        (:mod:`._table_cache`, shared by slabs and windows of the same volume: a thin slab's
        call then pays per chunk only its own rows' step lengths) and this call's
        :meth:`_step_lengths`."""
        key = ("cone", self._plane_key, sl.start, sl.stop, u0, u1, dtype, str(device))
        cached = _table_cache.cached(
            key, key[:2] + key[-2:], device,
            lambda: self._ray_tables(sl, u0, u1, dtype, device)
            + self._ray_factors(sl, u0, u1, dtype, device),
        )
        return cached[:4] + (self._step_lengths(*cached[4:]),)

    def _detector_heights(self, dtype, device) -> torch.Tensor:
        return self.geometry.row_heights(device=device).to(dtype)

    # ------------------------------------------------------------------ kernels
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        num_d, num_h, num_w = self.domain_shape
        num_v, num_u = self.geometry.det_shape
        num_a = self.num_angles
        lead = x.shape[:-3]
        batch = math.prod(lead)
        dtype, device = x.dtype, x.device
        table = self._budgets(device)[1]
        block = K.cone_block_bytes_for(device, self.block_bytes)
        zero = num_h * num_w
        # Rows (H·W, B, D) with zero pads along D (one before, two after) and a zero row.
        xv = torch.zeros(zero + 1, batch, num_d + 3, dtype=dtype, device=device)
        xv[:zero].view(num_h, num_w, batch, num_d + 3)[..., 1 : num_d + 1].copy_(
            x.reshape(batch, num_d, num_h, num_w).permute(2, 3, 0, 1)
        )
        y = torch.zeros(batch, num_v, num_a, num_u, dtype=dtype, device=device)
        zcoord = self._detector_heights(dtype, device)
        zoff = self.volume_geometry.d_axis
        gather = _cone_native.kernels_for(xv)[0]
        per_angle = num_u * max(num_h, num_w) * 80
        for sl in self._chunks(per_angle, table):
            u0, u1 = self._columns(sl)
            if u1 == u0:
                continue
            row_index, row_weight, zslope, ray, step_len = self._tables(sl, u0, u1, dtype, device)
            num_c = sl.stop - sl.start
            rays = torch.zeros(num_c * (u1 - u0), batch, num_v, dtype=dtype, device=device)
            gather(
                xv, row_index, row_weight, zslope, ray, zcoord, zoff, rays, block_bytes=block
            )
            # step lengths applied while moving into place (one pass)
            torch.mul(rays.view(num_c, u1 - u0, batch, num_v).permute(2, 3, 0, 1),
                      step_len.view(num_c, u1 - u0, 1, num_v).permute(2, 3, 0, 1),
                      out=y[:, :, sl, u0:u1])
        return y.view(lead + (num_v, num_a, num_u))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        num_d, num_h, num_w = self.domain_shape
        num_v, num_u = self.geometry.det_shape
        num_a = self.num_angles
        lead = y.shape[:-3]
        batch = math.prod(lead)
        dtype, device = y.dtype, y.device
        table = self._budgets(device)[1]
        block = K.cone_block_bytes_for(device, self.block_bytes)
        zero = num_h * num_w
        acc = torch.zeros(zero + 1, batch, num_d + 3, dtype=dtype, device=device)
        yb = y.reshape(batch, num_v, num_a, num_u)
        zcoord = self._detector_heights(dtype, device)
        zoff = self.volume_geometry.d_axis
        scatter = _cone_native.kernels_for(acc)[1]
        per_angle = num_u * max(num_h, num_w) * 80
        for sl in self._chunks(per_angle, table):
            u0, u1 = self._columns(sl)
            if u1 == u0:
                continue
            row_index, row_weight, zslope, ray, step_len = self._tables(sl, u0, u1, dtype, device)
            num_c = sl.stop - sl.start
            # gathered into ray order and weighted by the step lengths in one pass
            rays = torch.empty(num_c, u1 - u0, batch, num_v, dtype=dtype, device=device)
            torch.mul(yb[:, :, sl, u0:u1].permute(2, 3, 0, 1),
                      step_len.view(num_c, u1 - u0, 1, num_v), out=rays)
            rays = rays.view(num_c * (u1 - u0), batch, num_v)
            scatter(
                rays, row_index, row_weight, zslope, ray, zcoord, zoff, acc, block_bytes=block
            )
        out = acc[:zero].view(num_h, num_w, batch, num_d + 3)[..., 1 : num_d + 1]
        return out.permute(2, 3, 0, 1).reshape(lead + (num_d, num_h, num_w))

    # ------------------------------------------------------------------ FDK backprojection
    def backproject(self, y: torch.Tensor, *, method: str = "matched") -> torch.Tensor:
        """Backproject cone-beam projections.

        ``method="matched"`` is the adjoint ``Aᵀ y`` (exact transpose of the projector).
        ``method="fdk"`` is FDK's voxel-driven, distance-weighted backprojector: each
        projection is bilinearly interpolated where the ray from the source through the voxel
        centre meets the detector and weighted by ``(src_dist / L)²``, ``L = src_dist + r·d(θ)``
        the voxel's distance from the source along the central ray; summed over angles (no
        ``Δθ``). It is not the adjoint, and its result carries no gradient (a fixed
        reconstruction step); it shares the projector's two-stage gather kernel with voxels in
        place of rays.

        Shape:
            ``(*batch, V, A, U) → (*batch, D, H, W)``.

        Math (``fdk``):
            ``b(r) = Σ_θ (src/L_θ(r))² · y_θ(u_θ(r), v_θ(r))``, ``u_θ(r) = M_θ(r) · r·e(θ)``,
            ``v_θ(r) = M_θ(r) · z``, ``M_θ(r) = (src + det) / L_θ(r)``.
        """
        if method == "matched":
            return self.adjoint(y)
        if method != "fdk":
            raise ValueError(
                f"{self.name}.backproject: method must be 'matched' or 'fdk', got {method!r}"
            )
        self.check_input(y, adjoint=True)
        with torch.no_grad():
            return self._fdk_backproject(y)

    def _fdk_tables(self, sl: slice, dtype, device):
        """FDK's voxel-driven tables for the chunk ``sl`` of angles, computed in float64: per
        (voxel column, angle) pair the two detector columns it falls between (padded-row indices,
        the zero row when outside) with their weights times FDK's distance weight, and the
        detector row per unit of height (``zslope``). They depend only on the in-plane geometry,
        the row spacing and the angles, not on D or the detector rows, so the slabs and row
        blocks of an FDK job share them from the process-wide cache (:mod:`._table_cache`), as
        the projector's :meth:`_tables`.

        Shape:
            ``row_index, row_weight (H·W, A_c, 2)``; ``zslope (H·W, A_c)``; ``column (H·W·A_c,)``
            (the voxel column of each pair, column-major over angles, for the compiled kernel;
            empty on other devices).
        """
        num_h, num_w = self.domain_shape[1:]
        num_u = self.geometry.det_shape[1]
        g = self.geometry
        vs = self.volume_geometry.voxel_size
        dv, du = g.det_spacing
        src, big = g.src_dist, g.src_dist + g.det_dist
        zero = self.num_angles * num_u
        f64 = torch.float64
        ys = ((torch.arange(num_h, device=device, dtype=f64) - (num_h - 1) / 2) * vs)
        xs = ((torch.arange(num_w, device=device, dtype=f64) - (num_w - 1) / 2) * vs)
        y_r = ys[:, None, None].expand(num_h, num_w, 1).reshape(-1, 1)
        x_r = xs[None, :, None].expand(num_h, num_w, 1).reshape(-1, 1)
        theta = g.angles[sl].to(device=device, dtype=f64)[None, :]
        cos, sin = torch.cos(theta), torch.sin(theta)
        along_e = x_r * cos + y_r * sin  # (HW, A_c)
        dist = src + (-x_r * sin + y_r * cos)  # L: source to voxel along the central ray
        mag = big / dist
        u_pos = along_e * mag / du + (num_u - 1) / 2
        u0 = torch.floor(u_pos)
        frac = u_pos - u0
        wdist = (src / dist) ** 2
        ok0 = (u0 >= 0) & (u0 <= num_u - 1)
        ok1 = (u0 >= -1) & (u0 <= num_u - 2)
        base = (torch.arange(sl.start, sl.stop, device=device) * num_u)[None, :]
        col0 = base + u0.clamp(-1, num_u).to(torch.int64)
        row_index = torch.stack(
            (torch.where(ok0, col0, zero), torch.where(ok1, col0 + 1, zero)), dim=-1
        ).to(K.index_dtype(zero + 1))
        row_weight = torch.stack(
            (torch.where(ok0, (1 - frac) * wdist, 0), torch.where(ok1, frac * wdist, 0)), -1
        ).to(dtype)
        zslope = (mag / dv).to(dtype)
        # only the compiled kernel (CPU) reads the pairs' voxel columns
        count = num_h * num_w if torch.device(device).type == "cpu" else 0
        column = torch.arange(count, device=device).repeat_interleave(sl.stop - sl.start)
        return row_index, row_weight, zslope, column

    def _fdk_backproject(self, y: torch.Tensor) -> torch.Tensor:
        num_d, num_h, num_w = self.domain_shape
        num_v, num_u = self.geometry.det_shape
        num_a = self.num_angles
        g = self.geometry
        lead = y.shape[:-3]
        batch = math.prod(lead)
        dtype, device = y.dtype, y.device
        block, table = self._budgets(device)
        zero = num_a * num_u
        # Detector columns as padded rows (A·U, B, V + 3): pads along v, one zero row.
        rows = torch.zeros(zero + 1, batch, num_v + 3, dtype=dtype, device=device)
        rows[:zero].view(num_a, num_u, batch, num_v + 3)[..., 1 : num_v + 1].copy_(
            y.reshape(batch, num_v, num_a, num_u).permute(2, 3, 0, 1)
        )
        zcoord = self.volume_geometry.z_coords(device=device).to(dtype)
        out = torch.zeros(num_h * num_w, batch, num_d, dtype=dtype, device=device)
        gather = _cone_native.kernels_for(rows)[0]
        compiled = gather is _cone_native.pair_gather
        per_angle = num_h * num_w * 64
        for sl in self._chunks(per_angle, table):
            key = ("fdk", self._plane_key, g.det_spacing[0], sl.start, sl.stop, dtype, str(device))
            row_index, row_weight, zslope, column = _table_cache.cached(
                key, key[:3] + key[-2:], device, lambda: self._fdk_tables(sl, dtype, device))
            if compiled:  # the projector's compiled pair kernel, voxel columns as its rays
                gather(rows, row_index.view(-1, 2), row_weight.view(-1, 2), zslope.view(-1),
                       column, zcoord, g.row_axis, out)
            else:
                K.two_stage_gather(
                    rows, row_index, row_weight, zslope, zcoord, g.row_axis, out,
                    block_bytes=block, accumulate=True,
                )
        out = out.view(num_h, num_w, batch, num_d).permute(2, 3, 0, 1)
        return out.reshape(lead + (num_d, num_h, num_w))
