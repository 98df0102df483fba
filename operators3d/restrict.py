"""Restrictions of an operator to part of its measurements: masked entries, selected indices.

Measurement-splitting losses train on a subset of the measurements and compare with another;
these wrappers are the operators of such subsets for *any* operator (an operator that can
restrict itself faster does so in its own ``restrict_measurements`` / ``restrict_angles``):

* :class:`MaskedOperator` — ``M ∘ A``, a 0/1 (or weighting) mask on the range; the default of
  :meth:`~operators3d.LinearOperator.restrict_measurements`.
* :class:`IndexSelect` — ``S ∘ A``, indices along one range dim; the default of
  :meth:`~operators3d.LinearOperator.restrict_angles` for CT (``dim=-2``, angles).

Both report the capabilities of what they wrap (``kind``, the measured entries, ``‖A‖²``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import LinearOperator, check_broadcast
from .fft import real_dtype_of

__all__ = ["MaskedOperator", "IndexSelect"]


class MaskedOperator(LinearOperator):
    """``M ∘ A``: an operator followed by a real 0/1 (or weighting) mask on its range.

    Used by measurement-splitting losses to restrict any operator to a subset of its measured
    entries. ``keep_fraction`` (the mean of the mask over the entries ``op`` measures) lets a
    linear initial estimate compensate for the dropped entries (see
    :func:`classical_reconstruction`).

    Shape:
        ``(*batch, *op.domain_shape) → (*batch, *op.range_shape)``; ``mask`` broadcasts to
        ``op.range_shape``.

    Math:
        ``(M A) x = m ⊙ (A x)``, ``(M A)ᴴ y = Aᴴ(m ⊙ y)``.

    Args:
        op: the operator to restrict.
        mask: real tensor broadcastable to ``op.range_shape`` (bool is converted).
    """

    def __init__(self, op: LinearOperator, mask: torch.Tensor) -> None:
        if not isinstance(op, LinearOperator):
            raise TypeError(f"MaskedOperator: op must be a LinearOperator, got {type(op).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.is_complex():
            raise TypeError(f"MaskedOperator: mask must be a real or bool tensor, got {mask!r:.60}")
        onto = f"the range {op.range_shape} of {op.name}"
        check_broadcast(mask.shape, op.range_shape, "MaskedOperator: mask", onto)
        super().__init__(
            op.domain_shape,
            op.range_shape,
            domain_complex=op.domain_complex,
            range_complex=op.range_complex,
        )
        self.op = op
        # bool stays bool (multiplying keeps the data's dtype); weights are cast per call.
        self.register_buffer("mask", mask.to(device=op.device))
        inner = op.measurement_mask()
        measured = torch.ones((), dtype=torch.bool, device=op.device) if inner is None else inner
        measured = torch.broadcast_to(measured.to(op.device), op.range_shape)
        kept = (self.mask != 0).expand(op.range_shape) & measured
        total = int(measured.sum())
        self.keep_fraction = float(kept.sum()) / total if total else 0.0

    def _weights(self, like: torch.Tensor) -> torch.Tensor:
        if self.mask.dtype == torch.bool:
            return self.mask
        return self.mask.to(real_dtype_of(like.dtype))

    @property
    def name(self) -> str:
        return f"Masked({self.op.name})"

    def check_input(self, x: torch.Tensor, *, adjoint: bool = False) -> None:
        self.op.check_input(x, adjoint=adjoint)

    def _forward(self, x):
        out = self.op._forward(x)
        return out * self._weights(out)

    def _adjoint(self, y):
        return self.op._adjoint(y * self._weights(y))

    def _normal(self, x):
        out = self.op._forward(x)
        w = self._weights(out)
        return self.op._adjoint(out * (w if w.dtype == torch.bool else w * w))

    # ------------------------------------------------------------------ capabilities
    @property
    def kind(self) -> str | None:  # type: ignore[override]
        return self.op.kind

    def measurement_mask(self) -> torch.Tensor:
        """The entries measured by ``op`` where the mask is nonzero."""
        inner = self.op.measurement_mask()
        own = self.mask != 0
        return own if inner is None else own & inner.to(own.device)

    def _lipschitz(self) -> float:
        return float(self.mask.to(torch.float64).abs().max()) ** 2 * self.op.lipschitz()


class IndexSelect(LinearOperator):
    """``S ∘ A``: keep the indices ``index`` along range dim ``dim`` of an operator.

    The generic way to restrict an operator to a subset of angles (``dim=-2`` for the CT
    sinogram ``(D, A, U)``); it computes the whole range and selects, so an operator's own
    ``restrict_angles`` (computing only the kept angles) is preferred where it has one.

    Shape:
        ``(*batch, *op.domain_shape) → (*batch, *range)`` with ``range[dim] = len(index)``.

    Math:
        ``(S A) x = (A x)[…, index, …]``; ``(S A)ᴴ y = Aᴴ(Sᴴ y)``, ``Sᴴ`` scatters into zeros.

    Args:
        op: the operator.
        index: 1-D integer indices (distinct) along ``dim``.
        dim: a negative range dim.
    """

    def __init__(
        self, op: LinearOperator, index: torch.Tensor | Sequence[int], *, dim: int = -2
    ) -> None:
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        k = len(op.range_shape)
        if not -k <= dim < 0:
            raise ValueError(f"IndexSelect: dim must be a negative range dim in [-{k}, -1], got {dim}")
        size = op.range_shape[dim]
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(
                f"IndexSelect: indices must lie in [0, {size}) along dim {dim} of {op.name}'s "
                f"range {op.range_shape}, got {index.tolist()[:8]}..."
            )
        if torch.unique(index).numel() != index.numel():
            raise ValueError("IndexSelect: indices must be distinct")
        rng = list(op.range_shape)
        rng[dim] = index.numel()
        super().__init__(
            op.domain_shape, rng, domain_complex=op.domain_complex, range_complex=op.range_complex
        )
        self.op = op
        self.dim = dim
        self.register_buffer("index", index.to(op.device))

    @property
    def name(self) -> str:
        return f"Select({self.op.name})"

    def _forward(self, x):
        return self.op._forward(x).index_select(self.dim, self.index)

    def _adjoint(self, y):
        shape = y.shape[: y.ndim - len(self.range_shape)] + self.op.range_shape
        full = torch.zeros(shape, dtype=y.dtype, device=y.device)
        full.index_copy_(y.ndim + self.dim, self.index, y)
        return self.op._adjoint(full)

    # ------------------------------------------------------------------ capabilities
    @property
    def kind(self) -> str | None:  # type: ignore[override]
        return self.op.kind

    def measurement_mask(self) -> torch.Tensor | None:
        """The kept indices of ``op``'s measurement mask (``None`` if ``op`` measures all)."""
        inner = self.op.measurement_mask()
        if inner is None:
            return None
        full = torch.broadcast_to(inner, self.op.range_shape)
        return full.index_select(self.dim, self.index.to(full.device))

    def _lipschitz(self) -> float:
        return self.op.lipschitz()
