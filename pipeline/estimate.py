"""Reference-free estimates of a reconstruction's image-domain error.

A scan has no reference, so the error ``‖x̂ − x‖²`` of a reconstruction ``x̂ = f(y)`` cannot be
measured; here it is estimated from the measurements, the scan's noise model and the
reconstructor ``f`` itself (which is run again on altered data).

Two quantities are combined (``bootstrap-calibrated cross-validation``):

* **Cross-validation (CV).** A random part ``H`` of the measurements is held out (MRI: k-space
  samples outside the fully sampled centre; CT: whole views), ``f`` reconstructs from the rest,
  and its prediction of the held-out part is compared with the data:
  ``CV = (‖A_H f(y_{−H}) − y_H‖² − Σ_H q v_i) / |H|`` (``v_i`` the noise variance of entry ``i``,
  ``q`` = 2 for complex data), averaged over ``folds`` draws of ``H`` (parallel-beam CT: in
  FBP's ramp metric, which measures a sinogram residual as the image error it stands for; see
  :func:`cross_validation`). Its expectation is the error of ``f`` in directions the
  reconstruction did not see — which is what an undersampled problem's error is made of — but
  for a reconstruction from less data, and (MRI) in the measurement space, so it is
  proportional to the image error rather than equal to it.
* **An equivariant parametric bootstrap** (Tachella & Pereyra, AISTATS 2024) measures that
  proportion: ``x_b = T_b x̃`` (a random in-plane rotation: the scan's signal is assumed
  rotation-invariant in distribution) of a *pilot* ``x̃`` — not the assessed ``x̂`` itself
  (:func:`estimate_pilot`: for parallel-beam CT ``x̂`` given back the detail it lost, in the
  amount the scan's own projections carry, :func:`matched_pilot`; for MRI an undersmoothed
  reconstruction of the same data, :func:`pilot_estimate`) — ``y_b ~ p(y | A x_b)``
  from the scan's noise model, and
  there both the true error ``‖f(y_b) − x_b‖²`` and ``CV(y_b)`` are known. The ratio
  ``c = Σ_b ‖f(y_b) − x_b‖²/n_b / Σ_b CV(y_b)`` turns the scan's own ``CV(y)`` into an image MSE:
  ``MSE ≈ c · CV(y)``.

The bootstrap's own error estimate ``mean_b ‖f(y_b) − x_b‖²`` is reported too (``bootstrap_mse``).
At ``x_b = T_b x̂`` it is optimistic (by 1.2–4.4 dB on the held-out family): ``x̂`` lacks the detail
the reconstruction lost, which ``x`` has, and even the ratio at such a smooth ``x_b`` was 1–3 dB
off for CT. A pilot that keeps that detail fixes it: the undersmoothed SENSE keeps every MRI
estimate tried within 1 dB; for CT the undersmoothed (Ram–Lak) FBP was right near 60 views at
I₀ 10⁴ but 2–3.6 dB off at other doses and view counts (its noise stands in for the missing
detail only where the two happen to be of a size), which the power-matched pilot brings to 1 case
in 29 over 2 dB (BENCHMARKS.md). The estimate is of the error of the complex image for
MRI (an upper bound of the magnitude's error, which ``recon3d evaluate`` reports).

The estimate of a written output (``recon3d evaluate --estimate``) is in
:mod:`pipeline.reconstruct.estimate_output`; the per-voxel uncertainty maps of
``reconstruct --uncertainty`` in :mod:`pipeline.reconstruct.uncertainty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["ErrorEstimate", "Part", "cross_validation", "estimate_error", "holdout_parts", "holdout_splits",
           "pilot_estimate", "matched_pilot", "estimate_pilot", "HANDLED_NOISE", "not_estimable_detector"]

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


@dataclass
class Part:
    """One held-out part, independent of the data: the operator of the rest, which measurement
    entries it holds out, and how to take the rest from any ``y`` of the scan's operator — so
    the scan and every bootstrap draw can be cross-validated on the *same* parts."""

    op: Any
    held: torch.Tensor  # a bool mask broadcastable to y (True: held out)
    rest: torch.Tensor | None  # CT: the kept view indices; MRI: None (the held entries are zeroed)

    def split(self, y: torch.Tensor) -> Split:
        held = torch.broadcast_to(self.held.to(y.device), y.shape)
        if self.rest is None:
            return Split(self.op, y * (~held), held)
        return Split(self.op, y.index_select(-2, self.rest.to(y.device)), held)


def holdout_parts(op, shape: tuple[int, ...], *, fraction: float, folds: int,
                  generator: torch.Generator) -> list[Part]:
    """``folds`` random held-out parts of about ``fraction`` of the measurements of ``op``
    (measurement shape ``shape``).

    MRI (``MultiCoilMRI``): sampled k-space positions outside the fully sampled centre (every
    coil and D-slice of a position together). Parallel-beam CT (measurements ``(d, A, U)``):
    whole views, at least one.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"holdout_splits: fraction must lie in (0, 1), got {fraction}")
    if folds < 1:
        raise ValueError(f"holdout_splits: folds must be >= 1, got {folds}")
    out: list[Part] = []
    if _is_mri(op):
        from pipeline.losses.ssdu import calibration_size

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
            out.append(Part(op.restrict_measurements((~held).to(op.mask.device)), held, None))
        return out
    angles = int(shape[-2])
    count = max(1, int(round(fraction * angles)))
    if count >= angles:
        raise ValueError(f"holdout_splits: {angles} views leave none to reconstruct from")
    for _ in range(folds):
        perm = torch.randperm(angles, generator=generator)
        held_idx, rest = perm[:count].sort().values, perm[count:].sort().values
        held = torch.zeros(shape[-2:], dtype=torch.bool)
        held[held_idx, :] = True
        out.append(Part(op.restrict_angles(rest), held, rest))
    return out


