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
