"""Analytic 3D phantoms for simulation and tests.

Coordinates are normalised to ``[-1, 1]`` along each axis, voxel centres at
``-1 + (2 i + 1) / N``: ``z`` along D, ``y`` along H, ``x`` along W.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ellipsoid_phantom", "shepp_logan_3d", "SHEPP_LOGAN_3D"]

#: Modified 3D Shepp–Logan (Shepp & Logan 1974; 3D extension after Kak & Slaney 1988, with the
#: higher-contrast intensities of Toft 1996): value, semi-axes (a, b, c) along (x, y, z),
#: centre (x0, y0, z0), rotation about z in degrees.
SHEPP_LOGAN_3D: tuple[tuple[float, ...], ...] = (
    (1.0, 0.6900, 0.920, 0.810, 0.0, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.780, 0.0, -0.0184, 0.0, 0.0),
    (-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0, 0.0, -18.0),
    (-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0, 0.0, 18.0),
    (0.1, 0.2100, 0.250, 0.410, 0.0, 0.35, -0.15, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.0, 0.1, 0.25, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.0, -0.1, 0.25, 0.0),
    (0.1, 0.0460, 0.023, 0.050, -0.08, -0.605, 0.0, 0.0),
    (0.1, 0.0230, 0.023, 0.020, 0.0, -0.606, 0.0, 0.0),
    (0.1, 0.0230, 0.046, 0.020, 0.06, -0.605, 0.0, 0.0),
)


def _grid(shape: Sequence[int], device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, h, w = shape
    axes = [(-1 + (2 * torch.arange(n, device=device, dtype=dtype) + 1) / n) for n in (d, h, w)]
    z = axes[0].view(d, 1, 1)
    y = axes[1].view(1, h, 1)
    x = axes[2].view(1, 1, w)
    return z, y, x


def ellipsoid_phantom(
    shape: Sequence[int],
    ellipsoids: Sequence[Sequence[float]],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum of uniform ellipsoids on a ``(D, H, W)`` grid.

    Shape:
        returns ``(D, H, W)``.

    Math:
        ``f(r) = Σ_e v_e · 1[‖R_e (r − r_e) / (a_e, b_e, c_e)‖ ≤ 1]``, ``R_e`` a rotation about z.

    Args:
        shape: ``(D, H, W)``.
        ellipsoids: rows ``(value, a, b, c, x0, y0, z0, phi_degrees)``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"ellipsoid_phantom: shape must be (D, H, W) positive, got {shape}")
    z, y, x = _grid(shape, device, torch.float64)
    out = torch.zeros(shape, dtype=torch.float64, device=device)
    for row in ellipsoids:
        if len(row) != 8:
            raise ValueError(
                f"ellipsoid_phantom: each ellipsoid is (value, a, b, c, x0, y0, z0, phi), got {row}"
            )
        value, a, b, c, x0, y0, z0, phi = (float(v) for v in row)
        cos, sin = math.cos(math.radians(phi)), math.sin(math.radians(phi))
        xr = (x - x0) * cos + (y - y0) * sin
        yr = -(x - x0) * sin + (y - y0) * cos
        inside = (xr / a) ** 2 + (yr / b) ** 2 + ((z - z0) / c) ** 2 <= 1.0
        out = out + value * inside
    return out.to(dtype)


def shepp_logan_3d(
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The modified 3D Shepp–Logan phantom, values in ``[0, 1]``.

    Shape:
        returns ``(D, H, W)``.

    Math:
        :func:`ellipsoid_phantom` with :data:`SHEPP_LOGAN_3D`.
    """
    return ellipsoid_phantom(shape, SHEPP_LOGAN_3D, device=device, dtype=dtype)
