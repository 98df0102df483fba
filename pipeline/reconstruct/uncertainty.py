"""Per-voxel uncertainty maps from equivariant-bootstrap draws (``reconstruct --uncertainty N``).

:func:`bootstrap_uncertainty` re-measures rotated copies of a pilot with the scan's noise model
and reconstructs them again; every draw is seeded by ``(seed, draw, slice)`` alone
(:func:`draw_rotation`, slab-exact Poisson re-measurement), so a slab's map equals the whole
volume's. The error estimate it shares its bootstrap with is in
:mod:`pipeline.estimate`.
"""

from __future__ import annotations

import math

import torch

from pipeline.estimate import Reconstructor, pilot_estimate

__all__ = ["bootstrap_uncertainty", "draw_rotation"]


def _seeded(*keys: int) -> torch.Generator:
    """A generator seeded by ``keys`` alone (the same for every slab, rank and rerun)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


def draw_rotation(seed: int, draw: int):
    """The in-plane rotation of bootstrap draw ``draw``: the same for every slab of a volume."""
    from operators3d.transforms import Rotate

    angle = float(torch.rand((), generator=_seeded(seed, draw), dtype=torch.float64)) * 2.0 * math.pi
    return Rotate(angle, plane=("H", "W"))


def _poisson_quantile(rate: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Poisson counts by inversion of the CDF at uniforms ``u``: exact below a rate of 30 (the
    CDF summed term by term), the Cornish–Fisher quantile ``λ + √λ z + (z² − 1)/6`` above (error
    in the counts' skewness ``O(λ^{-1})``). Unlike ``torch.poisson`` — whose rejection sampler
    consumes a varying number of random numbers, so a rate changed by float rounding changes
    every later sample — a count here changes only when ``u`` sits on a CDF step."""
    rate = rate.double()
    u = u.double().clamp(1e-12, 1 - 1e-12)
    counts = torch.empty_like(rate)
    small = rate < 30
    if small.any():
        lam = rate[small]
        term = torch.exp(-lam)
        cdf = term.clone()
        n = torch.zeros_like(lam)
        us = u[small]
        for k in range(1, 100):
            n += (cdf < us).double()
            term = term * lam / k
            cdf = cdf + term
        counts[small] = n
    big = ~small
    if big.any():
        lam = rate[big]
        z = torch.special.ndtri(u[big])
        counts[big] = torch.floor(lam + lam.sqrt() * z + (z * z - 1) / 6 + 0.5).clamp_min(0)
    return counts


def _remeasure(noise, clean: torch.Tensor, generator: torch.Generator, mask) -> torch.Tensor:
    """A noisy copy of ``clean`` whose values move continuously with ``clean`` (for slab-exact
    draws): transmission noise by CDF inversion, Gaussian noise as it is (its draws do not
    depend on ``clean``); other models by their own sampler."""
    if getattr(noise, "kind", None) == "transmission_poisson":
        i0 = float(noise.photons)
        u = torch.rand(clean.shape, generator=generator, dtype=torch.float64)
        counts = _poisson_quantile(i0 * torch.exp(-clean.detach().double()), u).clamp_min(1.0)
        noisy = (-torch.log(counts / i0)).to(clean.dtype)
        return noisy if mask is None else torch.where(torch.broadcast_to(mask, clean.shape) != 0, noisy, clean)
    return noise.sample(clean, generator=generator, mask=mask)


def bootstrap_uncertainty(y: torch.Tensor, op, noise, f: Reconstructor, *, draws: int, seed: int = 0,
                          start: int = 0, pilot: torch.Tensor | None = None) -> torch.Tensor:
    """A per-voxel uncertainty of ``f`` on ``(y, op)`` from ``draws`` equivariant-bootstrap draws.

    Draw ``b``: ``x_b = T_b x̃`` (``T_b`` a random in-plane rotation, ``x̃`` the undersmoothed
    :func:`pilot_estimate`), ``y_b`` measured from ``x_b`` with the scan's noise model,
    ``|e_b|² = T_b⁻¹|f(y_b) − x_b|²`` the reconstruction's squared error brought back to the
    scan's frame. Returns ``sqrt(mean_b |e_b|²)`` per voxel — the bootstrap's root-mean-square error, bias
    included (complex images: of the complex value). Voxels that every draw rotated out of the
    field of view (corners) get their slice's RMS over its valid voxels.

    Slab-wise equals whole-volume: the rotation of a draw depends on ``(seed, b)`` only, the
    noise of each D-slice on ``(seed, b, start + k)`` only, and the pilot is slice-local, so a
    slab (``start`` its first slice) gets the whole volume's values wherever ``f`` does.
    """
    import copy

    if draws < 1:
        raise ValueError(f"bootstrap_uncertainty: draws must be >= 1, got {draws}")
    # Transmission noise: the bootstrap world in float64, so a slab's pilot and re-projections
    # equal the whole volume's to ~1e-16 and no Poisson count sits on the other side of a CDF
    # step (float32 rounding moved about one count in 10⁵ and broke slab-wise = whole-volume).
    # Gaussian draws do not depend on the clean values: the scan's precision is kept (memory).
    exact = getattr(noise, "kind", None) == "transmission_poisson"  # Gaussian draws ignore rounding
    op64 = copy.deepcopy(op).double() if exact else op
    wide = (torch.complex128 if y.is_complex() else torch.float64) if exact else y.dtype
    pilot = pilot_estimate(y.to(wide), op64) if pilot is None else pilot.to(wide)
    mask = op.measurement_mask()
    space = pilot.shape[-3:]
    total = torch.zeros(space, dtype=torch.float64, device=pilot.device)
    count = torch.zeros(space, dtype=torch.float64, device=pilot.device)
    ones = torch.ones(space, dtype=torch.float64, device=pilot.device)
    for b in range(draws):
        t = draw_rotation(seed, b)
        back = t.inverse()
        xb = t(pilot)
        clean = op64(xb)
        yb = torch.empty_like(clean)
        for k in range(int(clean.shape[-3])):
            part = clean.narrow(-3, k, 1)
            yb.narrow(-3, k, 1).copy_(_remeasure(noise, part, _seeded(seed, b, start + k), mask))
        del clean
        x_rec = f(yb.to(y.dtype), op)
        # the squared error brought back, not the error: rotating the error interpolates it, and
        # averaging neighbours of a noise-like error would shrink its variance (2-3× for FBP)
        err = back((x_rec.to(wide) - xb).abs().square())
        valid = (back(t(ones)) > 0.999).double()
        total += err.reshape(space) * valid
        count += valid
        del yb, err, x_rec
    # corners no draw kept: their slice's RMS (per slice, so a slab's equals the whole volume's)
    fill = (total.sum(dim=(-2, -1), keepdim=True) / count.sum(dim=(-2, -1), keepdim=True).clamp_min(1)).sqrt()
    rms = torch.where(count > 0, (total / count.clamp_min(1)).sqrt(), fill.expand_as(total))
    return rms.to(torch.float32)
