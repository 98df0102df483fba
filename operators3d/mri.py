"""Multi-coil Cartesian MRI operators.

Conventions (DESIGN.md): native complex dtypes; centred orthonormal FFT
``F = fftshift ∘ fftn(norm="ortho") ∘ ifftshift`` over the transformed axes; a mask of shape
``(H, W)`` means hybrid space (a 2D FFT per D-slice, readout already inverse-transformed), a mask
of shape ``(D, H, W)`` a full 3D FFT.

``MultiCoilMRI`` is mathematically ``Mask @ CenteredFFT @ CoilExpand`` (see
:meth:`MultiCoilMRI.as_composition`), but it applies the three in one fused, coil-chunked pass:
the centring phases are folded into the mask and the input, each chunk of coils goes through one
bare FFT written straight into the output, and the adjoint accumulates coil by coil. That keeps a
forward plus adjoint within a small multiple of the coil-image bytes and close to the speed of
the bare FFTs, which the composition of separate nodes (one full-size temporary per node) is not.
"""

from __future__ import annotations

import weakref

from typing import Sequence

import torch

from .base import LinearOperator
from .fft import fft_phases
from .krylov import conjugate_gradient

__all__ = ["MultiCoilMRI", "CoilExpand", "CenteredFFT", "Mask", "sense_cg"]


