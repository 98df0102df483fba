"""Measurement-splitting losses: generic random splits, SSDU (MRI) and Noise2Inverse (CT).

A splitting loss divides the measurements of each step into an input part (what the network
sees) and a target part (what the loss compares against). It wraps the model once through
``adapt_model``: the returned :class:`SplittingModel` draws a fresh split in training mode, runs
the wrapped reconstructor on the input part and records the split for the loss; in eval mode
it reconstructs from all measurements (SSDU, generic splitting) or averages over the splits
(Noise2Inverse). Train with ``model = loss.adapt_model(model)``; save ``model.model``.

* :class:`SplittingLoss` — each measured entry goes to the target set with probability ``ρ``
  (any operator; ``M_Θ ∘ A`` as the input operator).
* :class:`SSDULoss` — Yaman et al., "Self-supervised learning of physics-guided reconstruction
  neural networks without fully sampled reference data", MRM 2020: k-space points split into
  ``Θ`` (input) and ``Λ`` (loss), ``ρ = |Λ|/|Ω|``, ``Λ`` drawn with a variable-density Gaussian
  around the k-space centre, the calibration block kept in ``Θ``, normalised ℓ₂+ℓ₁ or MSE loss;
  optional weighting of Millard & Chiew, "A theoretical framework for self-supervised MR image
  reconstruction using sub-sampling via variable density Noisier2Noise", IEEE TCI 2023.
* :class:`Noise2InverseLoss` — Hendriksen, Pelt & Batenburg, "Noise2Inverse: self-supervised
  deep convolutional denoising for tomography", IEEE TCI 2020: ``K`` disjoint angle subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from operators3d import LinearOperator, MultiCoilMRI
from pipeline.models.physics import (
    classical_reconstruction,
    ct_kind,
    filtered_backprojection,
    measurement_mask,
    num_measured,
    restrict_angles,
    restrict_measurements,
)

from .base import Loss, LossOutput, residual_norms
from .consistency import _mean_sq

__all__ = [
    "Split",
    "SplittingModel",
    "SplittingLoss",
    "SSDULoss",
    "Noise2InverseLoss",
    "calibration_size",
    "ssdu_probabilities",
    "angle_subsets",
]


@dataclass
class Split:
    """One split of a measurement: what the network sees and what the loss compares with.

    Attributes:
        input_y: measurements the network sees (``(*batch, *input_op.range_shape)``); set to
            ``None`` once the network has run.
        input_op: their operator.
        target_y: held-out measurements (``(*batch, *target_op.range_shape)``).
        target_op: their operator.
        weight: optional real weights on the target entries (broadcast to ``target_y``).
        info: the split itself, for inspection (masks, angle indices, subset ``k``).
    """

    input_y: torch.Tensor | None
    input_op: LinearOperator | None
    target_y: torch.Tensor
    target_op: LinearOperator | None
    weight: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class SplittingModel(nn.Module):
    """A reconstructor trained with a splitting loss (made by ``loss.adapt_model(model)``).

    Training mode: draw a split of ``y`` from the loss's generator, return
    ``model(split.input_y, split.input_op)`` and record the split for the loss. Eval mode: the
    loss's evaluation (all measurements, or the mean over splits for Noise2Inverse). In a
    combined loss every training-mode call draws a split, the extra passes of EI or SURE
    included. The wrapped model is ``.model``: save and export its ``state_dict()`` (this
    wrapper's keys carry a ``model.`` prefix).

    Shape:
        as the wrapped model: ``(*batch, *op.range_shape) → (*batch, *op.domain_shape)``.
    """

    _MAX_RECORDS: ClassVar[int] = 2

    def __init__(self, model: nn.Module, loss: "_SplittingBase") -> None:
        super().__init__()
        self.model = model
        self.__dict__["_loss"] = loss  # not a submodule: the loss is not part of the model
        self.__dict__["_records"] = []

    @property
    def loss(self) -> "_SplittingBase":
        return self.__dict__["_loss"]

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        if not self.training:
            return self.loss.evaluate(self.model, y, op)
        cpu, dev = self.loss.generators(y.device)
        split = self.loss.draw_split(y, op, cpu, dev)
        records: list = self.__dict__["_records"]
        records.insert(0, (y, split))
        del records[self._MAX_RECORDS :]
        out = self.model(split.input_y, split.input_op)
        split.input_y = None  # the loss needs the target part only: free the input's memory
        return out

    @property
    def last_split(self) -> Split | None:
        """The most recent split (for inspection; the loss uses :meth:`split_for`)."""
        records: list = self.__dict__["_records"]
        return records[0][1] if records else None

    def split_for(self, y: torch.Tensor) -> Split:
        """The split recorded for ``y`` (consumed: each split serves one loss evaluation)."""
        records: list = self.__dict__["_records"]
        for i, (ref, split) in enumerate(records):
            if ref is y or (
                ref.shape == y.shape and ref.data_ptr() == y.data_ptr() and ref.dtype == y.dtype
            ):
                del records[i]
                return split
        raise RuntimeError(
            f"{type(self.loss).__name__}: no split recorded for these measurements; compute "
            "x_hat = model(y, op) with the adapted model (in training mode) and pass the same "
            "y and model to the loss"
        )


class _SplittingBase(Loss):
    """Shared machinery of the splitting losses."""

    def adapt_model(self, model: nn.Module) -> nn.Module:
        return SplittingModel(model, self)

    def draw_split(
        self, y: torch.Tensor, op: LinearOperator, cpu: torch.Generator, dev: torch.Generator
    ) -> Split:
        raise NotImplementedError(f"{type(self).__name__} does not implement draw_split")

    def evaluate(self, model: nn.Module, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        """Reconstruction from all measurements (overridden by Noise2Inverse)."""
        return model(y, op)

    def _split(self, model: nn.Module | None, y: torch.Tensor) -> Split:
        model = self._require_model(model)
        inner = getattr(model, "module", None)  # a DeepSpeed engine or DDP around the model
        if not isinstance(model, SplittingModel) and isinstance(inner, SplittingModel):
            model = inner
        if not isinstance(model, SplittingModel) or model.loss is not self:
            raise ValueError(
                f"{type(self).__name__}: the model was not adapted by this loss; train "
                "loss.adapt_model(model) and pass it as model="
            )
        return model.split_for(y)


def _bernoulli(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A bool tensor, True with the given probabilities (drawn on the probabilities' device)."""
    u = torch.rand(probabilities.shape, generator=generator, dtype=torch.float64,
                   device=probabilities.device)
    return u < probabilities


# ----------------------------------------------------------------------------- generic
class SplittingLoss(_SplittingBase):
    """Generic random splitting of the measured entries (any operator).

    Each measured entry of the range goes to the target set ``Λ`` with probability ``ρ``, the
    rest form the input ``Θ`` (the same split for every batch element; a fresh split each
    step). The input operator is ``M_Θ ∘ A``.

    Shape:
        ``y``: ``(*batch, *op.range_shape)``.

    Math:
        ``L = ‖M_Λ(A f(M_Θ y, M_Θ A) − y)‖² / |Λ|`` (``|Λ|`` counted over the batch).

    Args:
        rho: probability that a measured entry is held out for the loss.
        seed: seed of the split generator.
    """

    name: ClassVar[str] = "split"

    def __init__(self, rho: float = 0.4, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        if not 0 < rho < 1:
            raise ValueError(f"SplittingLoss: rho must lie in (0, 1), got {rho}")
        self.rho = float(rho)

    def draw_split(self, y, op, cpu, dev) -> Split:
        measured = measurement_mask(op)
        shape = op.range_shape
        full = torch.ones(shape, dtype=torch.bool, device=y.device) if measured is None else \
            torch.broadcast_to(measured.to(y.device), shape)
        probs = torch.full(shape, self.rho, dtype=torch.float64, device=y.device)
        target = _bernoulli(probs, dev) & full
        keep = full & ~target
        dtype = y.real.dtype
        return Split(
            input_y=y * keep.to(dtype),
            input_op=restrict_measurements(op, keep),
            target_y=y,
            target_op=op,
            weight=target.to(dtype),
            info={"input_mask": keep, "target_mask": target},
        )

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        split = self._split(model, y)
        sq, _ = residual_norms(split.target_op, x_hat, split.target_y, weight=split.weight)
        batch = y.numel() // math.prod(op.range_shape)
        count = batch * int(split.info["target_mask"].sum())
        value = sq / max(count, 1)
        return LossOutput(value, {self.name: value.detach()})


# ----------------------------------------------------------------------------- SSDU
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
        if not isinstance(op, MultiCoilMRI):
            raise TypeError(
                f"SSDULoss: needs a Cartesian MRI operator (MultiCoilMRI), got {op.name}; use "
                "SplittingLoss (any operator) or Noise2InverseLoss (CT)"
            )
        probs = self.probabilities(op.mask).to(y.device)
        omega = (op.mask != 0).to(y.device)
        lam = _bernoulli(probs, dev) & omega
        theta = omega & ~lam
        dtype = y.real.dtype
        weight = lam.to(dtype)
        if self.weighted:
            weight = weight * (1 - probs).clamp_min(1e-12).rsqrt().to(dtype)
        return Split(
            input_y=y * theta.to(dtype),
            input_op=restrict_measurements(op, theta),
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


# ----------------------------------------------------------------------------- Noise2Inverse
def _target_reconstruction(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """FBP/FDK for CT (the same as the ``"fbp"`` initial estimate), else the classical one."""
    if ct_kind(op) is not None:
        return filtered_backprojection(y, op)
    return classical_reconstruction(y, op)


def angle_subsets(num_angles: int, num_splits: int) -> list[torch.Tensor]:
    """``K`` disjoint subsets covering the angles: every K-th angle, ``j, j+K, j+2K, …``."""
    if not 2 <= num_splits <= num_angles:
        raise ValueError(
            f"angle_subsets: num_splits must lie in [2, {num_angles}] (the angle count), got "
            f"{num_splits}"
        )
    return [torch.arange(j, num_angles, num_splits) for j in range(num_splits)]


class Noise2InverseLoss(_SplittingBase):
    """Noise2Inverse: train on ``K − 1`` measurement subsets to predict the held-out one.

    CT: the angles split into ``K`` disjoint subsets (every K-th angle); each step draws a
    subset ``k``, the network reconstructs from the other ``K − 1`` subsets (its operator is
    the projector of those angles: with an FBP initial estimate and equal subset sizes this is
    the mean of the ``K − 1`` sub-reconstructions) and the loss compares with subset ``k``'s
    FBP (``target="reconstruction"``, the paper) or with its sinogram
    (``target="measurement"``). Inference averages over ``k``. MRI and other operators: the
    measured entries (k-space points for ``MultiCoilMRI``) are split into ``K`` random
    interleaved subsets instead (a fresh partition per step, a fixed one at evaluation).
    Image mode (``op=None``, any geometry, image crops): ``y`` stacks the ``K`` precomputed
    sub-reconstructions; the network maps the mean of ``K − 1`` of them to the last one.

    Shape:
        ``y``: ``(*batch, *op.range_shape)``; CT sinograms ``(*batch, D, A, U)``; image mode
        ``(*batch, K, D, H, W)``.

    Math:
        ``x̂_k = f(y_{−k}, A_{−k})``; ``"reconstruction"``: ``‖x̂_k − R(y_k, A_k)‖² / n_x`` with
        ``R`` = FBP/FDK (CT, :func:`~pipeline.models.physics.filtered_backprojection`, as
        the ``"fbp"`` initial estimate), SENSE (MRI); ``"measurement"``: ``‖A_k x̂_k − y_k‖² / m_k``;
        inference ``x̂ = mean_k f(y_{−k}, A_{−k})``; image mode
        ``‖f(mean_{j≠k} x_j) − x_k‖² / n_x``.

    Args:
        num_splits: ``K`` (4 in the reference code).
        target: ``"reconstruction"`` or ``"measurement"``.
        reconstruct: ``R(y, op)`` for the reconstruction target (default: the classical
            reconstruction of the operator).
        eval_seed: seed of the fixed partition used at evaluation (non-CT operators).
        seed: seed of the per-step draws.
    """

    name: ClassVar[str] = "n2i"
    image_mode: ClassVar[bool] = True

    def __init__(
        self,
        num_splits: int = 4,
        *,
        target: str = "reconstruction",
        reconstruct: Callable[[torch.Tensor, LinearOperator], torch.Tensor] | None = None,
        eval_seed: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__(seed=seed)
        if not isinstance(num_splits, int) or num_splits < 2:
            raise ValueError(f"Noise2InverseLoss: num_splits must be an int >= 2, got {num_splits!r}")
        if target not in ("reconstruction", "measurement"):
            raise ValueError(
                f"Noise2InverseLoss: target must be 'reconstruction' or 'measurement', got {target!r}"
            )
        self.num_splits = num_splits
        self.target = target
        self.reconstruct = reconstruct
        self.eval_seed = int(eval_seed)

    def extra_repr(self) -> str:
        return f"num_splits={self.num_splits}, target={self.target}"

    # ------------------------------------------------------------------ subsets
    def _partition(
        self, y: torch.Tensor, op: LinearOperator, gen: torch.Generator
    ) -> tuple[str, list[torch.Tensor]]:
        """``("angles", index lists)`` for CT, ``("mask", bool masks)`` otherwise."""
        if ct_kind(op) is not None:
            return "angles", angle_subsets(op.range_shape[-2], self.num_splits)
        if isinstance(op, MultiCoilMRI):
            grid = op.mask != 0
        else:
            measured = measurement_mask(op)
            grid = torch.ones(op.range_shape, dtype=torch.bool, device=y.device) if measured is None \
                else torch.broadcast_to(measured, op.range_shape).clone()
        points = torch.nonzero(grid.reshape(-1)).reshape(-1)
        if points.numel() < self.num_splits:
            raise ValueError(
                f"Noise2InverseLoss: {points.numel()} measured entries cannot form "
                f"{self.num_splits} subsets"
            )
        order = torch.randperm(points.numel(), generator=gen, device=gen.device).to(points.device)
        shuffled = points[order]
        masks = []
        for j in range(self.num_splits):
            m = torch.zeros(grid.numel(), dtype=torch.bool, device=grid.device)
            m[shuffled[j :: self.num_splits]] = True
            masks.append(m.reshape(grid.shape))
        return "mask", masks

    def _subset_split(self, y, op, kind: str, subsets: list[torch.Tensor], k: int) -> Split:
        if kind == "angles":
            held = subsets[k].to(y.device)
            rest = torch.cat([s for j, s in enumerate(subsets) if j != k]).sort().values.to(y.device)
            return Split(
                input_y=y.index_select(-2, rest),
                input_op=restrict_angles(op, rest.cpu()),
                target_y=y.index_select(-2, held),
                target_op=restrict_angles(op, held.cpu()),
                info={"k": k, "input_angles": rest, "target_angles": held, "subsets": subsets},
            )
        held = subsets[k].to(y.device)
        rest = torch.zeros_like(held)
        for j, s in enumerate(subsets):
            if j != k:
                rest |= s.to(y.device)
        dtype = y.real.dtype
        return Split(
            input_y=y * rest.to(dtype),
            input_op=restrict_measurements(op, rest),
            target_y=y * held.to(dtype),
            target_op=restrict_measurements(op, held),
            info={"k": k, "input_mask": rest, "target_mask": held, "subsets": subsets},
        )

    def _check_stack(self, y: torch.Tensor) -> None:
        if y.ndim < 4 or y.shape[-4] != self.num_splits:
            raise ValueError(
                f"Noise2InverseLoss: in image mode (op=None) y must stack the {self.num_splits} "
                f"sub-reconstructions as (*batch, {self.num_splits}, D, H, W), got {tuple(y.shape)}"
            )

    def _image_split(self, y: torch.Tensor, k: int) -> Split:
        others = [j for j in range(self.num_splits) if j != k]
        rest = y.index_select(-4, torch.tensor(others, device=y.device)).mean(dim=-4)
        return Split(input_y=rest, input_op=None, target_y=y.select(-4, k), target_op=None,
                     info={"k": k})

    def draw_split(self, y, op, cpu, dev) -> Split:
        k = int(torch.randint(self.num_splits, (1,), generator=cpu).item())
        if op is None:
            self._check_stack(y)
            return self._image_split(y, k)
        kind, subsets = self._partition(y, op, cpu)
        return self._subset_split(y, op, kind, subsets, k)

    def evaluate(self, model, y, op) -> torch.Tensor:
        if op is None:
            self._check_stack(y)
            splits = [self._image_split(y, k) for k in range(self.num_splits)]
            return sum(model(s.input_y, None) for s in splits) / self.num_splits
        gen = torch.Generator().manual_seed(self.eval_seed)
        kind, subsets = self._partition(y, op, gen)
        total = None
        for k in range(self.num_splits):
            split = self._subset_split(y, op, kind, subsets, k)
            x = model(split.input_y, split.input_op)
            total = x if total is None else total + x
        return total / self.num_splits

    # ------------------------------------------------------------------ loss
    def _loss(self, x_hat, y, op, model) -> LossOutput:
        split = self._split(model, y)
        if split.target_op is None:  # image mode: the held-out sub-reconstruction is the target
            value = _mean_sq(x_hat, split.target_y.to(x_hat.dtype))
        elif self.target == "measurement":
            sq, _ = residual_norms(split.target_op, x_hat, split.target_y)
            value = sq / max(num_measured(split.target_op, split.target_y), 1)
        else:
            recon = self.reconstruct or _target_reconstruction
            with torch.no_grad():
                ref = recon(split.target_y, split.target_op)
            value = _mean_sq(x_hat, ref.reshape(x_hat.shape).to(x_hat.dtype))
        return LossOutput(value, {self.name: value.detach()})