def holdout_splits(y: torch.Tensor, op, *, fraction: float, folds: int, generator: torch.Generator) -> list[Split]:
    """:func:`holdout_parts` applied to ``y``."""
    return [p.split(y) for p in holdout_parts(op, tuple(y.shape), fraction=fraction, folds=folds, generator=generator)]


def _held_metric(op):
    """The metric of the held-out residual: FBP's ramp metric for parallel-beam CT (its norm is
    the image-domain norm, :class:`~pipeline.models.physics.ImageMetric`), else ``None`` (the
    plain squared error per entry)."""
    from pipeline.models.physics import ImageMetric

    return ImageMetric(op) if op.kind == "parallel" else None


def cross_validation(y: torch.Tensor, op, noise, f: Reconstructor, *, fraction: float = 0.1, folds: int = 4,
                     generator: torch.Generator | None = None, parts: list[Part] | None = None) -> list[float]:
    """``CV`` of each fold: the noise-debiased prediction error of the held-out measurements.

    MRI (and any operator without an image metric): the squared error per held-out entry,
    ``(‖A_H x̂_{−H} − y_H‖² − q Σ_H v_i) / |H|``. Parallel-beam CT: the held-out views' residual
    in FBP's ramp metric ``M``, scaled from the held-out to all views,
    ``(⟨r_H, M r_H⟩ − M_ii Σ_H v_i) · A / (|H| n)`` — the image-domain error (per voxel) of the
    reconstruction from the other views, seen along the held-out directions. The plain
    measurement error weighs detector frequencies by the projector's falling singular values and
    barely sees the high-frequency error that FBP-type reconstructions are judged by; the ramp
    metric cut the CT estimate's bias from +2.4–3.1 dB to −0.8–+2.0 dB on the held-out family
    (BENCHMARKS.md). ``parts`` (from :func:`holdout_parts`) fixes the held-out parts; else
    ``folds`` parts are drawn from ``generator``.
    """
    if parts is None:
        if generator is None:
            raise ValueError("cross_validation: give parts or a generator")
        parts = holdout_parts(op, tuple(y.shape), fraction=fraction, folds=folds, generator=generator)
    real_parts = 2 if y.is_complex() else 1
    metric = _held_metric(op)
    values = []
    for split in (p.split(y) for p in parts):
        x = f(split.y, split.op)
        pred = op(x)
        variance = noise.variance(pred.detach()) * split.held
        if metric is None:
            r = (pred - y)[split.held]
            energy = float(r.abs().double().square().sum())
            values.append((energy - float(variance.double().sum()) * real_parts) / int(split.held.sum()))
        else:
            r = (pred - y) * split.held
            views = int(y.shape[-2])
            held_views = int(split.held.reshape(-1, *y.shape[-2:])[0, :, 0].sum())
            energy = float((r.double() * metric(r.double())).sum()) - metric.diagonal * float(variance.double().sum())
            values.append(energy * views / held_views / x.numel())
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


