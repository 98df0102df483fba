"""Measurement consistency (self-supervised) and supervised losses."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .base import Loss, LossOutput, squared_residual
from .detector import detector_model, nonlinear_consistency

__all__ = ["MeasurementConsistencyLoss", "SupervisedLoss"]


class MeasurementConsistencyLoss(Loss):
    """Mean squared error between the measurements and the re-measured reconstruction.

    Alone it cannot learn what lies in the null space of ``A`` (Chen, Tachella & Davies,
    "Equivariant Imaging", ICCV 2021, Fig. 1); it is the first term of EI.

    Shape:
        ``x_hat``: ``(*batch, *op.domain_shape)``; ``y``: ``(*batch, *op.range_shape)``.

    Math:
        ``L = ‖y − A x̂‖² / m``, ``m`` = number of measured entries (a complex entry counts once
        and contributes ``|z|²``). With a non-linear ``detector``, in the measurement space of
        ``y = g(A x)``: ``‖y − g(A x̂)‖² / m`` (clip, quantise) or the one-bit logistic loss
        (:func:`~pipeline.losses.detector.nonlinear_consistency`).

    Args:
        detector: a scan's ``detector`` record (``operators3d.nonlinear_from_dict``), or
            ``None`` for linear measurements.
    """

    name: ClassVar[str] = "mc"

    def __init__(self, *, detector: Mapping[str, Any] | None = None) -> None:
        super().__init__(seed=0)
        self.detector = None if detector is None else dict(detector)

    def extra_repr(self) -> str:
        return "" if self.detector is None else f"detector={self.detector.get('model')}"

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        forward = detector_model(self.detector, op)
        if forward is None:
            value = squared_residual(op, x_hat, y) / op.num_measured(y)
        else:
            value = nonlinear_consistency(forward, x_hat, y, op.num_measured(y))
        return LossOutput(value, {self.name: value.detach()})


class SupervisedLoss(Loss):
    """MSE or L1 against a reference image — for comparisons on simulated data only.

    Shape:
        ``x_hat`` and ``reference``: ``(*batch, *op.domain_shape)``.

    Math:
        ``mse``: ``‖x̂ − x‖² / n``; ``l1``: ``Σ|x̂ − x| / n``; ``n`` = image entries (complex
        entries count once).

    Args:
        metric: ``"mse"`` or ``"l1"``.
    """

    name: ClassVar[str] = "supervised"
    needs_reference: ClassVar[bool] = True
    image_mode: ClassVar[bool] = True

    def __init__(self, *, metric: str = "mse") -> None:
        super().__init__(seed=0)
        if metric not in ("mse", "l1"):
            raise ValueError(f"SupervisedLoss: metric must be 'mse' or 'l1', got {metric!r}")
        self.metric = metric

    def _loss(self, x_hat, y, op, model, *, reference) -> LossOutput:
        if reference.shape != x_hat.shape:
            raise ValueError(
                f"SupervisedLoss: reference shape {tuple(reference.shape)} must equal the "
                f"reconstruction's {tuple(x_hat.shape)}"
            )
        reference = reference.to(x_hat.dtype)
        if self.metric == "mse":
            value = _mean_sq(x_hat, reference)
        else:
            value = (x_hat - reference).abs().mean()
        return LossOutput(value, {f"{self.name}.{self.metric}": value.detach()})


def _mean_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ|a − b|² / numel`` (complex entries count once)."""
    d = a - b
    flat = torch.view_as_real(d) if d.is_complex() else d
    return flat.square().sum() / d.numel()
