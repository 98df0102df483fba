"""Image-quality metrics against a reference (simulated scans only).

Complex inputs are compared as magnitudes, as is usual for MRI (fastMRI, SSIBench).
"""

from __future__ import annotations

import math

import torch


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


def _box_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a cube of side ``size`` around each voxel (valid region only)."""
    k = torch.ones((1, 1, size, size, size), dtype=x.dtype) / size**3
    return torch.nn.functional.conv3d(x[None, None], k)[0, 0]


def ssim(
    x: torch.Tensor,
    reference: torch.Tensor,
    *,
    data_range: float | None = None,
    window: int = 7,
) -> float:
    """Structural similarity of magnitudes, averaged over 3D windows (Wang et al. 2004).

    Math:
        ``SSIM = mean over windows of (2μₓμᵣ + C₁)(2σₓᵣ + C₂) / ((μₓ² + μᵣ² + C₁)(σₓ² + σᵣ² + C₂))``
        with uniform ``window³`` windows (shrunk to the smallest side when the volume is
        thinner), ``C₁ = (0.01 R)²``, ``C₂ = (0.03 R)²``, ``R = max|ref|`` unless given, and
        the unbiased (``n/(n−1)``) local variances of scikit-image's ``structural_similarity``.
    """
    _check(x, reference, "ssim")
    if x.ndim != 3:
        raise ValueError(f"ssim: expects a (D, H, W) volume, got shape {tuple(x.shape)}")
    a, b = _magnitude(x).double(), _magnitude(reference).double()
    size = min(window, *a.shape)
    if size % 2 == 0:
        size -= 1
    size = max(size, 1)
    peak = float(b.abs().max()) if data_range is None else float(data_range)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    n = size**3
    unbias = n / (n - 1) if n > 1 else 1.0
    ma, mb = _box_mean(a, size), _box_mean(b, size)
    va = (_box_mean(a * a, size) - ma * ma) * unbias
    vb = (_box_mean(b * b, size) - mb * mb) * unbias
    cov = (_box_mean(a * b, size) - ma * mb) * unbias
    s = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
    return float(s.mean())
