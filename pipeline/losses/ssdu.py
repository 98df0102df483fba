"""SSDU: self-supervision by splitting the acquired k-space points (Cartesian MRI).

Yaman et al., "Self-supervised learning of physics-guided reconstruction neural networks
without fully sampled reference data", MRM 2020: k-space points split into ``Θ`` (input) and
``Λ`` (loss), ``ρ = |Λ|/|Ω|``, ``Λ`` drawn with a variable-density Gaussian around the k-space
centre, the calibration block kept in ``Θ``, normalised ℓ₂+ℓ₁ or MSE loss; optional weighting
of Millard & Chiew, "A theoretical framework for self-supervised MR image reconstruction using
sub-sampling via variable density Noisier2Noise", IEEE TCI 2023. Any operator with a k-space
grid (:meth:`~operators3d.LinearOperator.kspace_mask`) can be split this way.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch

from .base import LossOutput, residual_norms
from .splitting import Split, _bernoulli, _SplittingBase

__all__ = ["SSDULoss", "calibration_size", "ssdu_probabilities"]


def calibration_size(mask: torch.Tensor) -> tuple[int, ...]:
    """The largest fully sampled block centred on the k-space centre, per axis.

    The block of size ``c`` along an axis of length ``n`` covers ``[n//2 − c//2, n//2 − c//2 + c)``
    (as :func:`operators3d.calibration_region`); axes grow in turn while the block stays fully
    sampled. Zeros if the centre itself is not sampled.

    Shape:
        ``mask``: ``(H, W)`` or ``(D, H, W)``; returns one size per axis.
    """
    sampled = mask != 0
    shape = tuple(sampled.shape)
    size = [1] * len(shape)

    def full(sz: Sequence[int]) -> bool:
        idx = tuple(slice(n // 2 - c // 2, n // 2 - c // 2 + c) for n, c in zip(shape, sz))
        return bool(sampled[idx].all())

    if not full(size):
        return tuple(0 for _ in shape)
    grown = True
    while grown:
        grown = False
        for a in range(len(shape)):
            if size[a] < shape[a]:
                trial = list(size)
                trial[a] += 1
                if full(trial):
                    size, grown = trial, True
    return tuple(size)


def ssdu_probabilities(
    mask: torch.Tensor,
    rho: float,
    *,
    std_scale: float = 4.0,
    calibration: Sequence[int] | int | None = None,
    max_probability: float = 0.95,
) -> torch.Tensor:
    """Probabilities ``K`` that each k-space point lands in the loss set ``Λ``.

    A Gaussian density centred on the k-space centre (standard deviation ``n / std_scale`` per
    axis, as in Yaman et al.'s code), scaled so that ``Σ K = ρ |Ω|``, capped at
    ``max_probability``, and zero outside ``Ω`` and in the calibration block (kept in ``Θ``).

    Shape:
        ``mask``: ``(H, W)`` or ``(D, H, W)``; returns float64 of the same shape.

    Math:
        ``K(k) = min(c · exp(−½ Σ_a ((k_a − n_a//2) / (n_a/s))²), K_max)`` on ``Ω \\ calib``,
        ``c`` chosen by bisection so that ``Σ_k K(k) = ρ |Ω|``.
    """
    omega = (mask != 0).to(torch.float64)
    shape = tuple(mask.shape)
    if calibration is None:
        calib = calibration_size(mask)
    elif isinstance(calibration, int):
        calib = (calibration,) * len(shape)
    else:
        calib = tuple(int(c) for c in calibration)
    allowed = omega.clone()
    idx = tuple(slice(n // 2 - c // 2, n // 2 - c // 2 + c) for n, c in zip(shape, calib))
    allowed[idx] = 0
    density = torch.ones(shape, dtype=torch.float64, device=mask.device)
    for axis, n in enumerate(shape):
        k = torch.arange(n, dtype=torch.float64, device=mask.device) - n // 2
        view = [1] * len(shape)
        view[axis] = n
        density = density * torch.exp(-0.5 * (k / (n / std_scale)) ** 2).view(view)
    density = density * allowed
    want = rho * float(omega.sum())
    room = max_probability * float(allowed.sum())
    if want > room:
        raise ValueError(
            f"SSDULoss: rho={rho} asks for {want:.0f} loss points but only {int(allowed.sum())} "
            f"sampled points lie outside the calibration block {calib} (at most {room:.0f} with "
            f"max_probability={max_probability}); lower rho or the calibration size"
        )
    lo, hi = 0.0, 1.0
    while float(torch.clamp(hi * density, max=max_probability).sum()) < want:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(torch.clamp(mid * density, max=max_probability).sum()) < want:
            lo = mid
        else:
            hi = mid
    return torch.clamp(hi * density, max=max_probability)


class SSDULoss(_SplittingBase):
    """Self-supervision via data undersampling (SSDU) for Cartesian MRI.

    Each step splits the acquired k-space points ``Ω`` into ``Θ`` (network input) and ``Λ``
    (loss): every point outside the calibration block enters ``Λ`` independently with
    probability ``K`` from :func:`ssdu_probabilities` (a variable-density Gaussian with
    ``E|Λ| = ρ|Ω|``); the calibration block stays in ``Θ``. The input operator is the same
    ``MultiCoilMRI`` with mask ``Θ``; inference uses all of ``Ω``.

    Shape:
        ``y``: ``(*batch, C, D, kH, kW)`` of a ``MultiCoilMRI``.

    Math:
        ``r = W ⊙ M_Λ(A f(y_Θ, A_Θ) − y)``; ``"l1l2"`` (the paper's normalised loss):
        ``‖r‖₂ / ‖W ⊙ y_Λ‖₂ + ‖r‖₁ / ‖W ⊙ y_Λ‖₁``; ``"mse"``: ``‖r‖² / |Λ entries|``;
        ``W = 1``, or ``(1 − K)^{-1/2}`` on ``Λ`` with ``weighted=True`` (Millard & Chiew 2023).

    Args:
        rho: expected ``|Λ| / |Ω|`` (0.4 in the paper).
        std_scale: the Gaussian's standard deviation is the grid size over this.
        calibration: block kept in ``Θ`` (int or per-axis sizes); default: the largest fully
            sampled centred block of the mask.
        metric: ``"l1l2"`` or ``"mse"``.
        weighted: weighted SSDU.
        max_probability: cap of ``K`` (keeps the weights finite).
        seed: seed of the split generator.
    """

    name: ClassVar[str] = "ssdu"

    def __init__(
        self,
        rho: float = 0.4,
        *,
        std_scale: float = 4.0,
        calibration: int | Sequence[int] | None = None,
        metric: str = "l1l2",
        weighted: bool = False,
        max_probability: float = 0.95,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        if not 0 < rho < 1:
            raise ValueError(f"SSDULoss: rho must lie in (0, 1), got {rho}")
        if metric not in ("l1l2", "mse"):
            raise ValueError(f"SSDULoss: metric must be 'l1l2' or 'mse', got {metric!r}")
        if not 0 < max_probability < 1:
            raise ValueError(f"SSDULoss: max_probability must lie in (0, 1), got {max_probability}")
        self.rho = float(rho)
        self.std_scale = float(std_scale)
        self.calibration = calibration
        self.metric = metric
        self.weighted = weighted
        self.max_probability = float(max_probability)
        self.__dict__["_prob_cache"] = {}

    def extra_repr(self) -> str:
        return f"rho={self.rho}, metric={self.metric}, weighted={self.weighted}"

    def probabilities(self, mask: torch.Tensor) -> torch.Tensor:
        """``K`` for a sampling mask (cached by the mask's content)."""
        cache: dict = self.__dict__["_prob_cache"]
        key = (tuple(mask.shape), str(mask.device), hash(mask.detach().cpu().numpy().tobytes()))
        if key not in cache:
            cache.clear()
            cache[key] = ssdu_probabilities(
                mask, self.rho, std_scale=self.std_scale, calibration=self.calibration,
                max_probability=self.max_probability,
            )
        return cache[key]

    def draw_split(self, y, op, cpu, dev) -> Split:
        kspace = op.kspace_mask()
        if kspace is None:
            raise TypeError(
                f"SSDULoss: needs a Cartesian k-space operator (one whose kspace_mask() is a "
                f"sampling mask, e.g. MultiCoilMRI), got {op.name}; use SplittingLoss (any "
                "operator) or Noise2InverseLoss (CT)"
            )
        probs = self.probabilities(kspace).to(y.device)
        omega = (kspace != 0).to(y.device)
        lam = _bernoulli(probs, dev) & omega
        theta = omega & ~lam
        dtype = y.real.dtype
        weight = lam.to(dtype)
        if self.weighted:
            weight = weight * (1 - probs).clamp_min(1e-12).rsqrt().to(dtype)
        return Split(
            input_y=y * theta.to(dtype),
            input_op=op.restrict_measurements(theta),
            target_y=y,
            target_op=op,
            weight=weight,
            info={"theta": theta, "lambda": lam, "probabilities": probs},
        )

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        split = self._split(model, y)
        w = split.weight
        if self.metric == "mse":
            sq, _ = residual_norms(op, x_hat, y, weight=w)
            batch_and_rest = y.numel() // math.prod(split.info["lambda"].shape)
            count = batch_and_rest * int(split.info["lambda"].sum())
            value = sq / max(count, 1)
            return LossOutput(value, {f"{self.name}.mse": value.detach(), self.name: value.detach()})
        sq, ab = residual_norms(op, x_hat, y, weight=w, need_abs=True)
        with torch.no_grad():
            wy = (y * w).abs()
            ny2 = wy.pow(2).sum().sqrt().clamp_min(torch.finfo(wy.dtype).tiny)
            ny1 = wy.sum().clamp_min(torch.finfo(wy.dtype).tiny)
        l2 = sq.clamp_min(0).sqrt() / ny2
        l1 = ab / ny1
        value = l2 + l1
        return LossOutput(
            value,
            {self.name: value.detach(), f"{self.name}.l2": l2.detach(), f"{self.name}.l1": l1.detach()},
        )
