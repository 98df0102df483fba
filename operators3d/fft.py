"""Centred orthonormal FFTs.

The centred transform is ``F = fftshift ∘ fftn(·, norm="ortho") ∘ ifftshift`` over the
transformed axes and its inverse ``fftshift ∘ ifftn(·, norm="ortho") ∘ ifftshift`` (fastMRI,
sigpy and deepinv agree; the order matters for odd sizes).

The shifts are rolls, and a roll on one side of a DFT is a phase ramp on the other. With
``a = N // 2`` along an axis of length ``N``::

    F(x)[k] = exp(2πi (k − a) a / N) · fft(x ⊙ exp(2πi a n / N))[k]

so the centred transform costs one elementwise multiply on each side of the bare FFT instead
of two full copies, and operators can fold the phases into their masks and coil maps. For even
``N`` the phases are ``±1``.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "centered_fft",
    "centered_ifft",
    "fft_phases",
    "readout_to_hybrid",
    "complex_dtype_of",
    "real_dtype_of",
]


def complex_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of the same precision (float32/complex64 → complex64, ...)."""
    if dtype in (torch.float64, torch.complex128):
        return torch.complex128
    if dtype in (torch.float32, torch.complex64, torch.float16, torch.bfloat16):
        return torch.complex64
    raise TypeError(f"no complex dtype matches {dtype}")


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of the same precision (complex64 → float32, complex128 → float64)."""
    if dtype == torch.complex128:
        return torch.float64
    if dtype == torch.complex64:
        return torch.float32
    if dtype.is_floating_point:
        return dtype
    raise TypeError(f"no real dtype matches {dtype}")


def _normalise_dims(dims: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(d if d < 0 else d - ndim for d in dims)


def fft_phases(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.complex64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output phase ramps that turn a bare FFT into the centred one.

    Shape:
        two 1-D tensors of length ``n``.

    Math:
        ``p_in[j] = exp(2πi a j / n)``, ``p_out[k] = exp(2πi (k − a) a / n)``, ``a = n // 2``;
        ``centered_fft(x) = p_out ⊙ fft(p_in ⊙ x)``.
    """
    a = n // 2
    j = torch.arange(n, dtype=torch.float64)
    # Reduce the integer products modulo n before scaling, so the angles stay in [0, 2π) and
    # the phases are exact to float64 rounding even for large n.
    ang_in = 2 * torch.pi * torch.remainder(a * j, n) / n
    ang_out = 2 * torch.pi * torch.remainder((j - a) * a, n) / n
    p_in = torch.polar(torch.ones_like(ang_in), ang_in)
    p_out = torch.polar(torch.ones_like(ang_out), ang_out)
    if n % 2 == 0:
        # Exactly ±1: round away the ~1e-16 imaginary parts.
        p_in, p_out = p_in.real.round().to(p_in.dtype), p_out.real.round().to(p_out.dtype)
    return p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype)


def centered_fft(x: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal FFT over ``dims``.

    Shape:
        any; ``dims`` are transformed, the rest broadcast.

    Math:
        ``fftshift(fftn(ifftshift(x, dims), dims, norm="ortho"), dims)``.
    """
    dims = _normalise_dims(dims, x.ndim)
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def centered_ifft(y: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """Centred orthonormal inverse FFT over ``dims`` (the adjoint of :func:`centered_fft`).

    Shape:
        any; ``dims`` are transformed, the rest broadcast.

    Math:
        ``fftshift(ifftn(ifftshift(y, dims), dims, norm="ortho"), dims)``.
    """
    dims = _normalise_dims(dims, y.ndim)
    y = torch.fft.ifftshift(y, dim=dims)
    y = torch.fft.ifftn(y, dim=dims, norm="ortho")
    return torch.fft.fftshift(y, dim=dims)


def readout_to_hybrid(kspace: torch.Tensor, readout_dim: int = -3) -> torch.Tensor:
    """Move 3D Cartesian k-space to hybrid space by a centred inverse FFT along the readout.

    For a mask that depends on ``(ky, kz)`` only, this commutes with the mask, and each readout
    position becomes an independent 2D multi-coil problem (METHODS.md, *Hybrid space*).
    Remove readout oversampling before calling it.

    Shape:
        ``(..., C, kx, ky, kz) → (..., C, D, ky, kz)`` with the default ``readout_dim=-3``.

    Math:
        ``fftshift(ifft(ifftshift(k, kx), kx, norm="ortho"), kx)``.
    """
    if not kspace.is_complex():
        raise TypeError(f"readout_to_hybrid: expected complex k-space, got {kspace.dtype}")
    return centered_ifft(kspace, dims=(readout_dim,))