def pilot_estimate(y: torch.Tensor, op) -> torch.Tensor:
    """The bootstrap world's truth: an *undersmoothed* reconstruction of the scan, whatever
    method is being assessed — the unregularised least-squares estimate the data support
    (parallel-beam CT: Ram–Lak FBP at full band; MRI: SENSE without regularisation, 10 CG
    iterations from zero, slice by slice). Slice-local, so a slab's pilot is the whole volume's. It keeps the detail the data carry, and its noise stands in for the
    detail they do not, so a method's error (and its ratio to CV) at the pilot is close to the
    error at the object; at the method's own smooth output it is not (optimistic by 1–4 dB,
    BENCHMARKS.md). The principle is the undersmoothed pilot of bias-corrected bootstrap
    intervals (Hall, Ann. Stat. 1992). The uncertainty maps use it for every scan; the error
    estimate of a parallel-beam CT scan uses :func:`matched_pilot` (:func:`estimate_pilot`)."""
    if _is_mri(op):
        from operators3d import MultiCoilMRI, sense_cg

        def one(k: int) -> torch.Tensor:  # slice by slice: CG over a slab would couple its slices
            maps = op.coil_maps
            sub = (MultiCoilMRI(mask=op.mask, coil_maps=maps.narrow(-3, k, 1)) if maps is not None else
                   MultiCoilMRI(mask=op.mask, volume_shape=(1, *op.domain_shape[-2:]), dtype=y.dtype))
            return sense_cg(y.narrow(-3, k, 1), sub, l2_weight=0.0, num_iters=10)

        return torch.cat([one(k) for k in range(int(y.shape[-3]))], dim=-3)
    if op.kind == "parallel":
        from pipeline.classical import fbp_slab

        return fbp_slab(y, op, filter="ram-lak", cutoff=1.0)
    return op.adjoint(y)


