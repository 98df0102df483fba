"""Noise2Inverse: train on ``K − 1`` measurement subsets to predict the held-out one.

Hendriksen, Pelt & Batenburg, "Noise2Inverse: self-supervised deep convolutional denoising for
tomography", IEEE TCI 2020: ``K`` disjoint angle subsets of a CT scan (the operator's
:meth:`~operators3d.LinearOperator.restrict_angles`); other operators split their measured
entries (:meth:`~operators3d.LinearOperator.restrict_measurements`), and image mode
(``op=None``) stacks precomputed sub-reconstructions.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from operators3d import LinearOperator
from pipeline.classical import classical_reconstruction, filtered_backprojection

from .base import LossOutput, residual_norms
from .consistency import _mean_sq
from .splitting import Split, _SplittingBase

__all__ = ["Noise2InverseLoss", "angle_subsets"]


def _target_reconstruction(y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
    """FBP/FDK for CT (the same as the ``"fbp"`` initial estimate), else the classical one."""
    if op.is_ct:
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
        ``R`` = FBP/FDK (CT, :func:`~pipeline.classical.filtered_backprojection`, as
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
        if op.is_ct:
            return "angles", angle_subsets(op.range_shape[-2], self.num_splits)
        kspace = op.kspace_mask()
        if kspace is not None:
            grid = kspace != 0
        else:
            measured = op.measurement_mask()
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
                input_op=op.restrict_angles(rest.cpu()),
                target_y=y.index_select(-2, held),
                target_op=op.restrict_angles(held.cpu()),
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
            input_op=op.restrict_measurements(rest),
            target_y=y * held.to(dtype),
            target_op=op.restrict_measurements(held),
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
            value = sq / max(split.target_op.num_measured(split.target_y), 1)
        else:
            recon = self.reconstruct or _target_reconstruction
            with torch.no_grad():
                ref = recon(split.target_y, split.target_op)
            value = _mean_sq(x_hat, ref.reshape(x_hat.shape).to(x_hat.dtype))
        return LossOutput(value, {self.name: value.detach()})
