"""Stein's unbiased risk estimate in measurement space: Gaussian (SURE), Poisson and
Poisson–Gaussian (PURE / PG-URE), with a Monte-Carlo divergence.

Stein, "Estimation of the mean of a multivariate normal distribution", Ann. Stat. 1981;
Ramani, Blu & Unser, "Monte-Carlo SURE", IEEE TIP 2008; Le Montagner, Angelini &
Olivo-Marin, "An unbiased risk estimator for image denoising in the presence of mixed
Poisson–Gaussian noise", IEEE TIP 2014.

With ``h(y) = A f(y, A)`` and a probe ``b``, the divergence term
``bᵀ(h(y + τb) − h(y))/τ = Re⟨Aᴴb, f(y + τb) − f(y)⟩/τ`` is evaluated in image space, so the
second pass never materialises a second measurement-sized tensor; the probe is drawn from the
loss's generator (seeded) and is zero on entries that are not measurements.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from operators3d import GaussianNoise, NoiseModel, PoissonGaussianNoise, PoissonNoise, TransmissionNoise
from operators3d.nonlinear import at_clip_levels
from pipeline.models.physics import ImageMetric

from .base import Loss, LossOutput, squared_residual
from .detector import detector_model

__all__ = ["SureGaussianLoss", "SurePoissonLoss"]


def _real_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Re⟨a, b⟩`` over all entries."""
    if a.is_complex() or b.is_complex():
        return (a.conj() * b).real.sum() if a.is_complex() else (a * b.real).sum()
    return (a * b).sum()


def _tau(y: torch.Tensor, mask: torch.Tensor | None, tau: float | None, tau_rel: float) -> float:
    """``τ``: given, or ``tau_rel`` times the RMS of the measured entries of ``y``."""
    if tau is not None:
        return tau
    with torch.no_grad():
        sq = y.abs().pow(2)
        if mask is not None:
            sq = sq * mask
            count = float(torch.broadcast_to(mask, y.shape).sum())
        else:
            count = float(y.numel())
        rms = (float(sq.sum()) / max(count, 1.0)) ** 0.5
    return tau_rel * rms if rms > 0 else tau_rel


def _divergence(model, y_pert, op, x_hat, back, tau) -> torch.Tensor:
    """``Re⟨Aᴴ w, f(y + τ b) − f(y)⟩ / τ`` with ``back = Aᴴ w`` (w the weighted probe)."""
    x_pert = model(y_pert, op)
    if not x_hat.is_complex() and back.is_complex():
        back = back.real
    return _real_inner(back, x_pert - x_hat) / tau


def _output(name: str, value, residual, divergence) -> LossOutput:
    """The SURE value with its residual and divergence terms as logged parts."""
    return LossOutput(
        value,
        {
            name: value.detach(),
            f"{name}.residual": residual.detach(),
            f"{name}.divergence": divergence.detach(),
        },
    )


def _probe_parts(y, op, probe, weighted, tau):
    """``y + τ b`` and ``Aᴴ w``, so that the probe itself need not outlive the second pass."""
    with torch.no_grad():
        back = op.adjoint(weighted)
        y_pert = y + tau * probe
    return y_pert, back


