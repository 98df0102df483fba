"""Image-quality metrics against a reference (simulated scans only): PSNR, NMSE and 3D SSIM.

Complex inputs are compared as magnitudes, as is usual for MRI (fastMRI, SSIBench). The local
SSIM map (:func:`ssim_map`) is written once here: :func:`ssim` averages it over a whole volume
in memory, :mod:`pipeline.reconstruct.evaluate` sums it slab by slab out of core.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["psnr", "nmse", "ssim", "ssim_map", "ssim_window", "ssim_constants"]


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.abs() if x.is_complex() else x


def _check(x: torch.Tensor, reference: torch.Tensor, owner: str) -> None:
    if x.shape != reference.shape:
        raise ValueError(
            f"{owner}: reconstruction shape {tuple(x.shape)} differs from reference "
            f"{tuple(reference.shape)}"
        )


def psnr(
    x: torch.Tensor,
    reference: torch.Tensor,
    *,
    data_range: float | None = None,
    mask: torch.Tensor | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB.

    Math:
        ``10 log10(R² / mean((|x| − |ref|)²))``, ``R = max|ref|`` unless given, the mean over
        ``mask`` when one is given.
    """
    _check(x, reference, "psnr")
    a, b = _magnitude(x).double(), _magnitude(reference).double()
    if mask is not None:
        a, b = a[mask], b[mask]
    mse = float(((a - b) ** 2).mean())
    peak = float(b.abs().max()) if data_range is None else float(data_range)
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def nmse(x: torch.Tensor, reference: torch.Tensor, *, mask: torch.Tensor | None = None) -> float:
    """Normalised mean squared error of magnitudes: ``‖|x| − |ref|‖² / ‖ref‖²``."""
    _check(x, reference, "nmse")
    a, b = _magnitude(x).double(), _magnitude(reference).double()
    if mask is not None:
        a, b = a[mask], b[mask]
    return float(((a - b) ** 2).sum() / (b**2).sum())


def ssim_window(window: int, shape: tuple[int, ...]) -> int:
    """The SSIM window side used on a volume of ``shape``: ``window``, shrunk to the smallest
    side, made odd (at least 1)."""
    size = min(window, *shape)
    if size % 2 == 0:
        size -= 1
    return max(size, 1)


def ssim_constants(data_range: float) -> tuple[float, float]:
    """SSIM's stabilising constants ``C₁ = (0.01 R)²``, ``C₂ = (0.03 R)²``."""
    return (0.01 * data_range) ** 2, (0.03 * data_range) ** 2


def _box_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over each ``size³`` cube lying wholly inside ``x`` (separable sliding sums)."""
    for axis in range(3):
        n = x.shape[axis] - size + 1
        take = lambda k: x[(slice(None),) * axis + (slice(k, k + n),)]  # noqa: E731
        acc = take(0).copy()
        for k in range(1, size):
            acc += take(k)
        x = acc
    return x / size**3


def ssim_map(a: np.ndarray, b: np.ndarray, size: int, c1: float, c2: float) -> np.ndarray:
    """Local SSIM of every voxel whose ``size³`` window lies inside the float64 block.

    Math:
        ``(2μₐμ_b + C₁)(2σₐ_b + C₂) / ((μₐ² + μ_b² + C₁)(σₐ² + σ_b² + C₂))`` with uniform
        windows and the unbiased (``n/(n−1)``) local variances of scikit-image's
        ``structural_similarity``; the map has shape ``block − (size − 1)`` on every axis.
    """
    n = size**3
    unbias = n / (n - 1) if n > 1 else 1.0
    ma, mb = _box_valid(a, size), _box_valid(b, size)
    va = (_box_valid(a * a, size) - ma * ma) * unbias
    vb = (_box_valid(b * b, size) - mb * mb) * unbias
    cov = (_box_valid(a * b, size) - ma * mb) * unbias
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


def ssim(
    x: torch.Tensor,
    reference: torch.Tensor,
    *,
    data_range: float | None = None,
    window: int = 7,
) -> float:
    """Structural similarity of magnitudes, averaged over 3D windows (Wang et al. 2004).

    Math:
        the mean of :func:`ssim_map` over every window inside the volume, with uniform
        ``window³`` windows (shrunk to the smallest side when the volume is thinner, see
        :func:`ssim_window`), ``C₁ = (0.01 R)²``, ``C₂ = (0.03 R)²``, ``R = max|ref|`` unless
        given — scikit-image's ``structural_similarity`` with ``use_sample_covariance``.
    """
    _check(x, reference, "ssim")
    if x.ndim != 3:
        raise ValueError(f"ssim: expects a (D, H, W) volume, got shape {tuple(x.shape)}")
    a = _magnitude(x).detach().cpu().double().numpy()
    b = _magnitude(reference).detach().cpu().double().numpy()
    peak = float(np.abs(b).max()) if data_range is None else float(data_range)
    return float(ssim_map(a, b, ssim_window(window, a.shape), *ssim_constants(peak)).mean())
