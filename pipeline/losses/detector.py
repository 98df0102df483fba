"""Measurements through a non-linear detector: the forward model a loss re-measures with.

A scan whose ``detector`` record is set (``docs/scan-format.md``: a saturating or quantising
detector, or one-bit measurements) was measured as ``y = g(A x + n)``, not ``y = A x + n``.
The reconstructor keeps the *linear* operator ``A`` (its initial estimate and its physics layers
are linear); the losses that compare a re-measurement with data do it through ``g``:

* **measurement consistency** (:class:`~pipeline.losses.MeasurementConsistencyLoss`) in the
  measurement space of the non-linear model, ``‖y − g(A x̂)‖²/m`` for clipping and quantising
  (Sechaud, Jacques, Abry, Tachella, "Equivariance-based self-supervised learning for audio
  signal recovery from clipped measurements", EUSIPCO 2024), and for one-bit measurements the
  logistic loss of Tachella & Jacques ("Learning to reconstruct signals from binary
  measurements", TMLR 2023) on the linear part, which never differentiates ``sign``:
  ``mean log(1 + exp(−y ⊙ (A x̂ − τ)/w))`` (``w`` the model's width, its temperature);
* **equivariant imaging** (:class:`~pipeline.losses.EquivariantImagingLoss`) re-measures the
  transformed reconstruction through the detector, ``x₃ = f(g(A T_g x̂ (+ n′)), A)``, with the
  gradient of ``g`` that the model documents (exact for clip; straight-through or zero for
  quantise and sign, :mod:`operators3d.nonlinear`).

What one bit with threshold 0 cannot give on a Fourier operator (one-bit MRI): ``sign`` of each
part of ``A x`` hardly changes when the image's spectrum is reweighted by a smooth positive radial
factor (the coil maps are smooth, so ``A (h ∗ x) ≈ H ⊙ A x``), and such a filter commutes with the
rotations and shifts of EI. Neither term then fixes the spectral envelope: whitening the
reference by ``|k|²`` keeps 99.5 % of its noiseless bits at 8.69 dB, and on the noisy data the
logistic MC is lower at ``Aᴴy`` of the bits than at the reference (0.276 against 0.328, widths
0.006 to 1), measured on ``benchmarks/nonlinear.py`` case ``one-bit-mri-tuning`` (16×96×96, 8
coils, σ 0.01), 2026-12-05. A non-zero (or dithered) threshold, as in one-bit CT, is what makes
the amplitudes visible to the bits: ``simulate mri --one-bit-dither Δ`` records a seeded dither
``τ ~ U[−Δ, Δ)`` per part (:class:`~operators3d.nonlinear.Sign`), which :func:`detector_model`
rebuilds on each slab operator, so MC's ``A x̂ − τ`` and EI's re-measurement ``sign(· − τ)`` use
the ``τ`` the slab was measured with (the dither repeats along D).

The splitting losses assume linear measurements; with a detector set they are refused
(``loss.detector: ignore`` trains with the linear model instead, e.g. to compare). SURE takes a
``clip`` detector (:class:`~pipeline.losses.SureGaussianLoss`: SURE on the rays the detector
passed, the clip consistency on the rays at a level) and refuses the others.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from operators3d import LinearOperator
from operators3d.nonlinear import NonLinearForward, Quantize, Sign, nonlinear_from_dict

__all__ = ["detector_model", "detector_key", "nonlinear_consistency", "one_bit", "DETECTOR_FIELDS"]

#: The fields of a ``detector`` record that define the forward model (the rest are facts about
#: a scan: the clipped fractions, the saturation as a count).
DETECTOR_FIELDS = ("model", "low", "high", "bits", "threshold", "dither", "width", "gradient")


def detector_key(record: Mapping[str, Any] | None) -> tuple | None:
    """What makes two scans' detectors the same forward model (``None``: linear)."""
    if record is None:
        return None
    return tuple((k, repr(record.get(k))) for k in DETECTOR_FIELDS)


def detector_model(record: Mapping[str, Any] | None, op: LinearOperator) -> NonLinearForward | None:
    """``g(A ·)`` of ``record`` after the slab operator ``op``, its tensor bounds on ``op``'s
    device (``None`` for a linear detector)."""
    if record is None:
        return None
    model = nonlinear_from_dict(record, op)
    if model._buffers:
        for key, buf in model._buffers.items():
            if buf is not None and buf.device != op.device:
                model._buffers[key] = buf.to(op.device)
    return model


def one_bit(model: NonLinearForward) -> tuple[float | torch.Tensor, float] | None:
    """``(τ, w)`` when ``model`` reads one bit — :class:`Sign` (``τ`` a number, or a tensor on
    the real parts of the range: a dithered or per-measurement threshold, the slab's own since
    :func:`detector_model` rebuilds it on the slab operator), or a 1-bit :class:`Quantize` (its
    threshold the middle of its range, its temperature half the range) — else ``None``."""
    if isinstance(model, Sign):
        return model.threshold, model.width
    if isinstance(model, Quantize) and model.bits == 1:
        return (model.lo + model.hi) / 2, (model.hi - model.lo) / 2
    return None


def nonlinear_consistency(model: NonLinearForward, x_hat: torch.Tensor, y: torch.Tensor,
                          measured: int) -> torch.Tensor:
    """Measurement consistency of ``x̂`` with data ``y = g(A x + n)``, per measured entry.

    Math:
        clip and multi-bit quantise: ``Σ |y − g(A x̂)|² / m``, through ``g``'s documented
        gradient; one bit (``y`` read as ``±1`` about the threshold ``τ``):
        ``Σ log(1 + exp(−y± ⊙ (A x̂ − τ)/w)) / m`` (the logistic loss on the linear part); on a
        complex range over the real and imaginary parts, ``/ 2m``, and over measured entries only.
    """
    bit = one_bit(model)
    if bit is None:
        r = model(x_hat) - y
        return (torch.view_as_real(r) if r.is_complex() else r).square().sum() / measured
    tau, width = bit
    z = model.linear_part(x_hat)
    parts, data = (torch.view_as_real(z), torch.view_as_real(y)) if z.is_complex() else (z, y)
    if isinstance(tau, torch.Tensor):  # a tensor threshold (a dither): at the data's dtype and device
        tau = tau.to(device=parts.device, dtype=parts.dtype)
    signs = torch.where(data >= tau if not isinstance(model, Sign) else data > 0, 1.0, -1.0).to(parts.dtype)
    loss = torch.nn.functional.softplus(-signs * (parts - tau) / width)
    mask = model._measured(z)
    if mask is not None:  # entries that are not measurements carry no bit
        loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    # per real measurement: a complex entry holds two bits (real and imaginary parts)
    return loss.sum() / (measured * (2 if z.is_complex() else 1))
