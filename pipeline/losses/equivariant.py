"""Equivariant imaging (EI) and robust EI.

Chen, Tachella & Davies, "Equivariant Imaging: Learning Beyond the Range Space", ICCV 2021;
"Robust Equivariant Imaging: a fully unsupervised framework for learning to image from noisy
and partial measurements", CVPR 2022.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar, Mapping

import torch

from operators3d import GroupAction, NoiseModel, PoissonGaussianNoise, PoissonNoise

from .base import Loss, LossOutput, WeightedSum
from .consistency import MeasurementConsistencyLoss, _mean_sq
from .detector import detector_model

__all__ = ["EquivariantImagingLoss", "robust_ei", "equivariant_imaging"]

Transform = GroupAction | type | Callable[[torch.Tensor], torch.Tensor]


def _draw_action(transform: Transform, x: torch.Tensor, generator: torch.Generator,
                 options: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transform of this step: a fixed action/callable, or a sample of an action class."""
    if isinstance(transform, type) and issubclass(transform, GroupAction):
        kwargs = dict(options)
        if "shape" in inspect.signature(transform.sample).parameters and "shape" not in kwargs:
            kwargs["shape"] = tuple(x.shape)
        return transform.sample(generator=generator, **kwargs)
    return transform  # a GroupAction instance or any callable on volumes