class SureGaussianLoss(Loss):
    """SURE for Gaussian noise, with a Monte-Carlo divergence (seeded Gaussian probe).

    An unbiased estimate of the measurement-domain MSE ``‖h(y) − A x‖²/m`` from noisy data
    alone, for any (weakly differentiable) reconstructor. Complex entries with variance ``σ²``
    on the real and on the imaginary part count as two real entries each.

    Heteroscedastic noise: with ``noise_model=TransmissionNoise(I₀)`` (CT line integrals after
    ``−log``, variance ``v = e^{p}/I₀`` to first order) every entry has its own variance, read
    at the measurement itself (``v̂ = e^{y}/I₀``; ``E v̂ = v (1 + O(v))``), and the noise terms
    become ``− Σ v̂/m + (2/m) · (v̂ ⊙ b)ᵀ(h(y + τb) − h(y))/τ``.

    ``metric="image"`` (parallel-beam CT): the risk in the metric ``M`` of
    :class:`~pipeline.models.physics.ImageMetric`, ``‖M^{1/2}(h(y) − A x)‖²/n`` (``n`` voxels),
    which is the image-domain MSE of the range of ``Aᵀ`` — the error FBP-like reconstructions
    are judged by — instead of the measurement MSE, dominated by low detector frequencies:
    ``‖y − h‖²_M/n − Σ M_ii v_i/n + (2/n) · (M(v ⊙ b))ᵀ(h(y + τb) − h(y))/τ`` (generalised SURE,
    Eldar, IEEE TSP 2009). Its scale is the image's, so it balances an EI term with weight ~1.

    Clipping detector (``detector``, a ``clip`` record: ``y = clamp(A x + n, low, high)``, e.g. a
    CT count floor): on the rays the detector passed (``low < y < high``) the data are
    ``A x + n`` and SURE applies as above, restricted to them (residual, noise term and probe);
    a ray at a level says only that ``A x + n`` reached it, so it contributes the detector's
    consistency ``(y − clamp(A x̂, low, high))²`` (zero while ``A x̂`` is beyond the level), and
    the probe leaves it at the level. With no ray at a level this is SURE as above. Measurement
    metric only (the image metric mixes rays). The estimate is conditional on which rays were
    clipped; rays whose noise moved them across the level are the (small) bias.

    Shape:
        ``x_hat``: ``(*batch, *op.domain_shape)``; ``y``: ``(*batch, *op.range_shape)``.

    Math:
        ``SURE = ‖y − h(y)‖²/m − q σ² + (2σ²/m) · bᵀ(h(y + τb) − h(y))/τ``, ``h = A f(·, A)``,
        ``b ~ N(0, I)`` (complex: both parts), ``q = 1`` (real) or ``2`` (complex), ``m`` the
        measured entries; ``E[SURE] = E[‖h(y) − A x‖²/m]``.

    Args:
        sigma: noise standard deviation (of each part, for complex data); or give
            ``noise_model`` (a :class:`~operators3d.GaussianNoise`, or a
            :class:`~operators3d.TransmissionNoise` for per-entry variances).
        tau: finite-difference step; default ``tau_rel`` times the RMS of the measured ``y``.
        tau_rel: relative step used when ``tau`` is None.
        metric: ``"measurement"`` or ``"image"`` (parallel-beam CT).
        detector: a scan's ``clip`` detector record (``docs/scan-format.md``), or ``None``
            (linear data). Other detectors are refused: their data are not ``A x + n`` on any ray.
        seed: seed of the probe generator.
    """

    name: ClassVar[str] = "sure"

    def __init__(
        self,
        sigma: float | None = None,
        *,
        noise_model: NoiseModel | None = None,
        tau: float | None = None,
        tau_rel: float = 1e-3,
        metric: str = "measurement",
        detector: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        if metric not in ("measurement", "image"):
            raise ValueError(f"SureGaussianLoss: metric must be 'measurement' or 'image', got {metric!r}")
        if detector is not None:
            if detector.get("model") != "clip":
                raise ValueError(f"SureGaussianLoss: a {detector.get('model')!r} detector's data are not "
                                 "A x + n on any ray; SURE takes a clip detector only")
            if metric != "measurement":
                raise ValueError("SureGaussianLoss: with a clip detector the metric must be 'measurement' "
                                 "(the image metric mixes passed and clipped rays)")
        self.detector = None if detector is None else dict(detector)
        self.metric = metric
        self.noise_model = noise_model if isinstance(noise_model, TransmissionNoise) else None
        if self.noise_model is not None:
            if sigma is not None:
                raise ValueError("SureGaussianLoss: give sigma or a TransmissionNoise model, not both")
            sigma = 0.0  # per-entry variances come from the model
        elif noise_model is not None:
            if not isinstance(noise_model, GaussianNoise):
                raise TypeError(
                    f"SureGaussianLoss: noise_model must be GaussianNoise or TransmissionNoise, "
                    f"got {type(noise_model).__name__} (use SurePoissonLoss for Poisson noise)"
                )
            if sigma is not None and float(sigma) != noise_model.sigma:
                raise ValueError(
                    f"SureGaussianLoss: sigma={sigma} disagrees with the noise model's "
                    f"{noise_model.sigma}"
                )
            sigma = noise_model.sigma
        if sigma is None or not float(sigma) >= 0:
            raise ValueError(f"SureGaussianLoss: expected sigma >= 0 (or noise_model=), got {sigma!r}")
        if tau is not None and not tau > 0:
            raise ValueError(f"SureGaussianLoss: tau must be > 0, got {tau}")
        self.sigma = float(sigma)
        self.tau = tau
        self.tau_rel = float(tau_rel)

    def extra_repr(self) -> str:
        noise = f"noise_model={self.noise_model}" if self.noise_model is not None else f"sigma={self.sigma:g}"
        detector = "" if self.detector is None else f", detector={self.detector.get('model')}"
        return f"{noise}, tau={self.tau}, metric={self.metric}{detector}"

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        model = self._require_model(model)
        if self.metric == "image":
            return self._image_loss(x_hat, y, op, model)
        _, dev = self.generators(y.device)
        mask = op.measurement_mask()
        m = op.num_measured(y)
        real_per_entry = 2 if y.is_complex() else 1
        clip = detector_model(self.detector, op)
        if clip is not None:  # SURE on the passed rays, the detector's consistency on the others
            if y.is_complex():
                raise TypeError("SureGaussianLoss: SURE through a clip detector takes real measurements (CT), "
                                "got complex ones")
            with torch.no_grad():
                passed = torch.ones(y.shape, dtype=torch.bool, device=y.device)
                for at in at_clip_levels(y, clip.low, clip.high):
                    if at is not None:
                        passed &= ~at
            z = op(x_hat)
            residual = torch.where(passed, z - y, clip.apply_values(z) - y).square().sum() / m
            del z
            mask = passed if mask is None else passed & mask.to(torch.bool)
        else:
            residual = squared_residual(op, x_hat, y) / m
        if y.is_complex():
            parts = torch.randn(y.shape + (2,), generator=dev, dtype=y.real.dtype, device=y.device)
            probe = torch.view_as_complex(parts)
        else:
            probe = torch.randn(y.shape, generator=dev, dtype=y.dtype, device=y.device)
        if mask is not None:
            probe = probe * mask
        tau = _tau(y, mask, self.tau, self.tau_rel)
        if self.noise_model is None:  # one σ²: it scales the divergence after the fact
            share = 1.0 if clip is None else float(mask.sum()) / m  # the passed rays' noise only
            weighted, noise_mean, factor = probe, share * real_per_entry * self.sigma**2, 2 * self.sigma**2 / m
        else:  # a variance per entry weighs the probe
            with torch.no_grad():
                var = self.noise_model.variance(y.detach(), mask=mask)
            weighted, noise_mean, factor = var * probe, var.sum() / m, 2.0 / m
            del var
        y_pert, back = _probe_parts(y, op, probe, weighted, tau)
        del probe, weighted
        divergence = factor * _divergence(model, y_pert, op, x_hat, back, tau)
        value = residual - noise_mean + divergence
        return _output(self.name, value, residual, divergence)

    def _image_loss(self, x_hat, y, op, model) -> LossOutput:
        """SURE in the image metric ``M`` (parallel-beam CT): see the class docstring."""
        metric = ImageMetric(op)
        if y.is_complex():
            raise TypeError("SureGaussianLoss: metric='image' needs real CT measurements")
        _, dev = self.generators(y.device)
        n = x_hat.numel()
        r = op(x_hat) - y
        residual = (r * metric(r)).sum() / n
        del r
        with torch.no_grad():
            if self.noise_model is not None:
                var = self.noise_model.variance(y.detach())
            else:
                var = torch.full_like(y, self.sigma**2)
            trace = metric.diagonal * var.sum() / n
        probe = torch.randn(y.shape, generator=dev, dtype=y.dtype, device=y.device)
        tau = _tau(y, None, self.tau, self.tau_rel)
        with torch.no_grad():
            weighted = metric(var * probe)
        y_pert, back = _probe_parts(y, op, probe, weighted, tau)
        del probe, weighted, var
        div = _divergence(model, y_pert, op, x_hat, back, tau)
        divergence = (2.0 / n) * div
        value = residual - trace + divergence
        return _output(self.name, value, residual, divergence)


class SurePoissonLoss(Loss):
    """PURE for Poisson noise with a gain, and PG-URE for Poisson–Gaussian noise.

    ``y = γ · Poisson(z/γ) (+ σ n)`` (so ``E y = z``, ``Var y = γz (+ σ²)``), real data only
    (CT photon counts, or any nonnegative measurement). Rademacher probe, seeded.

    Shape:
        ``x_hat``: ``(*batch, *op.domain_shape)``; ``y``: ``(*batch, *op.range_shape)``, real.

    Math:
        ``PURE = ‖y − h(y)‖²/m − γ Σy/m − σ² + (2/m) · ((γy + σ²) ⊙ b)ᵀ(h(y + τb) − h(y))/τ``,
        ``b ∈ {±1}`` uniform; with ``σ = 0`` it is PURE, otherwise PG-URE (the Gaussian terms
        added). ``E[PURE] = E[‖h(y) − A x‖²/m]`` for linear ``h`` and to first order in ``γ``
        otherwise.

    Args:
        gain: Poisson gain ``γ > 0``; or give ``noise_model`` (Poisson or Poisson–Gaussian).
        sigma: Gaussian standard deviation ``σ ≥ 0`` (0: pure Poisson).
        tau: finite-difference step; default ``tau_rel`` times the RMS of ``y``.
        tau_rel: relative step used when ``tau`` is None.
        seed: seed of the probe generator.
    """

    name: ClassVar[str] = "pure"

    def __init__(
        self,
        gain: float | None = None,
        *,
        sigma: float = 0.0,
        noise_model: NoiseModel | None = None,
        tau: float | None = None,
        tau_rel: float = 1e-3,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        if noise_model is not None:
            if not isinstance(noise_model, (PoissonNoise, PoissonGaussianNoise)):
                raise TypeError(
                    f"SurePoissonLoss: noise_model must be PoissonNoise or PoissonGaussianNoise, "
                    f"got {type(noise_model).__name__}"
                )
            gain, sigma = noise_model.gain, noise_model.sigma
        if gain is None or not float(gain) > 0:
            raise ValueError(f"SurePoissonLoss: expected gain > 0 (or noise_model=), got {gain!r}")
        if not float(sigma) >= 0:
            raise ValueError(f"SurePoissonLoss: expected sigma >= 0, got {sigma!r}")
        if tau is not None and not tau > 0:
            raise ValueError(f"SurePoissonLoss: tau must be > 0, got {tau}")
        self.gain = float(gain)
        self.sigma = float(sigma)
        self.tau = tau
        self.tau_rel = float(tau_rel)

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}, sigma={self.sigma:g}, tau={self.tau}"

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        model = self._require_model(model)
        if y.is_complex():
            raise TypeError(
                "SurePoissonLoss: Poisson noise needs real, nonnegative measurements, got a "
                f"complex y ({y.dtype}); use SureGaussianLoss for MRI"
            )
        _, dev = self.generators(y.device)
        mask = op.measurement_mask()
        m = op.num_measured(y)
        residual = squared_residual(op, x_hat, y) / m
        measured_y = y if mask is None else y * mask
        mean_term = self.gain * measured_y.sum() / m
        probe = torch.randint(0, 2, y.shape, generator=dev, device=y.device).to(y.dtype) * 2 - 1
        if mask is not None:
            probe = probe * mask
        tau = _tau(y, mask, self.tau, self.tau_rel)
        weighted = (self.gain * measured_y + self.sigma**2) * probe
        y_pert, back = _probe_parts(y, op, probe, weighted, tau)
        del probe, weighted
        div = _divergence(model, y_pert, op, x_hat, back, tau)
        divergence = (2.0 / m) * div
        value = residual - mean_term - self.sigma**2 + divergence
        return _output(self.name, value, residual, divergence)
