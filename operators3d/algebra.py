"""The operator algebra: compositions, sums, scalings, adjoints and normal operators.

``A @ B``, ``A + B``, ``A - B``, ``c * A``, ``A.H`` and ``A.normal_operator()`` of a
:class:`~operators3d.LinearOperator` build these nodes; each knows its own adjoint. Also the two
elementary operators everything else is tested against: :class:`Identity` and
:class:`Diagonal`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from .base import LinearOperator

__all__ = [
    "Composition",
    "Sum",
    "Scaled",
    "AdjointOperator",
    "NormalOperator",
    "Identity",
    "Diagonal",
]


def _same_kind(a: bool | None, b: bool | None) -> bool | None:
    return a if a is not None else b


class Composition(LinearOperator):
    """``A @ B``: apply ``B`` then ``A``.

    Shape:
        ``B.domain_shape → A.range_shape``; requires ``A.domain_shape == B.range_shape``.

    Math:
        ``(A B) x = A(B x)``, ``(A B)ᴴ = Bᴴ Aᴴ``.
    """

    def __init__(self, outer: LinearOperator, inner: LinearOperator) -> None:
        if outer.domain_shape != inner.range_shape:
            raise ValueError(
                f"cannot compose {outer.name} @ {inner.name}: {outer.name} expects domain "
                f"{outer.domain_shape}, {inner.name} gives range {inner.range_shape}"
            )
        super().__init__(
            inner.domain_shape,
            outer.range_shape,
            # A kind-agnostic side (identity, real diagonal) inherits its neighbour's kind.
            domain_complex=_same_kind(inner.domain_complex, outer.domain_complex),
            range_complex=_same_kind(outer.range_complex, inner.range_complex),
        )
        self.outer = outer
        self.inner = inner

    @property
    def name(self) -> str:
        return f"({self.outer.name} @ {self.inner.name})"

    def _forward(self, x):
        return self.outer._forward(self.inner._forward(x))

    def _adjoint(self, y):
        return self.inner._adjoint(self.outer._adjoint(y))

    def _make_adjoint(self):
        return Composition(self.inner.H, self.outer.H)


class Sum(LinearOperator):
    """``A + B``.

    Shape:
        same domain and range as ``A`` and ``B``, which must agree.

    Math:
        ``(A + B) x = A x + B x``, ``(A + B)ᴴ = Aᴴ + Bᴴ``.
    """

    def __init__(self, first: LinearOperator, second: LinearOperator) -> None:
        if first.domain_shape != second.domain_shape or first.range_shape != second.range_shape:
            raise ValueError(
                f"cannot add {first.name} and {second.name}: shapes "
                f"{first.range_shape} ← {first.domain_shape} and "
                f"{second.range_shape} ← {second.domain_shape} differ"
            )
        super().__init__(
            first.domain_shape,
            first.range_shape,
            domain_complex=_same_kind(first.domain_complex, second.domain_complex),
            range_complex=_same_kind(first.range_complex, second.range_complex),
        )
        self.first = first
        self.second = second

    @property
    def name(self) -> str:
        return f"({self.first.name} + {self.second.name})"

    def _forward(self, x):
        return self.first._forward(x) + self.second._forward(x)

    def _adjoint(self, y):
        return self.first._adjoint(y) + self.second._adjoint(y)

    def _make_adjoint(self):
        return Sum(self.first.H, self.second.H)


class Scaled(LinearOperator):
    """``c * A`` for a real or complex scalar ``c``.

    Shape:
        that of ``A``.

    Math:
        ``(c A) x = c (A x)``, ``(c A)ᴴ = conj(c) Aᴴ``.
    """

    def __init__(self, scale: numbers.Number | torch.Tensor, op: LinearOperator) -> None:
        if isinstance(scale, torch.Tensor):
            if scale.ndim != 0:
                raise ValueError(f"Scaled: scale must be a scalar, got shape {tuple(scale.shape)}")
            scale = scale.item()
        if not isinstance(scale, numbers.Number):
            raise TypeError(f"Scaled: scale must be a number, got {type(scale).__name__}")
        super().__init__(
            op.domain_shape,
            op.range_shape,
            domain_complex=op.domain_complex,
            range_complex=op.range_complex,
        )
        self.scale = scale
        self.op = op

    @property
    def name(self) -> str:
        return f"{self.scale} * {self.op.name}"

    def _forward(self, x):
        return self.op._forward(x) * self.scale

    def _adjoint(self, y):
        return self.op._adjoint(y) * self.scale.conjugate()

    def _make_adjoint(self):
        return Scaled(self.scale.conjugate(), self.op.H)


class AdjointOperator(LinearOperator):
    """``Aᴴ`` for an operator that knows its ``_adjoint``.

    Shape:
        ``A.range_shape → A.domain_shape``.

    Math:
        ``(Aᴴ)ᴴ = A``.
    """

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(
            op.range_shape,
            op.domain_shape,
            domain_complex=op.range_complex,
            range_complex=op.domain_complex,
        )
        self.op = op

    @property
    def name(self) -> str:
        return f"{self.op.name}.H"

    def check_input(self, x: torch.Tensor, *, adjoint: bool = False) -> None:
        # Errors speak of the original operator ("A.adjoint: ..."), which the user wrote.
        self.op.check_input(x, adjoint=not adjoint)

    def _forward(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._forward(y)

    def _normal(self, x):
        return self.op._forward(self.op._adjoint(x))

    def _make_adjoint(self):
        return self.op


class NormalOperator(LinearOperator):
    """``Aᴴ A``, applied through ``A._normal`` (which may avoid the full intermediate).

    Shape:
        ``A.domain_shape → A.domain_shape``.

    Math:
        ``x ↦ Aᴴ(A x)``; self-adjoint.
    """

    def __init__(self, op: LinearOperator) -> None:
        super().__init__(
            op.domain_shape,
            op.domain_shape,
            domain_complex=op.domain_complex,
            range_complex=op.domain_complex,
        )
        self.op = op

    @property
    def name(self) -> str:
        return f"{self.op.name}.normal"

    def _forward(self, x):
        return self.op._normal(x)

    def _adjoint(self, y):
        return self.op._normal(y)

    def _make_adjoint(self):
        return self


class Identity(LinearOperator):
    """The identity on tensors with trailing shape ``shape``.

    Shape:
        ``shape → shape``.

    Math:
        ``I x = x``.
    """

    def __init__(self, shape: Sequence[int], *, complex: bool | None = None) -> None:
        super().__init__(shape, shape, domain_complex=complex, range_complex=complex)

    def _forward(self, x):
        return x

    def _adjoint(self, y):
        return y

    def _make_adjoint(self):
        return self


class Diagonal(LinearOperator):
    """Elementwise multiplication by fixed weights (a mask, a window, a phase).

    Shape:
        ``shape → shape``; ``weights`` broadcasts to ``shape``.

    Math:
        ``(W x)_i = w_i x_i``, ``Wᴴ`` multiplies by ``conj(w)``.
    """

    def __init__(self, weights: torch.Tensor, shape: Sequence[int] | None = None) -> None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"Diagonal: weights must be a tensor, got {type(weights).__name__}")
        shape = tuple(weights.shape) if shape is None else tuple(shape)
        try:
            torch.broadcast_shapes(weights.shape, shape)
        except RuntimeError as err:
            raise ValueError(
                f"Diagonal: weights of shape {tuple(weights.shape)} do not broadcast to {shape}"
            ) from err
        if torch.broadcast_shapes(weights.shape, shape) != torch.Size(shape):
            raise ValueError(
                f"Diagonal: weights of shape {tuple(weights.shape)} would enlarge shape {shape}"
            )
        cplx = True if weights.is_complex() else None
        super().__init__(shape, shape, domain_complex=cplx, range_complex=cplx)
        if weights.dtype == torch.bool:
            weights = weights.to(torch.get_default_dtype())
        self.register_buffer("weights", weights)

    def _forward(self, x):
        return x * self.weights

    def _adjoint(self, y):
        w = self.weights
        return y * (w.conj() if w.is_complex() else w)