class EquivariantImagingLoss(Loss):
    """The equivariance term of EI: the reconstructor should commute with a group action.

    ``x₂ = T_g x̂`` and ``x₃ = f(A x₂ (+ n′), A)``; the loss is ``‖x₃ − x₂‖² / n_x``. Gradients
    flow through both passes (``x₂`` is not detached, as in the original). Combine with
    :class:`~pipeline.losses.MeasurementConsistencyLoss` (EI) or SURE (robust EI,
    :func:`robust_ei`). The group must move the null space of ``A``: in-plane rotations for
    sparse-view CT, shifts or rotations for MRI.

    Shape:
        ``x_hat``: ``(*batch, D, H, W)``; the transform acts on the last three dims.

    Math:
        ``L = ‖f(A T_g x̂ + n′, A) − T_g x̂‖² / n_x``, ``n′ = 0`` (EI) or drawn from the scan's
        noise model (REI); ``n_x`` = image entries (a complex entry counts once). With
        ``amplitude``, ``T_g`` includes the scaling ``α``; with a ``detector``, ``A ·`` is
        ``g(A ·)``.

    Args:
        transform: a :class:`~operators3d.GroupAction` subclass (a random element is drawn each
            step with ``cls.sample(generator=…, **transform_options)``; ``Shift`` gets the
            volume's ``shape``), a fixed ``GroupAction``, or any callable on volumes.
        noise_model: re-measure with fresh noise from this model (robust EI); ``None`` for EI.
        transform_options: keyword arguments of ``transform.sample`` (e.g. ``plane=``).
        amplitude: ``(lo, hi)``: also scale the transformed image by ``α``, drawn each step
            log-uniformly in ``[lo, hi]`` — the group of amplitude scalings, under which a set of
            images (attenuation maps of denser or lighter material of the same shape) is
            invariant. A linear ``A`` commutes with it, so it teaches nothing new there; through
            a clipping detector it moves rays across the clip level, which asks the network to
            recover what clipping hides (the idea of Sechaud et al. 2024 for declipping).
            Measured on clipped parallel-beam CT with ``ct_ei.yaml`` (BENCHMARKS.md, issue
            18.2) it lowered PSNR by 0.5–2.3 dB at 300 and 1000 steps, so no shipped recipe uses it.
            ``None``: no scaling.
        detector: a scan's non-linear ``detector`` record: the re-measurement goes through it,
            ``x₃ = f(g(A T_g x̂ + n′), A)`` (Tachella & Jacques 2023 for sign, Sechaud et al.
            2024 for clipping), with the gradient of ``g`` its model documents.
        seed: seed of the loss's generator (transforms and noise).
    """

    name: ClassVar[str] = "ei"

    def __init__(
        self,
        *,
        transform: Transform,
        noise_model: NoiseModel | None = None,
        transform_options: Mapping[str, Any] | None = None,
        amplitude: tuple[float, float] | None = None,
        detector: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.detector = None if detector is None else dict(detector)
        if amplitude is not None:
            lo, hi = (float(a) for a in amplitude)
            if not (0 < lo <= hi and hi < float("inf")):
                raise ValueError(f"EquivariantImagingLoss: amplitude must be (lo, hi) with 0 < lo ≤ hi, got {amplitude!r}")
            amplitude = (lo, hi)
        self.amplitude = amplitude
        if not callable(transform):
            raise TypeError(
                f"EquivariantImagingLoss: transform must be a GroupAction (class or instance) or "
                f"a callable on volumes, got {type(transform).__name__}"
            )
        if noise_model is not None and not isinstance(noise_model, NoiseModel):
            raise TypeError(
                f"EquivariantImagingLoss: noise_model must be an operators3d NoiseModel, got "
                f"{type(noise_model).__name__}"
            )
        self.transform = transform
        self.noise_model = noise_model
        self.transform_options = dict(transform_options or {})

    def extra_repr(self) -> str:
        t = self.transform
        if isinstance(t, type):
            name = t.__name__
        else:
            name = repr(t) if isinstance(t, GroupAction) else "callable"
        detector = "" if self.detector is None else f", detector={self.detector.get('model')}"
        amplitude = "" if self.amplitude is None else f", amplitude={self.amplitude}"
        return f"transform={name}, noise_model={self.noise_model}{amplitude}{detector}"

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        model = self._require_model(model)
        cpu, dev = self.generators(x_hat.device)
        action = _draw_action(self.transform, x_hat, cpu, self.transform_options)
        x2 = action(x_hat)
        if self.amplitude is not None:
            lo, hi = self.amplitude
            u = float(torch.rand((), generator=cpu, dtype=torch.float64))
            x2 = x2 * math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        if x2.shape != x_hat.shape:
            raise ValueError(
                f"EquivariantImagingLoss: the transform changed the shape {tuple(x_hat.shape)} "
                f"to {tuple(x2.shape)}; use an action that keeps it (e.g. square planes for 90°)"
            )
        y2 = op(x2)
        if self.noise_model is not None:
            mask = op.measurement_mask()
            kwargs = {"clamp_negative": True} if isinstance(
                self.noise_model, (PoissonNoise, PoissonGaussianNoise)
            ) else {}
            y2 = self.noise_model.sample(y2, generator=dev, mask=mask, **kwargs)
        detector = detector_model(self.detector, op)
        if detector is not None:  # the detector acts after the noise, as when the scan was measured
            y2 = detector.apply_values(y2)
        x3 = model(y2, op)
        del y2
        value = _mean_sq(x3, x2)
        return LossOutput(value, {self.name: value.detach()})


def equivariant_imaging(
    *, transform: Transform, weight: float = 1.0, transform_options: Mapping[str, Any] | None = None,
    detector: Mapping[str, Any] | None = None, seed: int | None = None,
) -> WeightedSum:
    """EI as in the paper: ``MC + α · EI`` (:class:`WeightedSum` with parts ``mc`` and ``ei``);
    with a non-linear ``detector`` both terms measure through it."""
    ei = EquivariantImagingLoss(transform=transform, transform_options=transform_options, detector=detector,
                                seed=seed)
    return WeightedSum([(1.0, MeasurementConsistencyLoss(detector=detector)), (float(weight), ei)])


def robust_ei(
    *,
    transform: Transform,
    noise_model: NoiseModel,
    weight: float = 1.0,
    tau: float | None = None,
    transform_options: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> WeightedSum:
    """Robust EI: ``SURE + α · EI`` with fresh noise from ``noise_model`` in the second pass.

    SURE is :class:`~pipeline.losses.SureGaussianLoss` for Gaussian noise and for the
    transmission noise of CT line integrals (:class:`~operators3d.TransmissionNoise`, per-entry
    variances), and :class:`~pipeline.losses.SurePoissonLoss` for Poisson and Poisson–Gaussian
    noise.
    """
    from operators3d import GaussianNoise, TransmissionNoise

    from .sure import SureGaussianLoss, SurePoissonLoss

    sure: Loss
    if isinstance(noise_model, (GaussianNoise, TransmissionNoise)):
        sure = SureGaussianLoss(noise_model=noise_model, tau=tau, seed=seed)
    elif isinstance(noise_model, (PoissonNoise, PoissonGaussianNoise)):
        sure = SurePoissonLoss(gain=noise_model.gain, sigma=noise_model.sigma, tau=tau, seed=seed)
    else:
        raise TypeError(f"robust_ei: unsupported noise model {type(noise_model).__name__}")
    ei = EquivariantImagingLoss(
        transform=transform, noise_model=noise_model, transform_options=transform_options,
        seed=None if seed is None else seed + 1,
    )
    return WeightedSum([(1.0, sure), (float(weight), ei)])
