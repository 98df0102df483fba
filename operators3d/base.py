"""The linear-operator algebra every physics model in recon3d is built from.

A :class:`LinearOperator` maps tensors whose trailing dimensions are ``domain_shape`` to tensors
whose trailing dimensions are ``range_shape``; leading dimensions broadcast (a batch never goes
through a Python loop). ``A @ B``, ``A + B``, ``A - B``, ``c * A`` and ``A.H`` build new nodes
that know their own adjoint; ``A @ B`` never means "apply" (call ``A(x)`` for that).

Autograd: applying an operator goes through one :class:`torch.autograd.Function` whose backward
is the adjoint (and the adjoint's backward the forward). Nothing of the input is saved for
backward, so a training step holds no operator intermediates however large the slab.
Operator tensors (masks, coil maps, angles) are buffers: ``.to(device)`` moves them, and no
gradient flows into them.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "LinearOperator",
    "Composition",
    "Sum",
    "Scaled",
    "AdjointOperator",
    "NormalOperator",
    "Identity",
    "Diagonal",
    "op_norm",
    "conjugate_gradient",
]

Shape = tuple[int, ...]


def _as_shape(shape: Sequence[int], what: str, owner: str) -> Shape:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"{owner}: {what} must be a sequence of ints, got {shape!r}") from err
    if any(s <= 0 for s in out):
        raise ValueError(f"{owner}: {what} must be positive, got {out}")
    return out


class _ApplyLinear(torch.autograd.Function):
    """``y = A x`` with backward ``A^H g``; saves no tensor for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: "LinearOperator") -> torch.Tensor:  # type: ignore[override]
        ctx.op = op
        ctx.input_is_real = not x.is_complex()
        return op._forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        adj = ctx.op.H
        # Going through apply again makes the backward differentiable (double backward).
        if torch.is_grad_enabled() and grad.requires_grad:
            g = _ApplyLinear.apply(grad, adj)
        else:
            g = adj._forward(grad)
        if ctx.input_is_real and g.is_complex():
            # A real input sees the real part of the (Wirtinger) gradient.
            g = g.real
        return g, None


