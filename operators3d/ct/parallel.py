"""Parallel-beam CT: Joseph's projector and its exact transpose, matrix-free, in pure torch.

The picture in words: the volume ``(D, H, W)`` turns about the D axis; at angle θ a family of
parallel rays travels along ``d(θ) = (−sin θ, cos θ)`` in every D-slice, and detector column
``u`` records the line integral at signed distance ``s = (u − (U−1)/2) · det_spacing`` from the
axis along ``e(θ) = (cos θ, sin θ)``. Every D-slice is an independent 2D problem, so a D-slab of
the sinogram is the exact measurement of the same D-slab of the volume.

Discretisation (Joseph 1982, METHODS.md): a ray steps plane by plane along the image axis
closest to its direction (rows of H when ``|cos θ| ≥ |sin θ|``, else columns of W), takes the
linear interpolation of the two nearest voxels across that plane (zero outside the volume), and
weighs each step by its length ``voxel_size / max(|cos θ|, |sin θ|)``. The matrix entry of
(ray, voxel) is ``λ(θ) · max(0, 1 − |pos(ray, plane) − j|)``.

Kernels: every D-slice shares the same interpolation indices and weights, so the volume is
laid out as rows of contiguous D-vectors (batch folded in), ``(H, W + 3, B·D)`` for the angles
that step along H and ``(W, H + 3, B·D)`` for those that step along W, the secondary axis padded
with zeros; then the two neighbours a ray interpolates between are adjacent rows, fetched by
one index through a strided view. The forward gathers, for a block of rays, the ``2·S`` rows
each ray touches and reduces them with one batched matrix–vector product (``bmm``). The adjoint
is the exact transpose in gather form: for each voxel column and angle, the window of ``K``
adjacent rays whose hat can cover it (``K = 2`` for ``det_spacing ≥ voxel_size``), read from the
sinogram laid out as rows ``(A, U + 2K, B·D)`` padded with zero rays, reduced the same way. Both
evaluate the hat with the same floating-point operations on the same positions, so their
entries agree bitwise. Index/weight tables are built per chunk of angles from a few numbers per
angle and dropped (no sparse matrix is ever held); zero pads replace every bounds test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import _kernels as K
from .geometry import (
    ParallelGeometry,
    VolumeGeometry,
    _angles,
    _positive,
    _shape3,
    _slab_bounds,
)
from .projector import CTProjector

__all__ = ["ParallelBeamCT", "default_det_count"]


def default_det_count(volume_shape: Sequence[int], voxel_size: float = 1.0,
                      det_spacing: float = 1.0) -> int:
    """Enough detector columns to cover the diagonal of the ``(H, W)`` plane."""
    _, h, w = (int(s) for s in volume_shape)
    return max(1, math.ceil(math.hypot(h, w) * voxel_size / det_spacing - 1e-9))


@dataclass
class _Group:
    """Angles that step along the same image axis, with their per-angle coefficients.

    ``pos(u, step) = alpha · u + beta[step]`` is the fractional index, along the secondary
    axis, where ray ``u`` crosses plane ``step``; ``lam`` is the step length.
    """

    primary: str  # "y": steps over rows (H), interpolates along W; "x": the reverse
    index: torch.Tensor  # (A_g,) positions in the operator's angle list (CPU, int64)
    alpha: torch.Tensor  # (A_g,) float64
    beta: torch.Tensor  # (A_g, S) float64
    lam: torch.Tensor  # (A_g,) float64
    u_lo: torch.Tensor  # (A_g,) first column whose ray may meet the volume
    u_hi: torch.Tensor  # (A_g,) one past the last
    num_steps: int
    length2: int  # length of the secondary axis
    stride_step: int  # row stride of one step in the (H·W) layout
    stride2: int  # row stride along the secondary axis
    num_candidates: int  # K: rays that can cover one voxel at one angle


def _groups(vol: VolumeGeometry, geom: ParallelGeometry) -> list[_Group]:
    _, num_h, num_w = vol.shape
    vs, ds, num_u = vol.voxel_size, geom.det_spacing, geom.det_count
    cu, cy, cx = (num_u - 1) / 2, (num_h - 1) / 2, (num_w - 1) / 2
    theta = geom.angles
    cos, sin = torch.cos(theta), torch.sin(theta)
    extent = vs * ((num_w + 1) / 2 * cos.abs() + (num_h + 1) / 2 * sin.abs()) + ds
    u_lo = torch.floor(cu - extent / ds).clamp(0, num_u).to(torch.int64)
    u_hi = (torch.ceil(cu + extent / ds) + 1).clamp(0, num_u).to(torch.int64)
    use_y = cos.abs() >= sin.abs()
    groups = []
    for primary, mask in (("y", use_y), ("x", ~use_y)):
        index = torch.nonzero(mask).reshape(-1)
        if index.numel() == 0:
            continue
        # Chunks of similar extent keep each chunk's column range tight.
        index = index[torch.argsort(extent[index], stable=True)]
        c, s = cos[index], sin[index]
        if primary == "y":
            main, other, steps, n2, c_step, c2 = c, s, num_h, num_w, cy, cx
            stride_step, stride2 = num_w, 1
        else:
            main, other, steps, n2, c_step, c2 = s, c, num_w, num_h, cx, cy
            stride_step, stride2 = 1, num_w
        alpha = ds / (vs * main)
        plane = torch.arange(steps, dtype=torch.float64)
        beta = c2 - (plane[None, :] - c_step) * (other / main)[:, None] - cu * alpha[:, None]
        lam = vs / main.abs()
        reach = float((1 / alpha.abs()).max())  # half-width of a voxel's hat in columns
        groups.append(
            _Group(
                primary=primary,
                index=index,
                alpha=alpha,
                beta=beta,
                lam=lam,
                u_lo=u_lo[index],
                u_hi=u_hi[index],
                num_steps=steps,
                length2=n2,
                stride_step=stride_step,
                stride2=stride2,
                num_candidates=max(1, math.ceil(2 * reach - 1e-9)),
            )
        )
    return groups


def _check_detector(vol: VolumeGeometry, geom: ParallelGeometry) -> None:
    """Raise if the detector is narrower than the volume's shadow at some angle."""
    _, num_h, num_w = vol.shape
    vs, ds = vol.voxel_size, geom.det_spacing
    cos, sin = torch.cos(geom.angles).abs(), torch.sin(geom.angles).abs()
    need = vs * (num_w * cos + num_h * sin)  # width of the volume's shadow
    have = geom.det_count * ds
    worst = int(torch.argmax(need))
    if float(need[worst]) > have + 0.5 * ds:  # half a pixel of slack
        raise ValueError(
            f"ParallelBeamCT: the detector is too small to see the volume: det_count="
            f"{geom.det_count} × det_spacing={ds:g} = {have:g} wide, but the volume "
            f"(H, W) = ({num_h}, {num_w}) × voxel_size={vs:g} casts a shadow "
            f"{float(need[worst]):.4g} wide at angle {float(geom.angles[worst]):.4g} rad; "
            f"use det_count >= {math.ceil(float(need.max()) / ds - 0.5)} (the default "
            "covers the diagonal) or allow_truncation=True"
        )