def _outer_phases(shape: Sequence[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable centring phases over all axes of ``shape`` (outer products)."""
    p_in = torch.ones((), dtype=dtype, device=device)
    p_out = torch.ones((), dtype=dtype, device=device)
    for axis, n in enumerate(shape):
        a, b = fft_phases(n, device=device, dtype=dtype)
        view = [1] * len(shape)
        view[axis] = n
        p_in = p_in * a.view(view)
        p_out = p_out * b.view(view)
    return p_in, p_out


_MASK_CACHE: dict[tuple[int, torch.dtype], tuple] = {}


def _mask_buffers(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask ⊙ output phase, mask², input phase)`` in ``dtype``, shared by operators of one mask.

    The centring phases are folded into the mask (output side) and applied to the 1/C-sized
    image (input side), so the centred FFT costs no extra pass over coil data. Every slab
    operator of a scan has the same mask; computing these per slab cost as much as reading
    the slab's chunks, so they are cached for the live mask tensor (checked by identity and
    its version counter; the buffers are never written in place, operators being immutable).
    """
    key = (id(mask), dtype)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == mask._version:
        return hit[2]
    p_in, p_out = _outer_phases(tuple(mask.shape), mask.device, torch.complex128)
    mask_c = mask.to(torch.float64)
    out = ((mask_c * p_out).to(dtype), (mask_c * mask_c).to(dtype), p_in.to(dtype))
    if len(_MASK_CACHE) >= 8:
        _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
    _MASK_CACHE[key] = (weakref.ref(mask), mask._version, out)
    return out


def _check_complex_tensor(t: torch.Tensor, owner: str, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_complex():
        raise TypeError(f"{owner}: {what} must be complex, got dtype {t.dtype}")


def _check_mask(mask: torch.Tensor, owner: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{owner}: mask must be bool or real, got dtype {mask.dtype}")
    if mask.ndim not in (2, 3):
        raise ValueError(
            f"{owner}: mask must be (H, W) (hybrid space) or (D, H, W) (3D), "
            f"got shape {tuple(mask.shape)}"
        )
    return mask


class Mask(LinearOperator):
    """Cartesian sampling: multiply k-space by a (0/1 or weighting) mask.

    Shape:
        ``(..., *mask.shape) → (..., *mask.shape)``; ``shape`` may add leading dims
        (e.g. coils) that the mask broadcasts over.

    Math:
        ``(M y)_k = m_k y_k``; self-adjoint for a real mask.
    """

    def __init__(self, mask: torch.Tensor, *, shape: Sequence[int] | None = None) -> None:
        mask = _check_mask(mask, "Mask") if mask.ndim in (2, 3) else mask
        shape = tuple(mask.shape) if shape is None else tuple(shape)
        if tuple(shape[len(shape) - mask.ndim :]) != tuple(mask.shape):
            raise ValueError(
                f"Mask: mask of shape {tuple(mask.shape)} must match the trailing dims of {shape}"
            )
        super().__init__(shape, shape, domain_complex=True, range_complex=True)
        self.register_buffer("mask", mask)

    def _forward(self, x):
        return x * self.mask

    def _adjoint(self, y):
        return y * self.mask

    def _make_adjoint(self):
        return self


class CenteredFFT(LinearOperator):
    """Centred orthonormal FFT over the last ``num_dims`` axes of tensors of trailing ``shape``.

    Shape:
        ``shape → shape``.

    Math:
        ``F = fftshift ∘ fftn(·, norm="ortho") ∘ ifftshift``; unitary, ``Fᴴ = F⁻¹``.
    """

    def __init__(
        self, shape: Sequence[int], *, num_dims: int = 2, dtype: torch.dtype = torch.complex64
    ) -> None:
        shape = tuple(shape)
        if not 1 <= num_dims <= len(shape):
            raise ValueError(f"CenteredFFT: num_dims must be in [1, {len(shape)}], got {num_dims}")
        super().__init__(shape, shape, domain_complex=True, range_complex=True)
        self.num_dims = num_dims
        p_in, p_out = _outer_phases(shape[len(shape) - num_dims :], None, torch.complex128)
        self.register_buffer("phase_in", p_in.to(dtype), persistent=False)
        self.register_buffer("phase_out", p_out.to(dtype), persistent=False)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(range(-self.num_dims, 0))

    def _forward(self, x):
        out = torch.fft.fftn(x * self.phase_in, dim=self.dims, norm="ortho")
        return out.mul_(self.phase_out)

    def _adjoint(self, y):
        out = torch.fft.ifftn(y * self.phase_out.conj(), dim=self.dims, norm="ortho")
        return out.mul_(self.phase_in.conj())


class CoilExpand(LinearOperator):
    """Coil sensitivity weighting: one image becomes ``C`` coil images.

    Shape:
        ``(..., D, H, W) → (..., C, D, H, W)``.

    Math:
        ``(S x)_c = S_c ⊙ x``, adjoint ``Σ_c conj(S_c) ⊙ y_c``.
    """

    def __init__(self, coil_maps: torch.Tensor) -> None:
        _check_complex_tensor(coil_maps, "CoilExpand", "coil_maps")
        if coil_maps.ndim != 4:
            raise ValueError(
                f"CoilExpand: coil_maps must be (C, D, H, W), got shape {tuple(coil_maps.shape)}"
            )
        super().__init__(
            coil_maps.shape[1:], coil_maps.shape, domain_complex=True, range_complex=True
        )
        self.register_buffer("coil_maps", coil_maps)

    def _forward(self, x):
        return self.coil_maps * x.unsqueeze(-4)

    def _adjoint(self, y):
        return (self.coil_maps.conj() * y).sum(dim=-4)


class MultiCoilMRI(LinearOperator):
    """Multi-coil Cartesian MRI, hybrid-space (per D-slice 2D) or full 3D.

    ``mask`` of shape ``(H, W)``: hybrid space — the readout (D) was already inverse-transformed,
    each D-slice is an independent 2D problem, and :meth:`slab` gives the exact operator of a
    D-slab. ``mask`` of shape ``(D, H, W)``: full 3D FFT. Single coil is ``C = 1``; with
    ``coil_maps=None`` give ``volume_shape`` and the maps are taken as 1.

    Shape:
        forward ``(..., D, H, W) → (..., C, D, H, W)`` (complex); adjoint the reverse.

    Math:
        ``y_c = M ⊙ F(S_c ⊙ x)``, ``Aᴴ y = Σ_c conj(S_c) ⊙ F⁻¹(M ⊙ y_c)``;
        ``F`` is the centred orthonormal 2D (hybrid) or 3D FFT.

    Args:
        mask: bool or real ``(H, W)`` or ``(D, H, W)``; its values weight k-space (0/1 for
            sampling; a real weighting is allowed, the operator stays linear).
        coil_maps: complex ``(C, D, H, W)``.
        volume_shape: ``(D, H, W)`` when ``coil_maps`` is None.
        coil_chunk: coils transformed per FFT call, whole volumes; default: blocks of about
            ``block_elements`` entries over coils and (hybrid) D-slices.
        block_elements: target size of the temporaries (default 2²⁰ entries, 8 MiB complex64).
        dtype: precision of the operator's tables when ``coil_maps`` is None (with maps, theirs).
    """

    kind = "mri"

    def __init__(
        self,
        *,
        mask: torch.Tensor,
        coil_maps: torch.Tensor | None = None,
        volume_shape: Sequence[int] | None = None,
        coil_chunk: int | None = None,
        block_elements: int = 1 << 20,
        dtype: torch.dtype = torch.complex64,
    ) -> None:
        name = "MultiCoilMRI"
        mask = _check_mask(mask, name)
        if coil_maps is None:
            if volume_shape is None:
                raise ValueError(f"{name}: give coil_maps=(C, D, H, W) or volume_shape=(D, H, W)")
            vshape = tuple(int(s) for s in volume_shape)
            if len(vshape) != 3:
                raise ValueError(f"{name}: volume_shape must be (D, H, W), got {vshape}")
            num_coils = 1
        else:
            _check_complex_tensor(coil_maps, name, "coil_maps")
            if coil_maps.ndim != 4:
                raise ValueError(
                    f"{name}: coil_maps must be (C, D, H, W), got shape {tuple(coil_maps.shape)}"
                )
            vshape = tuple(coil_maps.shape[1:])
            if volume_shape is not None and tuple(volume_shape) != vshape:
                raise ValueError(
                    f"{name}: volume_shape {tuple(volume_shape)} disagrees with coil_maps "
                    f"(C, D, H, W) = {tuple(coil_maps.shape)}"
                )
            num_coils = coil_maps.shape[0]
        expected_mask = vshape[1:] if mask.ndim == 2 else vshape
        if tuple(mask.shape) != expected_mask:
            kind = "(H, W)" if mask.ndim == 2 else "(D, H, W)"
            raise ValueError(
                f"{name}: mask {kind} must be {expected_mask} to match the volume (D, H, W) = "
                f"{vshape}, got {tuple(mask.shape)}"
            )
        super().__init__(
            vshape, (num_coils,) + vshape, domain_complex=True, range_complex=True
        )
        self.num_coils = num_coils
        self.hybrid = mask.ndim == 2
        if coil_chunk is not None and int(coil_chunk) < 1:
            raise ValueError(f"{name}: coil_chunk must be >= 1, got {coil_chunk}")
        self.coil_chunk_given = coil_chunk is not None
        self.coil_chunk = int(coil_chunk) if coil_chunk is not None else 1
        self.block_elements = int(block_elements)

        self.register_buffer("mask", mask)
        if coil_maps is not None:
            self.register_buffer("coil_maps", coil_maps)
        else:
            self.coil_maps = None
        cdtype = coil_maps.dtype if coil_maps is not None else dtype
        mask_phased, mask_sq, phase_in = _mask_buffers(mask, cdtype)
        self.register_buffer("_mask_phased", mask_phased, persistent=False)
        self.register_buffer("_mask_sq", mask_sq, persistent=False)
        self.register_buffer("_phase_in", phase_in, persistent=False)

    # ------------------------------------------------------------------ structure
    @property
    def fft_dims(self) -> tuple[int, ...]:
        return (-2, -1) if self.hybrid else (-3, -2, -1)

    def as_composition(self) -> LinearOperator:
        """The same operator as the composition ``Mask @ CenteredFFT @ CoilExpand`` (slower)."""
        shape = self.range_shape
        expand: LinearOperator
        if self.coil_maps is not None:
            expand = CoilExpand(self.coil_maps)
        else:
            ones = torch.ones(shape, dtype=self._phase_in.dtype, device=self.mask.device)
            expand = CoilExpand(ones)
        fft = CenteredFFT(shape, num_dims=len(self.fft_dims), dtype=self._phase_in.dtype)
        fft = fft.to(self.mask.device)
        return Mask(self.mask, shape=shape) @ fft @ expand

    def slab(self, d_slice: slice) -> "MultiCoilMRI":
        """The exact operator of the D-slab ``d_slice`` (hybrid space only).

        Shape:
            ``(..., d, H, W) → (..., C, d, H, W)`` with ``d`` the slab thickness.
        """
        if not self.hybrid:
            raise ValueError(
                "MultiCoilMRI.slab: a 3D-FFT operator (mask (D, H, W)) couples all D-slices; "
                "move the data to hybrid space (readout_to_hybrid) to slice it"
            )
        if not isinstance(d_slice, slice) or d_slice.step not in (None, 1):
            raise ValueError(f"MultiCoilMRI.slab: expected a contiguous slice, got {d_slice!r}")
        start, stop, _ = d_slice.indices(self.domain_shape[0])
        if stop <= start:
            raise ValueError(f"MultiCoilMRI.slab: empty slab {d_slice!r} of D={self.domain_shape[0]}")
        maps = None if self.coil_maps is None else self.coil_maps[:, start:stop]
        return self._rebuild(self.mask, maps, (stop - start,) + self.domain_shape[1:])

    def _rebuild(
        self, mask: torch.Tensor, coil_maps: torch.Tensor | None, volume_shape: Sequence[int]
    ) -> "MultiCoilMRI":
        """An operator with this one's settings and the given mask and maps (or volume)."""
        chunk = self.coil_chunk if self.coil_chunk_given else None
        if coil_maps is None:
            return MultiCoilMRI(
                mask=mask,
                volume_shape=volume_shape,
                dtype=self._phase_in.dtype,
                coil_chunk=chunk,
                block_elements=self.block_elements,
            )
        return MultiCoilMRI(
            mask=mask, coil_maps=coil_maps, coil_chunk=chunk, block_elements=self.block_elements
        )

    # ------------------------------------------------------------------ capabilities
    def measurement_mask(self) -> torch.Tensor:
        """The sampled k-space positions ``(H, W)`` / ``(D, H, W)``, broadcast over coils."""
        return self.mask != 0

    def kspace_mask(self) -> torch.Tensor:
        return self.mask

    def restrict_measurements(self, mask: torch.Tensor) -> LinearOperator:
        """A mask of the k-space grid's shape gives a ``MultiCoilMRI`` with the product mask
        (fast, and SENSE still applies); any other mask the generic ``M ∘ A``."""
        if tuple(mask.shape) != tuple(self.mask.shape):
            return super().restrict_measurements(mask)
        mask = mask.to(self.mask.device)
        if mask.dtype == torch.bool and self.mask.dtype == torch.bool:
            new_mask = self.mask & mask
        else:  # real weights: the operator's mask becomes a weighting (still linear)
            real = mask.dtype if mask.is_floating_point() else torch.float64
            new_mask = self.mask.to(real) * mask.to(real)
        return self._rebuild(new_mask, self.coil_maps, self.domain_shape)

    def _lipschitz(self) -> float:
        """``max|m|² · max_x Σ_c |S_c(x)|²`` (the orthonormal FFT is unitary), exact for a
        fully sampled mask."""
        m2 = float(self.mask.to(torch.float64).abs().max()) ** 2
        if self.coil_maps is None:
            return m2
        return m2 * float((self.coil_maps.abs() ** 2).sum(dim=0).max())

    def extra_repr(self) -> str:
        kind = "hybrid" if self.hybrid else "3D"
        return f"{self.range_shape} ← {self.domain_shape}, {kind}"

    # ------------------------------------------------------------------ kernels
    def _blocks(self):
        """(coil slice, D slice) blocks of about ``block_elements`` coil-image entries each.

        Small blocks keep every temporary inside the allocator's reused heap (fresh
        multi-megabyte allocations cost page faults comparable to the FFT itself) and in cache;
        hybrid-space operators also split along D, whose slices are independent.
        """
        num_d, num_h, num_w = self.domain_shape
        per_coil = num_d * num_h * num_w
        if self.coil_chunk_given:
            coils_per_block, d_per_block = self.coil_chunk, num_d
        elif per_coil <= self.block_elements or not self.hybrid:
            coils_per_block = max(1, min(self.num_coils, self.block_elements // per_coil))
            d_per_block = num_d
        else:
            coils_per_block = 1
            d_per_block = max(1, self.block_elements // (num_h * num_w))
        for c0 in range(0, self.num_coils, coils_per_block):
            c1 = min(c0 + coils_per_block, self.num_coils)
            for d0 in range(0, num_d, d_per_block):
                yield slice(c0, c1), slice(d0, min(d0 + d_per_block, num_d))

    def _phase_in_block(self, ds: slice) -> torch.Tensor:
        return self._phase_in if self.hybrid else self._phase_in[ds]

    def _mask_block(self, table: torch.Tensor, ds: slice) -> torch.Tensor:
        return table if self.hybrid else table[ds]

    def _coil_images(
        self, xp: torch.Tensor, cs: slice, ds: slice, dtype: torch.dtype, work: torch.Tensor | None
    ) -> torch.Tensor:
        """``S_c ⊙ x`` for one block (``xp`` already carries the input phase)."""
        xb = xp[..., ds, :, :].unsqueeze(-4)
        shape = xb.shape[:-4] + (cs.stop - cs.start,) + xb.shape[-3:]
        if self.coil_maps is None:
            return xb.expand(shape).to(dtype)
        if work is None or work.shape != shape:
            return (self.coil_maps[cs, ds] * xb).to(dtype)
        return torch.mul(self.coil_maps[cs, ds], xb, out=work)

    def _accumulate_coils(self, out: torch.Tensor, t: torch.Tensor, cs: slice, ds: slice) -> None:
        """``out[ds] += Σ_c conj(S_c) t_c`` over the block, as fused multiply-adds."""
        target = out[..., ds, :, :]
        if self.coil_maps is None:
            target.add_(t.sum(dim=-4))
            return
        maps = self.coil_maps[cs, ds]
        for c in range(cs.stop - cs.start):
            target.addcmul_(t[..., c, :, :, :], maps[c].conj())

    def _result_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, self._phase_in.dtype)

    def _workspace(self, lead: torch.Size, dtype: torch.dtype, device) -> torch.Tensor | None:
        """One block-sized buffer reused by every block of a call (fresh allocations are slow)."""
        first = next(iter(self._blocks()))
        cs, ds = first
        shape = lead + (cs.stop - cs.start, ds.stop - ds.start) + self.domain_shape[1:]
        return torch.empty(shape, dtype=dtype, device=device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._result_dtype(x)
        lead = x.shape[:-3]
        xp = x * self._phase_in
        y = torch.empty(lead + self.range_shape, dtype=dtype, device=x.device)
        work = self._workspace(lead, dtype, x.device)
        for cs, ds in self._blocks():
            t = torch.fft.fftn(
                self._coil_images(xp, cs, ds, dtype, work), dim=self.fft_dims, norm="ortho"
            )
            torch.mul(t, self._mask_block(self._mask_phased, ds), out=y[..., cs, ds, :, :])
        return y

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        dtype = self._result_dtype(y)
        lead = y.shape[:-4]
        out = torch.zeros(lead + self.domain_shape, dtype=dtype, device=y.device)
        mask_conj = self._mask_phased.conj().resolve_conj()
        work = self._workspace(lead, dtype, y.device)
        for cs, ds in self._blocks():
            block = y[..., cs, ds, :, :]
            mask = self._mask_block(mask_conj, ds)
            if work.shape == block.shape:
                t = torch.mul(block, mask, out=work)
            else:
                t = block * mask
            t = torch.fft.ifftn(t, dim=self.fft_dims, norm="ortho")
            self._accumulate_coils(out, t, cs, ds)
        return out.mul_(self._phase_in.conj())

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        """``Aᴴ A x`` one block at a time: never holds all coils' k-space."""
        dtype = self._result_dtype(x)
        lead = x.shape[:-3]
        xp = x * self._phase_in
        out = torch.zeros(lead + self.domain_shape, dtype=dtype, device=x.device)
        work = self._workspace(lead, dtype, x.device)
        # |m ⊙ p_out|² = m² since the phases have unit modulus.
        for cs, ds in self._blocks():
            t = torch.fft.fftn(
                self._coil_images(xp, cs, ds, dtype, work), dim=self.fft_dims, norm="ortho"
            )
            t = torch.fft.ifftn(
                t.mul_(self._mask_block(self._mask_sq, ds)), dim=self.fft_dims, norm="ortho"
            )
            self._accumulate_coils(out, t, cs, ds)
        return out.mul_(self._phase_in.conj())


def sense_cg(
    y: torch.Tensor,
    op: LinearOperator,
    *,
    l2_weight: float = 0.0,
    num_iters: int = 30,
    tol: float = 1e-6,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """SENSE reconstruction by conjugate gradient (Pruessmann et al., MRM 2001), the baseline.

    Solves the normal equations of the (optionally Tikhonov-regularised) least squares, each
    batch element its own system.

    Shape:
        ``y``: ``(..., C, D, H, W)`` → ``(..., D, H, W)`` (the operator's domain).

    Math:
        ``x̂ = argmin ‖A x − y‖² + λ‖x‖² = (AᴴA + λI)⁻¹ Aᴴ y``.
    """
    if l2_weight < 0:
        raise ValueError(f"sense_cg: l2_weight must be >= 0, got {l2_weight}")
    rhs = op.adjoint(y)
    return conjugate_gradient(
        op.normal_operator(),
        rhs,
        x0=x0,
        num_dims=len(op.domain_shape),
        num_iters=num_iters,
        tol=tol,
        damping=l2_weight,
    )