class LinearOperator(nn.Module):
    """A linear map between tensors with fixed trailing shapes.

    Subclasses implement ``_forward`` and ``_adjoint`` on already-checked tensors and may
    override ``_normal`` (``Aᴴ A`` without the intermediate) and ``_make_adjoint``.

    Shape:
        forward: ``(*batch, *domain_shape) → (*batch, *range_shape)``;
        adjoint: ``(*batch, *range_shape) → (*batch, *domain_shape)``.

    Math:
        ``⟨A x, y⟩ = ⟨x, Aᴴ y⟩`` with the plain ``vdot`` over flattened tensors.

    Args:
        domain_shape: trailing shape of inputs.
        range_shape: trailing shape of outputs.
        domain_complex: ``True`` if inputs must be complex, ``False`` if they must be real,
            ``None`` if either is accepted.
        range_complex: the same for the adjoint's inputs.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_freezes", False):
            return

        def frozen_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls:  # the outermost __init__ has finished
                self.__dict__["_frozen"] = True

        frozen_init.__wrapped__ = init  # type: ignore[attr-defined]
        frozen_init.__doc__ = init.__doc__
        frozen_init._freezes = True  # type: ignore[attr-defined]
        cls.__init__ = frozen_init  # type: ignore[method-assign]

    def __setattr__(self, name: str, value) -> None:
        # Operators are immutable once built: a changed mask or geometry is a new operator.
        # ``training`` is nn.Module's own flag (train()/eval()), harmless for a linear map.
        if self.__dict__.get("_frozen", False) and name != "training":
            raise AttributeError(
                f"{type(self).__name__} is immutable: build a new operator instead of setting "
                f"{name!r}"
            )
        super().__setattr__(name, value)

    def __init__(
        self,
        domain_shape: Sequence[int],
        range_shape: Sequence[int],
        *,
        domain_complex: bool | None = None,
        range_complex: bool | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.domain_shape: Shape = _as_shape(domain_shape, "domain_shape", name)
        self.range_shape: Shape = _as_shape(range_shape, "range_shape", name)
        self.domain_complex = domain_complex
        self.range_complex = range_complex

    # ---------------------------------------------------------------- to implement
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _adjoint")

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self._forward(x))

    def _make_adjoint(self) -> "LinearOperator":
        return AdjointOperator(self)

    # ---------------------------------------------------------------- public API
    @property
    def name(self) -> str:
        return type(self).__name__

    def check_input(self, x: torch.Tensor, *, adjoint: bool = False) -> None:
        """Raise a clear error if ``x`` does not fit the domain (or range, for ``adjoint``)."""
        shape = self.range_shape if adjoint else self.domain_shape
        want_complex = self.range_complex if adjoint else self.domain_complex
        where = f"{self.name}.{'adjoint' if adjoint else 'forward'}"
        what = "range" if adjoint else "domain"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
        k = len(shape)
        if x.ndim < k or tuple(x.shape[x.ndim - k :]) != shape:
            raise ValueError(
                f"{where}: expected trailing shape {shape} ({what}), got {tuple(x.shape)}"
            )
        if want_complex is True and not x.is_complex():
            raise TypeError(f"{where}: expected a complex tensor, got dtype {x.dtype}")
        if want_complex is False and not x.is_floating_point():
            raise TypeError(f"{where}: expected a real floating tensor, got dtype {x.dtype}")
        if want_complex is None and not (x.is_complex() or x.is_floating_point()):
            raise TypeError(f"{where}: expected a floating or complex tensor, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator: ``A x``."""
        self.check_input(x)
        return self._apply_checked(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the adjoint: ``Aᴴ y``."""
        self.check_input(y, adjoint=True)
        return self.H._apply_checked(y)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the normal operator ``Aᴴ A x`` (as one node: its backward is itself)."""
        return self.normal_operator()(x)

    def normal_operator(self) -> "LinearOperator":
        """``Aᴴ A`` as an operator whose forward uses ``_normal`` (cached)."""
        return self._cached("_normal_op", lambda: NormalOperator(self))

    def _apply_checked(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _ApplyLinear.apply(x, self)
        return self._forward(x)

    @property
    def H(self) -> "LinearOperator":
        """The adjoint operator; ``A.H.H is A``."""
        origin = self.__dict__.get("_adjoint_of")
        if origin is not None:
            return origin
        adjoint = self._cached("_adjoint_op", self._make_adjoint)
        adjoint.__dict__.setdefault("_adjoint_of", self)
        return adjoint

    def __getstate__(self) -> dict:
        # Weak references neither pickle nor deep-copy (a copy would share the original's
        # adjoint): derived operators are rebuilt on demand.
        state = dict(super().__getstate__())
        state.pop("_adjoint_op", None)
        state.pop("_normal_op", None)
        return state

    def _cached(self, key: str, make) -> "LinearOperator":
        """A derived operator (adjoint, normal) cached by weak reference.

        The derived operator holds ``self`` strongly (``A.H.H`` returns its origin), ``self``
        holds it weakly: a strong reference both ways is a cycle that only Python's cyclic
        GC frees, and an applied operator's buffers (coil maps, tables) then outlive it.
        Outside nn.Module's registry, so ``state_dict`` and ``.to`` never see it.
        """
        ref = self.__dict__.get(key)
        derived = ref() if ref is not None else None
        if derived is None:
            derived = make()
            self.__dict__[key] = weakref.ref(derived)
        return derived

    # ---------------------------------------------------------------- algebra
    def __matmul__(self, other: object) -> "LinearOperator":
        if isinstance(other, LinearOperator):
            return Composition(self, other)
        if isinstance(other, torch.Tensor):
            raise TypeError(f"{self.name} @ tensor is not defined: apply an operator with A(x)")
        return NotImplemented

    def __add__(self, other: object) -> "LinearOperator":
        if isinstance(other, LinearOperator):
            return Sum(self, other)
        return NotImplemented

    def __sub__(self, other: object) -> "LinearOperator":
        if isinstance(other, LinearOperator):
            return Sum(self, Scaled(-1, other))
        return NotImplemented

    def __neg__(self) -> "LinearOperator":
        return Scaled(-1, self)

    def __mul__(self, other: object) -> "LinearOperator":
        if isinstance(other, torch.Tensor) and other.ndim > 0:
            raise TypeError(
                f"{self.name} * tensor is not defined: apply with A(x), scale with a number"
            )
        if isinstance(other, (numbers.Number, torch.Tensor)):
            return Scaled(other, self)
        return NotImplemented

    __rmul__ = __mul__

    # ---------------------------------------------------------------- precision and device
    def to(self, *args, **kwargs) -> "LinearOperator":
        """Move to a device and/or change precision, keeping each buffer's kind.

        nn.Module.to(float64) would cast complex buffers (coil maps, phases) to real and drop
        their imaginary parts; here a dtype sets the *precision*: complex buffers become the
        complex dtype of that precision, real ones the real dtype, bool/int ones stay.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None:
            return super().to(*args, **kwargs)
        from .fft import complex_dtype_of, real_dtype_of

        def convert(t: torch.Tensor) -> torch.Tensor:
            if t.is_complex():
                return t.to(device, complex_dtype_of(dtype), non_blocking)
            if t.is_floating_point():
                return t.to(device, real_dtype_of(dtype), non_blocking)
            return t.to(device, non_blocking=non_blocking)

        return self._apply(convert)

    def double(self) -> "LinearOperator":
        """Double precision: float64 and complex128 buffers."""
        return self.to(torch.float64)

    def float(self) -> "LinearOperator":
        """Single precision: float32 and complex64 buffers."""
        return self.to(torch.float32)

    # ---------------------------------------------------------------- helpers
    def reference_tensor(self) -> torch.Tensor | None:
        """The first floating or complex buffer (gives the operator's device and precision)."""
        for b in self.buffers():
            if b.is_floating_point() or b.is_complex():
                return b
        return None

    @property
    def device(self) -> torch.device:
        ref = self.reference_tensor()
        return ref.device if ref is not None else torch.device("cpu")

    def domain_dtype(self, precision: torch.dtype | None = None) -> torch.dtype:
        """The dtype of a natural input (complex for complex domains) at the operator's precision."""
        ref = self.reference_tensor()
        base = precision or (ref.dtype if ref is not None else torch.get_default_dtype())
        from .fft import complex_dtype_of, real_dtype_of

        return complex_dtype_of(base) if self.domain_complex else real_dtype_of(base)

    def range_dtype(self, precision: torch.dtype | None = None) -> torch.dtype:
        """The dtype of a natural adjoint input at the operator's precision."""
        ref = self.reference_tensor()
        base = precision or (ref.dtype if ref is not None else torch.get_default_dtype())
        from .fft import complex_dtype_of, real_dtype_of

        return complex_dtype_of(base) if self.range_complex else real_dtype_of(base)

    def extra_repr(self) -> str:
        return f"{self.range_shape} ← {self.domain_shape}"

    def __repr__(self) -> str:  # one line, shapes first: "Name(range ← domain)"
        return f"{self.name}({self.extra_repr()})"


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


# -------------------------------------------------------------------- algorithms
def _batch_dot(a: torch.Tensor, b: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Re⟨a, b⟩ over the last ``num_dims`` dims, one value per leading index."""
    dims = tuple(range(-num_dims, 0))
    if a.is_complex():
        return (a.conj() * b).real.sum(dim=dims)
    return (a * b).sum(dim=dims)


def op_norm(
    op: LinearOperator,
    *,
    num_iters: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """The spectral norm ``‖A‖₂`` by the power method on ``Aᴴ A``.

    Math:
        ``v ← AᴴA v / ‖AᴴA v‖``, ``‖A‖₂ = sqrt(‖AᴴA v‖)`` at convergence (relative change < tol).
    """
    dtype = dtype or op.domain_dtype()
    x = torch.randn(op.domain_shape, dtype=dtype, generator=generator)
    x = x.to(op.device)
    x = x / torch.linalg.vector_norm(x)
    normal = op.normal_operator()
    estimate = 0.0
    with torch.no_grad():
        for _ in range(num_iters):
            z = normal(x)
            new = float(torch.linalg.vector_norm(z))
            if new == 0.0:
                return 0.0
            x = z / new
            if abs(new - estimate) <= tol * new:
                estimate = new
                break
            estimate = new
    return math.sqrt(estimate)


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    num_dims: int | None = None,
    num_iters: int = 50,
    tol: float = 1e-6,
    damping: float = 0.0,
) -> torch.Tensor:
    """Solve ``(N + λ I) x = b`` for a Hermitian positive (semi-)definite ``N``, batch-wise.

    Each leading index of ``rhs`` is its own system (inner products over the last ``num_dims``
    dims; all dims if ``None``), so a batch needs no Python loop. Stops when every system's
    residual falls below ``tol · ‖b‖`` or after ``num_iters`` iterations. Differentiable if
    ``normal`` is (unrolled).

    Shape:
        ``rhs``: ``(*batch, *domain)``; returns the same shape.

    Math:
        Hestenes–Stiefel CG: ``r = b − (N+λI)x``, ``p = r``, ``α = ⟨r,r⟩/⟨p,(N+λI)p⟩``, ...
    """
    if isinstance(normal, LinearOperator):
        apply = normal
        if num_dims is None:
            num_dims = len(normal.domain_shape)
    else:
        apply = normal
    num_dims = rhs.ndim if num_dims is None else num_dims
    lead = rhs.shape[: rhs.ndim - num_dims]
    expand = (...,) + (None,) * num_dims

    def system(v: torch.Tensor) -> torch.Tensor:
        out = apply(v)
        return out + damping * v if damping else out

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - system(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rs = _batch_dot(r, r, num_dims)
    b_norm2 = _batch_dot(rhs, rhs, num_dims)
    threshold = (tol**2) * b_norm2
    for _ in range(num_iters):
        if bool((rs <= threshold).all()):
            break
        q = system(p)
        denom = _batch_dot(p, q, num_dims)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0)
        x = x + alpha[expand] * p
        r = r - alpha[expand] * q
        rs_new = _batch_dot(r, r, num_dims)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), 0)
        p = r + beta[expand] * p
        rs = rs_new
    assert x.shape[: len(lead)] == lead
    return x