class ParallelBeamCT(CTProjector):
    """Parallel-beam CT projector (Joseph's method) with its exact transpose as adjoint.

    Geometry in words: the rotation axis is D; at angle θ the rays run along
    ``d(θ) = (−sin θ, cos θ)`` in the (x, y) = (W, H) plane of every D-slice, and detector
    column ``u`` sits at ``s = (u − (U−1)/2) · det_spacing`` along ``(cos θ, sin θ)``; the volume
    is centred on the axis, voxel centres at ``(i − (N−1)/2) · voxel_size``. At θ = 0 the rays
    run up the H axis and column u lines up with W.

    Shape:
        forward ``(*batch, D, H, W) → (*batch, D, A, U)``; adjoint the reverse.

    Math:
        ``p(θ, s) = ∫ f(s cos θ − t sin θ, s sin θ + t cos θ) dt``, discretised by Joseph's
        method: ``(A f)_{θ,u} = λ_θ Σ_planes Σ_j max(0, 1 − |pos_{θ,u}(plane) − j|) f_{plane,j}``,
        ``λ_θ = voxel_size / max(|cos θ|, |sin θ|)``; ``Aᴴ = Aᵀ`` exactly.

    Args:
        volume_shape: ``(D, H, W)``.
        angles: 1-D tensor (or sequence) of projection angles in radians, any range and order.
        det_count: detector columns ``U``; default: enough to cover the ``(H, W)`` diagonal.
        voxel_size: voxel edge length (physical units); line integrals are in these units.
        det_spacing: detector column pitch (physical units).
        allow_truncation: accept a detector narrower than the volume's projection (region of
            interest scans); by default that is an error.
        block_bytes: size of the gather buffer per block (default 2 MiB on CPU, 256 MiB on
            CUDA); the chunked work keeps a call's temporaries near this size.
        table_bytes: size of the index/weight tables built per chunk of angles.

    The operator computes in the dtype of its input (float32 or float64) on the input's
    device; ``angles`` is kept as a buffer (float64 if given so, else float32).
    """

    kind = "parallel"

    def __init__(
        self,
        *,
        volume_shape: Sequence[int],
        angles,
        det_count: int | None = None,
        voxel_size: float = 1.0,
        det_spacing: float = 1.0,
        allow_truncation: bool = False,
        block_bytes: int | None = None,
        table_bytes: int | None = None,
    ) -> None:
        name = "ParallelBeamCT"
        shape = _shape3(volume_shape, name)
        vs = _positive(voxel_size, "voxel_size", name)
        ds = _positive(det_spacing, "det_spacing", name)
        angles64 = _angles(angles, name)
        if det_count is None:
            count = default_det_count(shape, vs, ds)
        else:
            try:
                count = int(det_count)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name}: det_count must be an int, got {det_count!r}") from err
            if count <= 0:
                raise ValueError(f"{name}: det_count must be positive, got {det_count!r}")
        vol = VolumeGeometry(shape, vs)
        geom = ParallelGeometry(angles64, count, ds)
        num_d, num_h, num_w = vol.shape
        super().__init__(
            vol.shape,
            (num_d, geom.num_angles, geom.det_count),
            domain_complex=False,
            range_complex=False,
        )
        self._setup(vol, geom, angles, allow_truncation, block_bytes, table_bytes)
        if not allow_truncation:
            _check_detector(vol, geom)
        self._groups = _groups(vol, geom)
        self.__dict__["_coef_cache"] = {}

    @staticmethod
    def _arguments(vol: VolumeGeometry, geom: ParallelGeometry) -> dict:
        """The constructor's arguments that a volume and a :func:`~operators3d.ct.parallel_beam`
        geometry stand for (:meth:`from_geometry`)."""
        return dict(
            volume_shape=vol.shape, angles=geom.angles, det_count=geom.det_count,
            voxel_size=vol.voxel_size, det_spacing=geom.det_spacing,
        )

    # ------------------------------------------------------------------ structure
    @property
    def det_count(self) -> int:
        return self.geometry.det_count

    def slab(self, d_slice: slice) -> "ParallelBeamCT":
        """The exact operator of the D-slab ``d_slice`` (D is separable in parallel beam).

        Shape:
            ``(..., d, H, W) → (..., d, A, U)`` with ``d`` the slab thickness.
        """
        start, stop = _slab_bounds(d_slice, self.domain_shape[0], "ParallelBeamCT.slab")
        vol = self.volume_geometry
        return self._rebuild(VolumeGeometry((stop - start,) + vol.shape[1:], vol.voxel_size),
                             self.geometry)

    def subset(self, angle_index) -> "ParallelBeamCT":
        """The operator restricted to a subset of the angles (slice, index list or mask)."""
        return self._rebuild(self.volume_geometry, self.geometry.subset(angle_index))

    def extra_repr(self) -> str:
        return (
            f"{self.range_shape} ← {self.domain_shape}, voxel_size="
            f"{self.volume_geometry.voxel_size:g}, det_spacing={self.geometry.det_spacing:g}"
        )

    # ------------------------------------------------------------------ tables
    def _coefficients(self, group: _Group, dtype, device):
        """alpha, beta, lam of a group in the compute dtype/device (cached, tiny)."""
        key = (group.primary, dtype, str(device))
        cache = self.__dict__.setdefault("_coef_cache", {})
        if key not in cache:
            cache[key] = tuple(
                t.to(device=device, dtype=dtype) for t in (group.alpha, group.beta, group.lam)
            )
        return cache[key]

    def _chunks(self, group: _Group, per_angle_bytes: int, table_bytes: int):
        count = group.index.numel()
        size = max(1, min(count, table_bytes // max(1, per_angle_bytes)))
        for a0 in range(0, count, size):
            yield slice(a0, min(count, a0 + size))

    def _forward_tables(self, group, sl, dtype, device):
        """Per ray of the chunk and per plane: the padded row of the lower neighbour (its
        upper neighbour is the next row) and the two weights."""
        alpha, beta, lam = self._coefficients(group, dtype, device)
        alpha, beta, lam = alpha[sl], beta[sl], lam[sl]
        u0 = int(group.u_lo[sl].min())
        u1 = int(group.u_hi[sl].max())
        num_rays = max(0, u1 - u0)
        u = torch.arange(u0, u0 + num_rays, device=device, dtype=dtype)
        pos = alpha[:, None, None] * u[None, :, None]
        pos = pos + beta[:, None, :]  # (A_c, Ur, S); the adjoint repeats these exact ops
        # Clamping only moves samples that miss the volume onto its zero pads.
        pos.clamp_(-1, group.length2)
        j0 = torch.floor(pos)
        weight = torch.stack((1 - (pos - j0), 1 - ((j0 + 1) - pos)), dim=-1)
        weight.mul_(lam[:, None, None, None])
        width = group.length2 + 3  # padded secondary axis: one zero before, two after
        base = torch.arange(group.num_steps, device=device, dtype=torch.int64) * width + 1
        index = j0.to(torch.int64).add_(base)
        return u0, num_rays, index.view(-1, group.num_steps), weight.view(
            -1, 1, 2 * group.num_steps
        )

    def _adjoint_tables(self, group, sl, dtype, device, method, pad):
        """For every voxel column and angle of the chunk: the first of ``K`` adjacent rays
        that can cover it (a row of the padded sinogram) and their ``K`` weights."""
        alpha, beta, lam = self._coefficients(group, dtype, device)
        alpha, beta, lam = alpha[sl], beta[sl], lam[sl]
        num_h, num_w = self.domain_shape[1:]
        num_u = self.det_count
        # First padded sinogram row of each angle: rows a·(U + 2·pad) + pad + u.
        angle_rows = group.index[sl].to(device) * (num_u + 2 * pad) + pad
        a = alpha[None, None, :]
        if group.primary == "y":  # plane = h, secondary j = w
            beta_b = beta.t()[:, None, :]
            j = torch.arange(num_w, device=device, dtype=dtype)[None, :, None]
        else:  # plane = w, secondary j = h
            beta_b = beta.t()[None, :, :]
            j = torch.arange(num_h, device=device, dtype=dtype)[:, None, None]
        u_centre = (j - beta_b) / a  # (H, W, A_c): the column whose ray hits the voxel centre
        if method == "matched":
            num_k = group.num_candidates
            first = torch.floor(u_centre - 1 / a.abs()) + 1
            uk = first[..., None] + torch.arange(num_k, device=device, dtype=dtype)
            pos = a[..., None] * uk
            pos = pos + beta_b[..., None]  # bitwise the forward's position of ray uk here
            weight = (1 - (pos - j[..., None]).abs()).clamp_min_(0)
            weight.mul_(lam[None, None, :, None])
        else:  # "linear": voxel-driven interpolation of each projection at the voxel centre
            num_k = 2
            first = torch.floor(u_centre)
            frac = u_centre - first
            weight = torch.stack((1 - frac, frac), dim=-1)
        # Rays off the detector read zero pads; windows wholly off it are clamped onto pads.
        index = first.clamp_(-pad, num_u).to(torch.int64).add_(angle_rows)
        n = index.shape[2]
        return index.reshape(num_h * num_w, n), weight.reshape(num_h * num_w, 1, n * num_k)

    # ------------------------------------------------------------------ kernels
    def _padded_volume(self, x: torch.Tensor, channels: int, primary: str) -> torch.Tensor:
        """The volume as rows of D-vectors, ordered for stepping along ``primary``, with the
        secondary axis padded by zeros (one before, two after)."""
        num_h, num_w = self.domain_shape[1:]
        src = x.reshape(channels, num_h, num_w)
        if primary == "y":
            steps, length, src = num_h, num_w, src.permute(1, 2, 0)  # (H, W, C)
        else:
            steps, length, src = num_w, num_h, src.permute(2, 1, 0)  # (W, H, C)
        out = torch.empty(steps, length + 3, channels, dtype=x.dtype, device=x.device)
        out[:, 0].zero_()
        out[:, length + 1 :].zero_()
        out[:, 1 : length + 1].copy_(src)
        return out.view(-1, channels)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        num_d = self.domain_shape[0]
        num_a, num_u = self.num_angles, self.det_count
        lead = x.shape[:-3]
        channels = math.prod(lead) * num_d
        dtype, device = x.dtype, x.device
        block, table = self._budgets(device)
        y = torch.zeros(channels, num_a, num_u, dtype=dtype, device=device)
        buffer = out_buf = None
        for group in self._groups:
            rows = self._padded_volume(x, channels, group.primary)
            pairs = rows.as_strided((rows.shape[0] - 1, 2, channels), (channels, channels, 1))
            per_angle = num_u * group.num_steps * 40  # table bytes with temporaries
            for sl in self._chunks(group, per_angle, table):
                u0, num_rays, index, weight = self._forward_tables(group, sl, dtype, device)
                if num_rays == 0:
                    continue
                need = index.shape[0] * channels
                if out_buf is None or out_buf.numel() < need:
                    out_buf = torch.empty(need, dtype=dtype, device=device)
                out = out_buf[:need].view(index.shape[0], 1, channels)
                buffer = K.gather_matvec(
                    pairs, index, weight, out, block_bytes=block, accumulate=False,
                    buffer=buffer,
                )
                num_c = index.shape[0] // num_rays
                y.narrow(2, u0, num_rays).index_copy_(
                    1, group.index[sl].to(device),
                    out.view(num_c, num_rays, channels).permute(2, 0, 1),
                )
            del rows, pairs
        return y.view(lead + (num_d, num_a, num_u))

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._backproject(y, "matched")

    def _backproject(self, y: torch.Tensor, method: str) -> torch.Tensor:
        num_d, num_h, num_w = self.domain_shape
        num_a, num_u = self.num_angles, self.det_count
        lead = y.shape[:-3]
        channels = math.prod(lead) * num_d
        dtype, device = y.dtype, y.device
        block, table = self._budgets(device)
        pad = max([g.num_candidates for g in self._groups] + [2])
        # The sinogram as rows (A, pad + U + pad, B·D): a ray's D-vector is contiguous and
        # the K candidate rays of a voxel are K adjacent rows; zero rows stand for rays off
        # the detector.
        width = num_u + 2 * pad
        yv = torch.empty(num_a, width, channels, dtype=dtype, device=device)
        yv[:, :pad].zero_()
        yv[:, pad + num_u :].zero_()
        yv[:, pad : pad + num_u].copy_(y.reshape(channels, num_a, num_u).permute(1, 2, 0))
        flat = yv.view(-1, channels)
        acc = torch.zeros(num_h * num_w, 1, channels, dtype=dtype, device=device)
        buffer = None
        for group in self._groups:
            k = group.num_candidates if method == "matched" else 2
            windows = flat.as_strided((flat.shape[0] - k + 1, k, channels), (channels, channels, 1))
            per_angle = num_h * num_w * (8 + 28 * k)
            for sl in self._chunks(group, per_angle, table):
                index, weight = self._adjoint_tables(group, sl, dtype, device, method, pad)
                buffer = K.gather_matvec(
                    windows, index, weight, acc, block_bytes=block, accumulate=True,
                    buffer=buffer,
                )
        del yv, flat
        out = acc.view(num_h, num_w, channels).permute(2, 0, 1)
        return out.reshape(lead + (num_d, num_h, num_w))

    def backproject(self, y: torch.Tensor, *, method: str = "matched") -> torch.Tensor:
        """Backproject a sinogram.

        ``method="matched"`` is the adjoint ``Aᵀ y`` (Joseph's weights, exact transpose).
        ``method="linear"`` is the voxel-driven backprojector of filtered backprojection:
        each projection linearly interpolated at the detector position of the voxel centre,
        summed over angles, ``b(x, y) = Σ_θ y_θ(x cos θ + y sin θ)`` (no step weights). It is a
        fixed reconstruction step, not part of the operator: its result carries no gradient.

        Shape:
            ``(*batch, D, A, U) → (*batch, D, H, W)``.
        """
        if method == "matched":
            return self.adjoint(y)
        if method != "linear":
            raise ValueError(
                f"{self.name}.backproject: method must be 'matched' or 'linear', got {method!r}"
            )
        self.check_input(y, adjoint=True)
        with torch.no_grad():
            return self._backproject(y, "linear")
