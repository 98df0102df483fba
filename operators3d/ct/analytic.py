"""Classical reconstructions: filtered backprojection (parallel beam) and FDK (cone beam).

Both filter each detector row with a zero-padded ramp (the band-limited Ram–Lak kernel of Kak
& Slaney built in the spatial domain, so the zero frequency is right and a uniform object
reconstructs to its value), optionally windowed, and backproject with the operator's own
voxel-driven backprojector (:meth:`ParallelBeamCT.backproject` with ``method="linear"``,
:meth:`ConeBeamCT.backproject` with ``method="fdk"``), which shares the projector's gather
kernels.
"""

from __future__ import annotations

import math

import torch

from .cone import ConeBeamCT
from .parallel import ParallelBeamCT

__all__ = ["fbp", "fdk", "fdk_filter", "ramp_filter", "filter_rows", "FILTERS"]

#: Windows of the ramp filter.
FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")


def _padded_size(num: int) -> int:
    """The smallest power of two ``≥ 2·num`` (zero padding against wrap-around)."""
    return 1 << max(1, math.ceil(math.log2(2 * num)))


def ramp_filter(
    num: int,
    spacing: float,
    filter: str = "ram-lak",
    *,
    cutoff: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The frequency response (``rfft`` bins) of the windowed ramp for rows of ``num`` samples.

    Shape:
        returns ``(P // 2 + 1,)`` with ``P = _padded_size(num)`` the zero-padded length.

    Math:
        ``h(0) = 1/(4 Δ²)``, ``h(nΔ) = −1/(π n Δ)²`` for odd ``n``, 0 for even ``n``;
        response ``Δ · DFT(h) · window(f / c)`` for ``f ≤ c/2`` and 0 above, ``f`` in cycles
        per sample, ``c`` the cutoff as a fraction of the Nyquist frequency (1: none); windows:
        Ram–Lak 1, Shepp–Logan ``sinc(f)``, cosine ``cos(π f)``, Hann ``(1 + cos(2π f)) / 2``.

    Args:
        num: detector columns of a row; spacing: their pitch.
        filter: the window, one of :data:`FILTERS`.
        cutoff: ``0 < c ≤ 1``: the window is stretched to end at ``c`` times the Nyquist
            frequency, and the response is zero above (a lower cutoff smooths more).
    """
    if filter not in FILTERS:
        raise ValueError(f"ramp_filter: filter must be one of {FILTERS}, got {filter!r}")
    _check_cutoff(cutoff, "ramp_filter")
    size = _padded_size(num)
    n = torch.cat((torch.arange(0, size // 2 + 1), torch.arange(-(size // 2) + 1, 0))).to(
        torch.float64
    )
    h = torch.zeros(size, dtype=torch.float64)
    h[0] = 0.25
    odd = n.remainder(2) == 1
    h[odd] = -1.0 / (math.pi * n[odd]) ** 2
    response = torch.fft.rfft(h).real / spacing  # Δ · (1/Δ²) · DFT(h with Δ = 1)
    f = torch.fft.rfftfreq(size, dtype=torch.float64) / cutoff
    if filter == "shepp-logan":
        response = response * torch.sinc(f)
    elif filter == "cosine":
        response = response * torch.cos(math.pi * f)
    elif filter == "hann":
        response = response * 0.5 * (1 + torch.cos(2 * math.pi * f))
    if cutoff < 1.0:
        response = torch.where(f <= 0.5, response, torch.zeros_like(response))
    return response.to(device=device, dtype=dtype)


def _check_cutoff(cutoff: float, owner: str) -> None:
    if not (isinstance(cutoff, (int, float)) and 0.0 < float(cutoff) <= 1.0):
        raise ValueError(f"{owner}: cutoff must be in (0, 1] (a fraction of Nyquist), got {cutoff!r}")


def filter_rows(p: torch.Tensor, spacing: float, filter: str = "ram-lak", cutoff: float = 1.0) -> torch.Tensor:
    """Rows (the last dim, detector columns of pitch ``spacing``) filtered with the windowed
    ramp of :func:`ramp_filter`, zero-padded against wrap-around; differentiable, any dtype.

    Shape:
        ``(*, U) → (*, U)``.
    """
    num = p.shape[-1]
    response = ramp_filter(num, spacing, filter, cutoff=cutoff, dtype=p.dtype, device=p.device)
    size = _padded_size(num)
    spectrum = torch.fft.rfft(p, n=size, dim=-1)
    return torch.fft.irfft(spectrum * response, n=size, dim=-1)[..., :num]


def fbp(sinogram: torch.Tensor, op: ParallelBeamCT, filter: str = "ram-lak", *,
        cutoff: float = 1.0) -> torch.Tensor:
    """Filtered backprojection for parallel beam.

    Geometry: that of ``op`` (rays along ``(−sin θ, cos θ)``, columns along ``(cos θ, sin θ)``);
    the angles are taken as uniformly spread over ``[0, π)`` (or over a full turn, which gives
    the same weights).

    Shape:
        ``(*batch, D, A, U) → (*batch, D, H, W)``.

    Math:
        ``f(x, y) = (π / A) Σ_θ (p_θ ∗ h)(x cos θ + y sin θ)``, ``h`` the ramp ``|ω|`` zero-padded
        to ``≥ 2U`` times the chosen window, applied along detector columns.

    Args:
        sinogram: float32/float64 parallel-beam data of ``op``.
        op: the :class:`ParallelBeamCT` that measured it.
        filter: ``"ram-lak"``, ``"shepp-logan"``, ``"cosine"`` or ``"hann"``.
        cutoff: the window's end as a fraction of the Nyquist frequency (see
            :func:`ramp_filter`; 1: the plain window).

    Returns a tensor without gradient (a fixed reconstruction of the data).
    """
    if not isinstance(op, ParallelBeamCT):
        raise TypeError(f"fbp: op must be a ParallelBeamCT, got {type(op).__name__}")
    if filter not in FILTERS:
        raise ValueError(f"fbp: filter must be one of {FILTERS}, got {filter!r}")
    _check_cutoff(cutoff, "fbp")
    op.check_input(sinogram, adjoint=True)
    q = filter_rows(sinogram, op.geometry.det_spacing, filter, cutoff)
    return op.backproject(q, method="linear").mul_(math.pi / op.num_angles)


def fdk(sinogram: torch.Tensor, op: ConeBeamCT, filter: str = "ram-lak") -> torch.Tensor:
    """Feldkamp–Davis–Kress reconstruction for circular cone beam (a full turn of angles).

    Geometry: that of ``op``; detector coordinates ``(u, v)`` are scaled to the plane through
    the rotation axis (divided by the magnification ``(src_dist + det_dist) / src_dist``).

    Shape:
        ``(*batch, V, A, U) → (*batch, D, H, W)``.

    Math:
        ``p̃ = p · D / sqrt(D² + u² + v²)`` (``D = src_dist``), ``q = p̃ ∗ h`` along each detector
        row, ``f(r) = (π / A) Σ_θ (D / L_θ(r))² q_θ(u_θ(r), v_θ(r))`` with ``L_θ(r)`` the
        distance from the source to ``r`` along the central ray (Feldkamp, Davis & Kress
        1984); the backprojection is :meth:`ConeBeamCT.backproject` with ``method="fdk"``.

    Args:
        sinogram: float32/float64 cone-beam data of ``op``, angles over ``[0, 2π)``.
        op: the :class:`ConeBeamCT` that measured it.
        filter: ``"ram-lak"``, ``"shepp-logan"``, ``"cosine"`` or ``"hann"``.

    Returns a tensor without gradient (a fixed reconstruction of the data).

    Slabs and windows: the weighting and the ramp filter act on each detector row alone, and
    the backprojection is linear in the rows, so for a D-slab ``s`` of ``op``'s volume and
    windows ``w_k`` that cover ``op.rows_hit_by(s)``,
    ``fdk(y, op)[s] = Σ_k fdk(y[w_k], op.slab(s).rows(w_k))`` (to rounding): an out-of-core
    FDK holds one slab and one block of rows at a time (``pipeline/data/cone.py``).
    """
    _check_fdk(sinogram, op, filter, "fdk")
    q = _fdk_filtered(sinogram, op, filter)
    return op.backproject(q, method="fdk").mul_(math.pi / op.num_angles)


def fdk_filter(sinogram: torch.Tensor, op: ConeBeamCT, filter: str = "ram-lak") -> torch.Tensor:
    """FDK's weighted and ramp-filtered projections ``q`` (what :func:`fdk` backprojects).

    Both steps act on each detector row (and angle) alone, so the rows of a window (or the
    angles of a subset) of ``q`` are ``q`` of those rows (angles): an out-of-core FDK filters
    a block of rows once and backprojects it for every angle subset.

    Shape:
        ``(*batch, V, A, U) → (*batch, V, A, U)``.

    Math:
        ``q = (p · D / sqrt(D² + u² + v²)) ∗ h`` along each row, as in :func:`fdk`;
        ``fdk(p, op) = (π / A) · op.backproject(q, method="fdk")``.
    """
    _check_fdk(sinogram, op, filter, "fdk_filter")
    return _fdk_filtered(sinogram, op, filter)


def _check_fdk(sinogram: torch.Tensor, op: ConeBeamCT, filter: str, owner: str) -> None:
    if not isinstance(op, ConeBeamCT):
        raise TypeError(f"{owner}: op must be a ConeBeamCT, got {type(op).__name__}")
    if filter not in FILTERS:
        raise ValueError(f"{owner}: filter must be one of {FILTERS}, got {filter!r}")
    op.check_input(sinogram, adjoint=True)


def _fdk_filtered(sinogram: torch.Tensor, op: ConeBeamCT, filter: str) -> torch.Tensor:
    g = op.geometry
    num_u = g.det_shape[1]
    du = g.det_spacing[1]
    scale = g.src_dist / (g.src_dist + g.det_dist)  # detector → axis plane
    dtype, device = sinogram.dtype, sinogram.device
    u = (torch.arange(num_u, dtype=torch.float64) - (num_u - 1) / 2) * du * scale
    v = g.row_heights() * scale  # rows of a window where they sit on the whole detector
    src = g.src_dist
    cosine = src / torch.sqrt(src**2 + u[None, :] ** 2 + v[:, None] ** 2)  # (V, U)
    weighted = sinogram * cosine.to(device=device, dtype=dtype)[:, None, :]
    return filter_rows(weighted, du * scale, filter)