def _detector_power(p: torch.Tensor) -> torch.Tensor:
    """The mean power of a sinogram per detector frequency (``rfft`` bin), over slices and views."""
    return torch.fft.rfft(p.double(), dim=-1).abs().square().reshape(-1, p.shape[-1] // 2 + 1).mean(dim=0)


def _midway_angles(angles: torch.Tensor) -> torch.Tensor:
    """The angles halfway between neighbouring views of a parallel-beam scan (period π)."""
    a = torch.sort(torch.remainder(angles.double(), math.pi)).values
    return (a + torch.cat([a[1:], a[:1] + math.pi])) / 2


def matched_pilot(y: torch.Tensor, op, noise, x_hat: torch.Tensor, *, iterations: int = 2,
                  max_gain: float = 4.0) -> torch.Tensor:
    """The pilot of a parallel-beam CT error estimate: ``x̂`` given back the detail it lost, in
    the amount the scan's own data say the object has.

    By the Fourier slice theorem the measured projections carry the object's power spectrum,
    radially: after the noise power is taken off (``U·mean(v)`` per ``rfft`` bin of white
    noise), ``S_y(ω)`` is what a detail of that frequency weighs in the object. ``x̂`` is
    filtered radially, ``P(k) ← P(k)·w(k)``, so that its projections *midway between the
    measured views* carry ``S_y`` (``w = sqrt(S_y / S_mid)``, at most ``max_gain``, the mean
    kept; ``iterations`` rounds). Unlike the Ram–Lak pilot (:func:`pilot_estimate`), whose noise
    stands in for the missing detail and so matches it only near the dose and view count the
    estimate was first tuned at, this pilot carries the measured amount at any dose and view
    count: on a third fresh set of 8 CT scans (20–180 views, I₀ 10³–10⁵, chosen before it was
    run) it brought the estimate's |error| from median 0.79 / worst 2.72 dB (Ram–Lak pilot) to
    0.43 / 1.87 (BENCHMARKS.md). Other operators (and restricted CT operators): the
    undersmoothed :func:`pilot_estimate`.

    Shape:
        ``y``: ``(D, A, U)``, ``x_hat``: ``(D, H, W)`` → ``(D, H, W)``.
    """
    if op.kind != "parallel" or not hasattr(op, "geometry"):
        return pilot_estimate(y, op)
    from operators3d.ct import ParallelBeamCT

    geom = op.geometry
    mid = ParallelBeamCT(volume_shape=op.domain_shape, angles=_midway_angles(op.angles), det_count=geom.det_count,
                         voxel_size=float(op.volume_geometry.voxel_size), det_spacing=float(geom.det_spacing),
                         allow_truncation=op.allow_truncation).to(y.device)
    columns = int(y.shape[-1])
    signal = (_detector_power(y) - float(noise.variance(y).double().mean()) * columns).clamp_min(0.0)
    h, w = x_hat.shape[-2:]
    ky = torch.fft.fftfreq(h, dtype=torch.float64, device=y.device)
    kx = torch.fft.fftfreq(w, dtype=torch.float64, device=y.device)
    # image frequency k (cycles/voxel) meets detector frequency k·Δu/Δx (cycles/column)
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) * float(geom.det_spacing) / float(
        op.volume_geometry.voxel_size)
    omega = torch.fft.rfftfreq(columns, dtype=torch.float64, device=y.device)
    p = x_hat.detach().double()
    for _ in range(int(iterations)):
        gain = torch.sqrt(signal / _detector_power(mid(p.to(y.dtype))).clamp_min(1e-30)).clamp(0.0, max_gain)
        gain[0] = 1.0
        # linear interpolation of the gain at each image frequency (the last bin beyond Nyquist)
        pos = (radius / omega[1]).clamp(max=len(omega) - 1)
        lo = pos.floor().long().clamp(max=len(omega) - 2)
        t = pos - lo
        filt = gain[lo] * (1 - t) + gain[lo + 1] * t
        p = torch.fft.ifft2(torch.fft.fft2(p) * filt).real
    return p.to(x_hat.dtype)


def estimate_pilot(y: torch.Tensor, op, noise, x_hat: torch.Tensor) -> torch.Tensor:
    """The pilot ``recon3d evaluate --estimate`` (and ``validation.estimate``) calibrates with:
    :func:`matched_pilot` for parallel-beam CT, the undersmoothed :func:`pilot_estimate` else."""
    return matched_pilot(y, op, noise, x_hat)


