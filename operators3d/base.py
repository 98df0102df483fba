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

The nodes of the algebra live in :mod:`operators3d.algebra`, the iterations on operators (CG,
the power method) in :mod:`operators3d.krylov`, and the restrictions that splitting losses
build (:class:`~operators3d.restrict.MaskedOperator`, :class:`~operators3d.restrict.IndexSelect`)
in :mod:`operators3d.restrict`.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Sequence

import torch
from torch import nn

__all__ = ["LinearOperator"]

Shape = tuple[int, ...]


def check_broadcast(shape: Sequence[int], target: Sequence[int], what: str, onto: str) -> None:
    """Raise a ``ValueError`` unless ``shape`` broadcasts to ``target`` without enlarging it.

    ``what`` names the tensor in the message (``"MaskedOperator: mask"``), ``onto`` the
    target (``"the range (4, 8) of A"``).
    """
    try:
        out = torch.broadcast_shapes(tuple(shape), tuple(target))
    except RuntimeError as err:
        raise ValueError(f"{what} of shape {tuple(shape)} does not broadcast to {onto}") from err
    if tuple(out) != tuple(target):
        raise ValueError(f"{what} of shape {tuple(shape)} would enlarge {onto}")


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

    Capabilities (what losses and reconstructors ask of an operator; docs/architecture.md,
    "Operator capabilities"). Each has a default that is right for a plain operator measuring
    every entry of its range; an operator overrides those that its physics changes:

    * ``kind`` — ``"mri"``, ``"parallel"`` or ``"cone"`` (CT), or ``None``: picks FBP/FDK
      initial estimates and Noise2Inverse's angle splits; ``is_ct`` says whether it is CT.
    * :meth:`measurement_mask` — which range entries are measurements (``None``: all); every
      loss averages over them, and splitting losses split them.
    * :meth:`kspace_mask` — the sampling mask of a Cartesian k-space grid (``None``: no such
      grid); :class:`~pipeline.losses.SSDULoss` splits it.
    * :meth:`num_measured` — the count of measured entries of ``y`` (from the mask).
    * :meth:`restrict_measurements` — the operator measuring only where a mask is set (default:
      a :class:`~operators3d.restrict.MaskedOperator`); splitting losses' input operators.
    * :meth:`restrict_angles` — the operator of a subset of CT angles (CT only);
      Noise2Inverse's input and target operators.
    * :meth:`lipschitz` — an upper bound of ``‖A‖₂²`` (default: the power method, cached);
      the step size of unrolled networks. Override ``_lipschitz`` to give a cheaper bound.

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
        from .algebra import AdjointOperator

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
        from .algebra import NormalOperator

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
        from .algebra import Composition

        if isinstance(other, LinearOperator):
            return Composition(self, other)
        if isinstance(other, torch.Tensor):
            raise TypeError(f"{self.name} @ tensor is not defined: apply an operator with A(x)")
        return NotImplemented

    def __add__(self, other: object) -> "LinearOperator":
        from .algebra import Sum

        if isinstance(other, LinearOperator):
            return Sum(self, other)
        return NotImplemented

    def __sub__(self, other: object) -> "LinearOperator":
        from .algebra import Scaled, Sum

        if isinstance(other, LinearOperator):
            return Sum(self, Scaled(-1, other))
        return NotImplemented

    def __neg__(self) -> "LinearOperator":
        from .algebra import Scaled

        return Scaled(-1, self)

    def __mul__(self, other: object) -> "LinearOperator":
        from .algebra import Scaled

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

    # ---------------------------------------------------------------- capabilities
    #: What the operator measures: ``"mri"``, ``"parallel"`` / ``"cone"`` (CT) or ``None``.
    kind: str | None = None

    @property
    def is_ct(self) -> bool:
        """Whether the operator is (a restriction of) a CT projector."""
        return self.kind in ("parallel", "cone")

    def measurement_mask(self) -> torch.Tensor | None:
        """Which range entries are measurements: bool, broadcastable to ``range_shape``.

        ``None`` (the default) means every entry is measured. An operator whose range holds
        entries that are not measurements (k-space outside an MRI mask, masked-out entries)
        returns them as ``False``; losses then average over the ``True`` entries only.
        """
        return None

    def kspace_mask(self) -> torch.Tensor | None:
        """The sampling mask ``(H, W)`` or ``(D, H, W)`` of a Cartesian k-space range, else None.

        SSDU splits this grid; :meth:`restrict_measurements` must accept a mask of its shape.
        """
        return None

    def num_measured(self, y: torch.Tensor) -> int:
        """The number of measured entries of ``y`` (its batch dims included).

        Shape:
            ``y``: ``(*batch, *range_shape)``.
        """
        k = len(self.range_shape)
        if y.ndim < k or tuple(y.shape[y.ndim - k :]) != self.range_shape:
            raise ValueError(
                f"num_measured: expected y with trailing shape {self.range_shape} ({self.name}), "
                f"got {tuple(y.shape)}"
            )
        batch = math.prod(y.shape[: y.ndim - k])
        mask = self.measurement_mask()
        if mask is None:
            return batch * math.prod(self.range_shape)
        return batch * int(torch.broadcast_to(mask, self.range_shape).sum())

    def restrict_measurements(self, mask: torch.Tensor) -> "LinearOperator":
        """The operator that measures only where ``mask`` is nonzero (weighted by it if real).

        Default: ``M ∘ A`` (:class:`~operators3d.restrict.MaskedOperator`), right for every
        operator; override it when the operator can restrict itself faster (an MRI operator
        folds a k-space mask into its own).

        Shape:
            ``mask`` broadcastable to ``range_shape``.
        """
        from .restrict import MaskedOperator

        return MaskedOperator(self, mask)

    def restrict_angles(self, index: torch.Tensor | Sequence[int]) -> "LinearOperator":
        """The operator of a subset of the CT angles (range dim ``-2``, sinogram ``(…, A, U)``).

        Default for CT kinds: an :class:`~operators3d.restrict.IndexSelect` that computes all
        angles and keeps some; projectors override it with one that computes only those.

        Shape:
            range ``(…, A, U) → (…, len(index), U)``.
        """
        if not self.is_ct:
            raise NotImplementedError(
                f"{self.name}.restrict_angles: angle subsets are defined for CT operators "
                "(Noise2InverseLoss splits CT angles); a CT operator sets kind='parallel' or "
                "'cone' and implements restrict_angles(index)"
            )
        from .restrict import IndexSelect

        return IndexSelect(self, torch.as_tensor(index, dtype=torch.int64).reshape(-1), dim=-2)

    def lipschitz(self) -> float:
        """An upper bound (generic operators: an estimate) of ``‖A‖₂²``, cached per operator.

        Computed once by :meth:`_lipschitz` without gradients (at least the smallest positive
        float32).

        Math:
            ``L ≥ ‖AᴴA‖₂``; a step ``x − (1/L) Aᴴ(Ax − y)`` does not increase ``‖Ax − y‖``.
        """
        cached = self.__dict__.get("_lipschitz_bound")
        if cached is None:
            with torch.no_grad():
                cached = max(float(self._lipschitz()), torch.finfo(torch.float32).tiny)
            self.__dict__["_lipschitz_bound"] = cached
        return cached

    def _lipschitz(self) -> float:
        """``‖A‖₂²`` by the power method (30 iterations, seeded): converges from below."""
        from .krylov import op_norm

        gen = torch.Generator().manual_seed(0)
        return op_norm(self, num_iters=30, tol=1e-4, generator=gen) ** 2

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
