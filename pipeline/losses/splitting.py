"""Measurement-splitting losses: the shared machinery and the generic random split.

A splitting loss divides the measurements of each step into an input part (what the network
sees) and a target part (what the loss compares against). It wraps the model once through
``adapt_model``: the returned :class:`SplittingModel` draws a fresh split in training mode, runs
the wrapped reconstructor on the input part and records the split for the loss; in eval mode
it reconstructs from all measurements (SSDU, generic splitting) or averages over the splits
(Noise2Inverse). Train with ``model = loss.adapt_model(model)``; save ``model.model``.

* :class:`SplittingLoss` — each measured entry goes to the target set with probability ``ρ``
  (any operator: its ``measurement_mask`` and ``restrict_measurements``).
* :class:`~pipeline.losses.SSDULoss` (:mod:`.ssdu`) — k-space splits of Cartesian MRI.
* :class:`~pipeline.losses.Noise2InverseLoss` (:mod:`.noise2inverse`) — CT angle subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from operators3d import LinearOperator

from .base import Loss, LossOutput, residual_norms

__all__ = ["Split", "SplittingModel", "SplittingLoss"]


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
        measured = op.measurement_mask()
        shape = op.range_shape
        full = torch.ones(shape, dtype=torch.bool, device=y.device) if measured is None else \
            torch.broadcast_to(measured.to(y.device), shape)
        probs = torch.full(shape, self.rho, dtype=torch.float64, device=y.device)
        target = _bernoulli(probs, dev) & full
        keep = full & ~target
        dtype = y.real.dtype
        return Split(
            input_y=y * keep.to(dtype),
            input_op=op.restrict_measurements(keep),
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