def estimate_error(y: torch.Tensor, op, noise, f: Reconstructor, *, x_hat: torch.Tensor | None = None,
                   draws: int = 4, folds: int = 4, fraction: float = 0.1, seed: int = 0,
                   pilot: torch.Tensor | None = None,
                   say: Callable[[str], None] = lambda _: None) -> ErrorEstimate:
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
        pilot: the bootstrap world's truth (default ``x_hat``); :func:`pilot_estimate` gives
            the undersmoothed one the estimate is calibrated with.
    """
    if draws < 2:
        raise ValueError(f"estimate_error: draws must be >= 2 (the interval needs a spread), got {draws}")
    g = torch.Generator().manual_seed(int(seed))
    x_hat = f(y, op) if x_hat is None else x_hat
    # The same held-out parts for the scan and every draw: which measurements a part holds out
    # changes CV by ±1 dB (CT), and the ratio cancels it only when both sides share the parts.
    parts = holdout_parts(op, tuple(y.shape), fraction=fraction, folds=folds, generator=g)
    cv = cross_validation(y, op, noise, f, parts=parts)
    cv_mean = sum(cv) / len(cv)
    true, cvs, per_fold = [], [], []
    mask = op.measurement_mask()
    for b in range(draws):
        t = _rotation(g)
        xb = t(x_hat if pilot is None else pilot)
        inside = t(torch.ones(x_hat.shape[-3:], dtype=x_hat.real.dtype, device=x_hat.device)) > 0.999
        clean = op(xb)
        yb = noise.sample(clean, generator=g, mask=mask)
        err = (f(yb, op) - xb).abs().double().square()
        true.append(float(err[..., inside].mean()))
        per_fold.append(cross_validation(yb, op, noise, f, parts=parts))
        cvs.append(sum(per_fold[-1]) / folds)
        say(f"  bootstrap draw {b + 1}/{draws}: error {true[-1]:.3g}, CV {cvs[-1]:.3g}")
    ratio = sum(true) / max(sum(cvs), 1e-30)
    ratios = [t / max(c, 1e-30) for t, c in zip(true, cvs)]
    # each part's own estimate (its CV on the scan times its own ratio): their spread is what
    # the choice of parts leaves after the shared parts cancelled most of it
    by_part = [cv[k] * sum(true) / max(sum(d[k] for d in per_fold), 1e-30) for k in range(folds)]
    # the interval: the ratio's spread over draws (a t-interval of the mean at ~90 %) and the
    # per-part estimates' spread, combined in relative terms
    def rel_sd(values: list[float]) -> float:
        m = sum(values) / len(values)
        if len(values) < 2 or m <= 0:
            return 0.0
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) / m / math.sqrt(len(values))

    spread = 1.645 * math.sqrt(rel_sd(ratios) ** 2 + rel_sd(by_part) ** 2)
    mse = max(ratio * cv_mean, 1e-30)
    return ErrorEstimate(mse=mse, mse_low=mse * math.exp(-spread), mse_high=mse * math.exp(spread),
                         bootstrap_mse=sum(true) / len(true), cv=cv_mean, ratio=ratio, ratios=ratios,
                         draws=draws, folds=folds, fraction=fraction, seed=int(seed))


#: The mean of a CT image outside the slices' inscribed circle, over its mean inside, above which
#: the object is taken to cross the field of view (docs/estimate.md, "Cautions").
OUTSIDE_RATIO_CAUTION = 0.1


def outside_ratio(x_hat: torch.Tensor) -> float:
    """The mean of ``x̂`` outside the inscribed circle of its ``(H, W)`` slices over its mean inside.

    The bootstrap's rotations keep only that circle, so an object that reaches outside it (cut by
    the field of view) is assessed on part of itself. Attenuation is non-negative and noise
    averages out: on 10 simulated CT scans (Ram–Lak FBP, 36–150 views, I₀ 10³–10⁵) the ratio was
    within ±0.004 for objects inside the field of view and 0.37–0.98 for objects cut by it.
    """
    h, w = x_hat.shape[-2:]
    yy = torch.arange(h, dtype=torch.float64, device=x_hat.device) - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float64, device=x_hat.device) - (w - 1) / 2
    disc = yy[:, None].square() + xx[None, :].square() <= ((min(h, w) - 1) / 2) ** 2
    values = x_hat.real.double() if x_hat.is_complex() else x_hat.double()
    inside = float(values[..., disc].mean())
    if disc.all() or not inside > 0:
        return 0.0
    return float(values[..., ~disc].mean()) / inside


# ----------------------------------------------------------------------------- noise models
#: Noise models the estimate re-measures with and debiases by (the others are refused).
HANDLED_NOISE = ("gaussian", "transmission_poisson")


def not_estimable_detector(metadata) -> str | None:
    """Why a scan read through a non-linear detector (its ``detector`` record) cannot be
    estimated, or ``None``: cross-validation scores held-out measurements against ``A x̂`` and
    the bootstrap re-measures ``A x̂`` plus noise, both of which assume ``y = A x + n``."""
    detector = getattr(metadata, "detector", None)
    if detector is None:
        return None
    return (f"its measurements went through a non-linear detector ({detector.get('model')}), and the estimate "
            "scores held-out measurements against A x and re-measures A x plus noise, which assumes linear "
            "measurements")
