"""Reference-free estimates of a reconstruction's image-domain error.

A scan has no reference, so the error ``‖x̂ − x‖²`` of a reconstruction ``x̂ = f(y)`` cannot be
measured; here it is estimated from the measurements, the scan's noise model and the
reconstructor ``f`` itself (which is run again on altered data).

Two quantities are combined (``bootstrap-calibrated cross-validation``):

* **Cross-validation (CV).** A random part ``H`` of the measurements is held out (MRI: k-space
  samples outside the fully sampled centre; CT: whole views), ``f`` reconstructs from the rest,
  and its prediction of the held-out part is compared with the data:
  ``CV = (‖A_H f(y_{−H}) − y_H‖² − Σ_H q v_i) / |H|`` (``v_i`` the noise variance of entry ``i``,
  ``q`` = 2 for complex data), averaged over ``folds`` draws of ``H``. Its expectation is the
  error of ``f`` in directions the reconstruction did not see — which is what an undersampled
  problem's error is made of — but in the measurement space and for a reconstruction from less
  data, so it is proportional to the image error rather than equal to it.
* **An equivariant parametric bootstrap** (Tachella & Pereyra, AISTATS 2024) measures that
  proportion: ``x_b = T_b x̂`` (a random in-plane rotation: the scan's signal is assumed
  rotation-invariant in distribution), ``y_b ~ p(y | A x_b)`` from the scan's noise model, and
  there both the true error ``‖f(y_b) − x_b‖²`` and ``CV(y_b)`` are known. The ratio
  ``c = Σ_b ‖f(y_b) − x_b‖²/n_b / Σ_b CV(y_b)`` turns the scan's own ``CV(y)`` into an image MSE:
  ``MSE ≈ c · CV(y)``.

The bootstrap's own error estimate ``mean_b ‖f(y_b) − x_b‖²`` is reported too (``bootstrap_mse``):
it is optimistic, since ``x̂`` lacks the detail the reconstruction lost, which ``x`` has. A ratio
of two quantities computed at the same smooth ``x_b`` is much less affected (figures in
BENCHMARKS.md). The estimate is of the error of the complex image for MRI (an upper bound of
the magnitude's error, which ``recon3d evaluate`` reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["ErrorEstimate", "cross_validation", "estimate_error", "holdout_splits"]

Reconstructor = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class Split:
    """One held-out part: the operator and data of the rest, and how to score the held-out part."""

    op: Any
    y: torch.Tensor
    held: torch.Tensor  # a bool mask on y (True: held out)


def _is_mri(op) -> bool:
    from operators3d import MultiCoilMRI

    return isinstance(op, MultiCoilMRI)


def holdout_splits(y: torch.Tensor, op, *, fraction: float, folds: int, generator: torch.Generator) -> list[Split]:
    """``folds`` random held-out parts of about ``fraction`` of the measurements.

    MRI (``MultiCoilMRI``): sampled k-space positions outside the fully sampled centre (every
    coil and D-slice of a position together). Parallel-beam CT (measurements ``(d, A, U)``):
    whole views, at least one.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_splits: fraction must lie in (0, 1), got {fraction}")
    if folds < 1:
        raise ValueError(f"holdout_splits: folds must be >= 1, got {folds}")
    out: list[Split] = []
    if _is_mri(op):
        from pipeline.losses.splitting import calibration_size
        from pipeline.models.physics import restrict_measurements

        mask = op.mask.bool().cpu()
        centre = torch.zeros_like(mask)
        size = calibration_size(mask)
        if all(size):
            centre[tuple(slice(n // 2 - c // 2, n // 2 - c // 2 + c) for n, c in zip(mask.shape, size))] = True
        candidates = mask & ~centre
        if int(candidates.sum()) < 2:
            raise ValueError("holdout_splits: the k-space mask has no samples outside its fully sampled centre")
        for _ in range(folds):
            held = candidates & (torch.rand(mask.shape, generator=generator) < fraction)
            if not held.any():
                held = candidates & (torch.rand(mask.shape, generator=generator) < 2 * fraction)
            keep = ~held
            sub = restrict_measurements(op, keep.to(op.mask.device))
            out.append(Split(sub, y * keep.to(y.device), torch.broadcast_to(held.to(y.device), y.shape)))
        return out
    from pipeline.models.physics import restrict_angles

    angles = int(y.shape[-2])
    count = max(1, int(round(fraction * angles)))
    if count >= angles:
        raise ValueError(f"holdout_splits: {angles} views leave none to reconstruct from")
    for _ in range(folds):
        perm = torch.randperm(angles, generator=generator)
        held_idx, rest = perm[:count].sort().values, perm[count:].sort().values
        held = torch.zeros(y.shape, dtype=torch.bool, device=y.device)
        held[..., held_idx.to(y.device), :] = True
        out.append(Split(restrict_angles(op, rest), y.index_select(-2, rest.to(y.device)), held))
    return out


def cross_validation(y: torch.Tensor, op, noise, f: Reconstructor, *, fraction: float, folds: int,
                     generator: torch.Generator) -> list[float]:
    """``CV`` of each fold: the noise-debiased squared prediction error per held-out entry."""
    parts = 2 if y.is_complex() else 1
    values = []
    for split in holdout_splits(y, op, fraction=fraction, folds=folds, generator=generator):
        x = f(split.y, split.op)
        pred = op(x)
        r = (pred - y)[split.held]
        noise_energy = float(noise.variance(pred.detach())[split.held].double().sum()) * parts
        values.append((float(r.abs().double().square().sum()) - noise_energy) / int(split.held.sum()))
    return values


@dataclass
class ErrorEstimate:
    """An estimated image MSE with an interval (from the bootstrap draws' spread)."""

    mse: float
    mse_low: float
    mse_high: float
    bootstrap_mse: float
    cv: float
    ratio: float
    ratios: list[float]
    draws: int
    folds: int
    fraction: float
    seed: int
    estimator: str = "bootstrap-calibrated cross-validation"

    def psnr(self, peak: float) -> dict[str, float]:
        """``estimated_psnr`` and its interval for a data range ``peak`` (low PSNR = high MSE)."""
        db = lambda m: 10.0 * math.log10(peak * peak / max(m, 1e-30))  # noqa: E731
        return {"estimated_psnr": db(self.mse), "estimated_psnr_low": db(self.mse_high),
                "estimated_psnr_high": db(self.mse_low)}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("estimator", "mse", "mse_low", "mse_high", "bootstrap_mse", "cv",
                                              "ratio", "ratios", "draws", "folds", "fraction", "seed")}


def _rotation(generator: torch.Generator):
    from operators3d.transforms import Rotate

    angle = float(torch.rand((), generator=generator, dtype=torch.float64)) * 2.0 * math.pi
    return Rotate(angle, plane=("H", "W"))


def estimate_error(y: torch.Tensor, op, noise, f: Reconstructor, *, x_hat: torch.Tensor | None = None,
                   draws: int = 4, folds: int = 4, fraction: float = 0.1, seed: int = 0,
                   nonnegative: bool = False, say: Callable[[str], None] = lambda _: None) -> ErrorEstimate:
    """Estimate ``mean |f(y) − x|²`` (per voxel) without ``x``; see the module docstring.

    Args:
        y, op: the measurements and their operator (one slab).
        noise: the scan's noise model (``sample`` and ``variance`` are used).
        f: the reconstructor ``f(y, op) → x̂`` (any operator of the scan's kind: fewer views,
            another k-space mask).
        x_hat: ``f(y, op)`` if already computed.
        draws: bootstrap draws (each costs ``1 + folds`` reconstructions).
        folds: held-out parts per CV.
        fraction: share of the measurements held out per part.
        seed: the seed of every random choice (rotations, noise, held-out parts).
        nonnegative: clamp the transformed estimate at 0 (attenuation images).
    """
    if draws < 2:
        raise ValueError(f"estimate_error: draws must be >= 2 (the interval needs a spread), got {draws}")
    g = torch.Generator().manual_seed(int(seed))
    x_hat = f(y, op) if x_hat is None else x_hat
    cv = cross_validation(y, op, noise, f, fraction=fraction, folds=folds, generator=g)
    cv_mean = sum(cv) / len(cv)
    from pipeline.models.physics import measurement_mask

    true, cvs = [], []
    mask = measurement_mask(op)
    for b in range(draws):
        t = _rotation(g)
        xb = t(x_hat)
        inside = t(torch.ones(x_hat.shape[-3:], dtype=x_hat.real.dtype, device=x_hat.device)) > 0.999
        if nonnegative:
            xb = xb.clamp_min(0)
        clean = op(xb)
        yb = noise.sample(clean, generator=g, mask=mask)
        err = (f(yb, op) - xb).abs().double().square()
        true.append(float(err[..., inside].mean()))
        cvs.append(sum(cross_validation(yb, op, noise, f, fraction=fraction, folds=folds, generator=g)) / folds)
        say(f"  bootstrap draw {b + 1}/{draws}: error {true[-1]:.3g}, CV {cvs[-1]:.3g}")
    ratio = sum(true) / max(sum(cvs), 1e-30)
    ratios = [t / max(c, 1e-30) for t, c in zip(true, cvs)]
    # the interval: the ratio's spread over draws (a t-interval of the mean at ~90 %) and the
    # CV's spread over folds, combined in relative terms
    def rel_sd(values: list[float]) -> float:
        m = sum(values) / len(values)
        if len(values) < 2 or m <= 0:
            return 0.0
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) / m / math.sqrt(len(values))

    spread = 1.645 * math.sqrt(rel_sd(ratios) ** 2 + rel_sd(cv) ** 2)
    mse = max(ratio * cv_mean, 1e-30)
    return ErrorEstimate(mse=mse, mse_low=mse * math.exp(-spread), mse_high=mse * math.exp(spread),
                         bootstrap_mse=sum(true) / len(true), cv=cv_mean, ratio=ratio, ratios=ratios,
                         draws=draws, folds=folds, fraction=fraction, seed=int(seed))
