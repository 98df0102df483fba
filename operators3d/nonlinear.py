"""Non-linear forward models ``y = g(A x)``: a pointwise non-linearity after a linear operator.

Real detectors saturate and quantise. The models here are *outside* the
:class:`~operators3d.LinearOperator` algebra (no ``@``, ``+``, ``.H``): each one composes a
pointwise, real non-linearity ``g`` after a linear operator ``A`` and says honestly what it is.

* :class:`Clip` — ``y = clamp(A x, low, high)``: a detector that saturates (CT: the counts clip
  at the detector's maximum, so the line integrals ``−log(N/I₀)`` clip *from below*).
* :class:`Quantize` — ``y = Q_B(A x)``: a uniform ``B``-bit quantiser on ``[lo, hi]``
  (saturating outside it).
* :class:`Sign` — ``y = sign(A x − τ)``: one-bit measurements (one-bit compressed sensing);
  ``τ`` a number, a tensor, or a seeded dither (:func:`dither_threshold`).

Conventions (all models):

* **Shapes.** ``domain_shape``/``range_shape`` are those of ``A`` (:attr:`linear_part`); leading
  batch dimensions broadcast as for ``A``. ``g`` acts entry by entry on real measurements; on
  a complex range (MRI) it acts on the real and the imaginary part of each entry separately
  (the I and Q channels of a receiver, each with its own ADC or comparator), and
  :meth:`derivative` then has a trailing dimension 2 (real, imaginary). Entries of the range
  that are not measurements (``A.measurement_mask()`` False: k-space outside an MRI mask) read
  0 whatever ``g(0)`` is, and have derivative 0.
* **Jacobian.** ``J(x) = diag(g'(A x)) A``: :meth:`jvp` is ``J(x) v = g'(Ax) ⊙ A v`` and
  :meth:`vjp` is ``J(x)ᵀ w = Aᴴ(g'(Ax) ⊙ w)`` (real inner product ``⟨J v, w⟩ = ⟨v, Jᵀ w⟩``).
  Where ``g`` is piecewise constant (:class:`Quantize`, :class:`Sign`) its derivative is zero
  almost everywhere and useless for training; those models differentiate a documented
  *surrogate* instead (``gradient="straight_through"``), or the exact zero
  (``gradient="zero"``). :meth:`jvp`, :meth:`vjp` and autograd all use the same ``g'``, so they
  are the Jacobian of the surrogate, not of ``g``.
* **Autograd.** Applying a model to a tensor that requires grad goes through one
  :class:`torch.autograd.Function` whose backward is :meth:`vjp`. It saves only ``g'(A x)``,
  as a bool mask when ``g'`` takes one non-zero value (all models here: one byte per
  measurement), never ``A x`` or ``x``; ``A``'s own forward saves nothing either.
* **Precision and device.** A model holds ``A`` as a submodule (and its own bounds as buffers
  when they are tensors): ``.to(device)``, ``.double()``, ``.float()`` move and cast them, with
  ``A``'s precision rules (complex buffers stay complex).

:func:`nonlinear_from_dict` rebuilds a model from its :meth:`~NonLinearForward.to_dict` (the
``detector`` record of a scan, ``docs/scan-format.md``); the pointwise maps :func:`clip_values`,
:func:`quantize_values` and :func:`sign_values` are what the simulator applies to noisy line
integrals.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import torch
from torch import nn

from .base import LinearOperator, check_broadcast

__all__ = [
    "NonLinearForward",
    "Clip",
    "Quantize",
    "Sign",
    "nonlinear_from_dict",
    "clip_values",
    "at_clip_levels",
    "quantize_values",
    "sign_values",
    "dither_shape",
    "dither_threshold",
]

GRADIENTS = ("straight_through", "zero")


# ----------------------------------------------------------------------------- pointwise maps
def clip_values(z: torch.Tensor, low=None, high=None) -> torch.Tensor:
    """``clamp(z, low, high)``; a ``None`` bound is no bound. Bounds are numbers or tensors
    broadcastable to ``z``."""
    if low is None and high is None:
        return z
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):  # clamp takes no mix
        low, high = (b if b is None or isinstance(b, torch.Tensor) else torch.tensor(b, dtype=z.dtype,
                     device=z.device) for b in (low, high))
    return torch.clamp(z, min=low, max=high)


def at_clip_levels(y: torch.Tensor, low=None, high=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(at_low, at_high)``: which measurements of clipped data ``y = clamp(·, low, high)`` read
    a level (``None`` for a missing bound). Clipped data sit exactly at the level; a relative
    ``1e-6`` absorbs the rounding of a level stored at another precision than ``y``. Bounds are
    numbers or tensors broadcastable to ``y``; the rays strictly between are the ones the
    detector passed."""

    def slack(b):
        return 1e-6 * (b.abs().clamp_min(1.0) if isinstance(b, torch.Tensor) else max(abs(b), 1.0))

    at_low = None if low is None else y <= low + slack(low)
    at_high = None if high is None else y >= high - slack(high)
    return at_low, at_high


def quantize_values(z: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """The uniform ``bits``-bit quantiser on ``[lo, hi]``: ``2^bits`` levels
    ``lo + kΔ``, ``Δ = (hi − lo)/(2^bits − 1)``, ``k = round((clamp(z, lo, hi) − lo)/Δ)``
    (``torch.round``: halves to even). Values outside ``[lo, hi]`` read as the end levels."""
    step = (hi - lo) / (2**bits - 1)
    k = torch.round((torch.clamp(z, min=lo, max=hi) - lo) / step)
    return lo + k * step


def sign_values(z: torch.Tensor, threshold: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``+1`` where ``z ≥ threshold``, ``−1`` elsewhere (never 0), in ``z``'s dtype; a tensor
    ``threshold`` broadcasts to ``z``."""
    one = torch.ones((), dtype=z.dtype, device=z.device)
    return torch.where(z >= threshold, one, -one)


# ----------------------------------------------------------------------------- autograd
class _ApplyNonLinear(torch.autograd.Function):
    """``y = g(A x)`` with backward ``Aᴴ(g'(Ax) ⊙ w)``; saves only ``g'(Ax)`` (a bool mask for
    the models here), nothing where ``g' = 0``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, model: "NonLinearForward") -> torch.Tensor:  # type: ignore[override]
        z = model._measure(x)
        deriv = model._dz(z)
        ctx.model = model
        ctx.x_shape = x.shape
        ctx.has_deriv = deriv is not None
        if deriv is not None:
            ctx.save_for_backward(deriv)
        return model._gz(z)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        model = ctx.model
        if not ctx.has_deriv:
            return grad.new_zeros(ctx.x_shape), None
        (deriv,) = ctx.saved_tensors
        # Through A.adjoint (an autograd-aware apply): the backward is itself differentiable in
        # ``grad`` (double backward); g'' is zero almost everywhere, so nothing else is lost.
        return model.linear_part.adjoint(model._scale(grad, deriv)), None


# ----------------------------------------------------------------------------- base
class NonLinearForward(nn.Module):
    """``y = g(A x)``: a pointwise real non-linearity ``g`` after a linear operator ``A``.

    Subclasses implement ``_g(z)`` (the non-linearity on ``z = A x``) and ``_derivative(z)``:
    ``g'(z)`` (or its training surrogate) as a bool mask (the derivative is :attr:`slope`
    where set, 0 elsewhere), a real tensor (the derivative itself), or ``None`` (zero
    everywhere). Models are immutable once built.

    Shape:
        forward and :meth:`jvp`: ``(*batch, *domain_shape) → (*batch, *range_shape)``;
        :meth:`vjp`: ``(*batch, *range_shape) → (*batch, *domain_shape)``.

    Math:
        ``y = g(A x)``, ``J(x) = diag(g'(A x)) A``, ``⟨J(x) v, w⟩ = ⟨v, J(x)ᵀ w⟩``.

    Args:
        linear: the linear operator ``A`` (real range).
    """

    #: The value of ``g'`` where the mask of :meth:`_derivative` is set.
    slope: float = 1.0

    def __init__(self, linear: LinearOperator) -> None:
        super().__init__()
        if not isinstance(linear, LinearOperator):
            raise TypeError(f"{type(self).__name__}: the linear part must be a LinearOperator, got "
                            f"{type(linear).__name__}")
        self.linear = linear

    def _freeze(self) -> None:
        self.__dict__["_frozen"] = True

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen", False) and name != "training":
            raise AttributeError(f"{type(self).__name__} is immutable: build a new model instead of "
                                 f"setting {name!r}")
        super().__setattr__(name, value)

    # ---------------------------------------------------------------- to implement
    def _g(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement _g")

    def _derivative(self, z: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _derivative")

    def to_dict(self) -> dict[str, Any]:
        """The model's parameters as plain JSON types (``{"model": …, …}``), without ``A``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement to_dict")

    # ---------------------------------------------------------------- public API
    @property
    def linear_part(self) -> LinearOperator:
        """``A``: what the model measures before the non-linearity."""
        return self.linear

    @property
    def domain_shape(self) -> tuple[int, ...]:
        return self.linear.domain_shape

    @property
    def range_shape(self) -> tuple[int, ...]:
        return self.linear.range_shape

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def device(self) -> torch.device:
        return self.linear.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``g(A x)``; with gradients, the backward is :meth:`vjp` (see the module docstring)."""
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
            return _ApplyNonLinear.apply(x, self)
        return self._gz(self._measure(x))

    def apply_values(self, z: torch.Tensor) -> torch.Tensor:
        """``g(z)`` on given measurements ``z`` (``A x`` plus fresh noise, say), differentiable
        in ``z`` with this model's ``g'`` (the surrogate where one is used, zero for
        ``gradient="zero"``) — what re-measuring ``A T x̂ + n′`` through the detector needs.

        Math:
            value ``g(z)``; gradient ``∂/∂z = g'(z)``: ``g(z) + g'(z) ⊙ (z − stop_grad(z))``.
        """
        with torch.no_grad():
            value = self._gz(z)
            deriv = self._dz(z) if z.requires_grad else None
        if deriv is None or not torch.is_grad_enabled():
            return value
        return value + self._scale(z - z.detach(), deriv)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``g'(A x)`` (of the surrogate where one is used), as a real tensor of ``A x``'s shape."""
        with torch.no_grad():
            z = self._measure(x)
            return self._dense(self._dz(z), z)

    def jvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J(x) v = g'(A x) ⊙ A v``; ``v`` has ``x``'s shape."""
        self._same_shape(v, x, "jvp", "v", "x")
        with torch.no_grad():
            z = self._measure(x)
            deriv = self._dz(z)
        if deriv is None:
            return torch.zeros_like(z, dtype=torch.promote_types(z.dtype, v.dtype))
        return self._scale(self.linear(v), deriv)

    def vjp(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``J(x)ᵀ w = Aᴴ(g'(A x) ⊙ w)``; ``w`` has the shape of ``forward(x)``."""
        with torch.no_grad():
            z = self._measure(x)
            deriv = self._dz(z)
        self._same_shape(w, z, "vjp", "w", "forward(x)")
        if deriv is None:
            return torch.zeros_like(x, dtype=torch.promote_types(x.dtype, w.dtype))
        return self.linear.adjoint(self._scale(w, deriv))

    # ---------------------------------------------------------------- helpers
    def _measure(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        if z.is_complex() and not self.linear.range_complex:
            raise TypeError(f"{self.name}: {self.linear.name} has a real range but gave complex "
                            f"measurements ({z.dtype}): give it a real x")
        return z

    def _measured(self, like: torch.Tensor) -> torch.Tensor | None:
        """``A``'s measurement mask on the real parts of ``like`` (``None``: all measured)."""
        mask = self.linear.measurement_mask()
        if mask is None:
            return None
        mask = mask.to(like.device)
        return mask.unsqueeze(-1) if like.is_complex() else mask

    def _gz(self, z: torch.Tensor) -> torch.Tensor:
        """``g`` on ``z`` (on its real and imaginary parts for a complex ``z``), zero at the
        entries that are not measurements."""
        out = self._g(torch.view_as_real(z) if z.is_complex() else z)
        mask = self._measured(z)
        if mask is not None:
            out = torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return torch.view_as_complex(out.contiguous()) if z.is_complex() else out

    def _dz(self, z: torch.Tensor) -> torch.Tensor | None:
        """``g'`` on ``z``'s real parts (a trailing dimension of 2 for a complex ``z``), zero
        at the entries that are not measurements."""
        deriv = self._derivative(torch.view_as_real(z) if z.is_complex() else z)
        mask = self._measured(z)
        if deriv is None or mask is None:
            return deriv
        return deriv & mask if deriv.dtype == torch.bool else deriv * mask

    def _scale(self, w: torch.Tensor, deriv: torch.Tensor) -> torch.Tensor:
        if w.is_complex():
            return torch.view_as_complex(self._scale(torch.view_as_real(w), deriv).contiguous())
        if deriv.dtype == torch.bool:
            out = torch.where(deriv, w, torch.zeros((), dtype=w.dtype, device=w.device))
            return out if self.slope == 1.0 else out * self.slope
        return w * deriv

    def _dense(self, deriv: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        parts = torch.view_as_real(z) if z.is_complex() else z
        if deriv is None:
            return torch.zeros_like(parts)
        if deriv.dtype == torch.bool:
            return deriv.to(parts.dtype) * self.slope
        return deriv

    def _same_shape(self, t: torch.Tensor, ref: torch.Tensor, where: str, what: str, like: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{self.name}.{where}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{self.name}.{where}: {what} must have the shape of {like}, "
                             f"{tuple(ref.shape)}, got {tuple(t.shape)}")

    # ---------------------------------------------------------------- precision and device
    def to(self, *args, **kwargs) -> "NonLinearForward":
        """Move/cast ``A`` with its own rules (:meth:`LinearOperator.to`) and the model's tensor
        bounds to the real dtype of the precision; returns ``self``."""
        self.linear.to(*args, **kwargs)
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        from .fft import real_dtype_of

        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = buf.to(device, real_dtype_of(dtype) if dtype is not None else None,
                                            non_blocking)
        return self

    def double(self) -> "NonLinearForward":
        return self.to(torch.float64)

    def float(self) -> "NonLinearForward":
        return self.to(torch.float32)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "model")

    def __repr__(self) -> str:
        return f"{self.name}({self.linear.name}, {self.extra_repr()})"


def _number(value: Any, what: str, owner: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {what} must be a real number, got {value!r}")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{owner}: {what} must not be NaN")
    return out


def _gradient(value: str, owner: str) -> str:
    if value not in GRADIENTS:
        raise ValueError(f"{owner}: gradient must be one of {GRADIENTS}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- models
class Clip(NonLinearForward):
    """A saturating detector: ``y = clamp(A x, low, high)``.

    The derivative is exact: ``g'(z) = 1`` for ``low ≤ z ≤ high`` and 0 outside. At the kinks
    ``z = low`` and ``z = high`` (where ``g`` has no derivative) the one-sided derivative from
    inside is taken, 1 — the convention of ``torch.clamp``: a prediction exactly at the level
    still receives a gradient.

    CT: a detector whose counts saturate at ``N_max`` clips the line integrals
    ``y = −log(N/I₀)`` from below at ``low = −log(N_max/I₀)``; photon-starved rays (a zero count
    read as one) clip them from above at ``high = log I₀``.

    Args:
        linear: ``A`` (real range).
        low, high: the bounds; a number, a tensor broadcastable to ``A.range_shape`` (a level
            per detector pixel, kept as a buffer), or ``None`` for no bound (not both).
            ``low < high`` everywhere.
    """

    def __init__(self, linear: LinearOperator, low: Any = None, high: Any = None) -> None:
        super().__init__(linear)
        if linear.range_complex and any(isinstance(b, torch.Tensor) for b in (low, high)):
            raise TypeError("Clip: a complex range takes number bounds (one level for the real and the "
                            "imaginary parts), not tensors")
        if low is None and high is None:
            raise ValueError("Clip: give low, high or both (without either, y = A x is linear: "
                             "use the linear operator itself)")
        bounds = {}
        for what, value in (("low", low), ("high", high)):
            if isinstance(value, torch.Tensor):
                check_broadcast(value.shape, linear.range_shape, f"Clip: {what}",
                                f"the range {linear.range_shape} of {linear.name}")
                if value.is_complex() or not value.is_floating_point():
                    raise TypeError(f"Clip: {what} must be a real floating tensor, got {value.dtype}")
                if torch.isnan(value).any():
                    raise ValueError(f"Clip: {what} must not hold NaN")
                bounds[what] = value
            else:
                bounds[what] = _number(value, what, "Clip", allow_none=True)
        lo, hi = bounds["low"], bounds["high"]
        if lo is not None and hi is not None and not bool(torch.all(torch.as_tensor(lo) < torch.as_tensor(hi))):
            raise ValueError(f"Clip: low must be < high everywhere, got low={low!r}, high={high!r}")
        for what, value in bounds.items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(what, value.detach().clone())
            else:
                setattr(self, what, value)
        self._freeze()

    def _bounds(self, z: torch.Tensor):
        # Tensor bounds at the measurements' dtype (a float64 level must not promote float32 data).
        return tuple(b.to(z.dtype) if isinstance(b, torch.Tensor) else b for b in (self.low, self.high))

    def _g(self, z):
        return clip_values(z, *self._bounds(z))

    def _derivative(self, z):
        low, high = self._bounds(z)
        inside = torch.ones(z.shape, dtype=torch.bool, device=z.device)
        if low is not None:
            inside &= z >= low
        if high is not None:
            inside &= z <= high
        return inside

    def to_dict(self) -> dict[str, Any]:
        def plain(v):
            return v.tolist() if isinstance(v, torch.Tensor) else v

        return {"model": "clip", "low": plain(self.low), "high": plain(self.high)}


class Quantize(NonLinearForward):
    """A uniform ``B``-bit quantiser on ``[lo, hi]``: ``y = Q_B(A x)`` (:func:`quantize_values`).

    ``2^B`` levels ``lo + kΔ``, ``Δ = (hi − lo)/(2^B − 1)`` (both ends are levels; ``B = 1``
    reads ``lo`` below the midpoint and ``hi`` from it on); values outside ``[lo, hi]``
    saturate at the end levels, as an ADC does.

    ``Q_B`` is piecewise constant: its derivative is 0 almost everywhere (undefined at the
    jumps). ``gradient="straight_through"`` (default) trains with the *clipped straight-through
    estimator* — the derivative of the surrogate ``clamp(z, lo, hi)`` (``Q_B`` with infinitely
    many levels): 1 on ``[lo, hi]`` (ends included, as :class:`Clip`), 0 outside, where more
    light or less cannot change the reading. :meth:`jvp`, :meth:`vjp` and autograd are then the
    Jacobian of that surrogate, not of ``Q_B``. ``gradient="zero"`` uses the exact derivative
    (zero): no gradient passes through the quantiser.

    Args:
        linear: ``A`` (real range).
        bits: ``B``, 1 to 32.
        lo, hi: the quantiser's range, finite, ``lo < hi``.
        gradient: ``"straight_through"`` or ``"zero"``.
    """

    def __init__(self, linear: LinearOperator, bits: int, lo: float, hi: float, *,
                 gradient: str = "straight_through") -> None:
        super().__init__(linear)
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise TypeError(f"Quantize: bits must be a whole number, got {bits!r}")
        if not 1 <= int(bits) <= 32:
            raise ValueError(f"Quantize: bits must be between 1 and 32, got {bits}")
        lo_f, hi_f = _number(lo, "lo", "Quantize"), _number(hi, "hi", "Quantize")
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or not lo_f < hi_f:
            raise ValueError(f"Quantize: the range must be finite with lo < hi, got lo={lo!r}, hi={hi!r}")
        self.bits, self.lo, self.hi = int(bits), lo_f, hi_f
        self.gradient = _gradient(gradient, "Quantize")
        self._freeze()

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def step(self) -> float:
        """``Δ``, the distance between levels."""
        return (self.hi - self.lo) / (self.levels - 1)

    def _g(self, z):
        return quantize_values(z, self.bits, self.lo, self.hi)

    def _derivative(self, z):
        if self.gradient == "zero":
            return None
        return (z >= self.lo) & (z <= self.hi)

    def to_dict(self) -> dict[str, Any]:
        return {"model": "quantize", "bits": self.bits, "low": self.lo, "high": self.hi,
                "gradient": self.gradient}


class Sign(NonLinearForward):
    """One-bit measurements: ``y = sign(A x − τ)`` in ``{−1, +1}`` (``+1`` where ``A x ≥ τ``).

    ``sign`` has derivative 0 almost everywhere. ``gradient="straight_through"`` (default)
    trains with the derivative of the hard-tanh surrogate ``clamp((z − τ)/width, −1, 1)``:
    ``1/width`` where ``|A x − τ| ≤ width``, 0 elsewhere (the clipped straight-through
    estimator; it tends to ``sign`` as ``width → 0``). :meth:`jvp`, :meth:`vjp` and autograd
    are the Jacobian of that surrogate. ``gradient="zero"`` is the exact derivative: the
    choice of Tachella & Jacques (2023, SSBM), whose measurement consistency never
    differentiates ``sign`` (a logistic loss ``log(1 + e^{−y ⊙ A x̂})`` on the
    :attr:`linear_part`) and whose equivariant term passes no gradient through the
    re-measurement ``sign(A T x̂)``.

    **Tensor and dithered thresholds.** ``τ`` may be a tensor, one level per measurement: it
    broadcasts to the *real parts* of the range, ``A.range_shape`` for a real range and
    ``(*A.range_shape, 2)`` (real, imaginary: each part has its own comparator) for a complex
    one; it is kept as a buffer (cast to the measurements' dtype when applied). A *dither*
    ``{"amplitude": Δ, "seed": s}`` adds :func:`dither_threshold` to the number ``threshold``:
    ``τ = threshold + u``, ``u ~ U[−Δ, Δ)`` drawn from ``s`` once per entry of the range with
    its D axis (``range_shape[-3]``: MRI ``(C, D, kH, kW)``, parallel-beam CT ``(D, A, U)``)
    of size 1, so every D-slab of a scan sees the same ``τ`` and a slab operator rebuilds it
    from the record alone. With ``|A x| ≤ Δ``, ``E[sign(A x − τ)] = A x / Δ``: the bits keep
    the amplitudes (and the scale), which one bit about 0 loses.

    Args:
        linear: ``A`` (real or complex range).
        threshold: ``τ`` — a number (0: one-bit compressed sensing; CT line integrals are
            non-negative and need a positive one) or a real floating tensor as above.
        width: the surrogate's half-width, ``> 0``, in the units of ``A x``.
        gradient: ``"straight_through"`` or ``"zero"``.
        dither: ``None`` or ``{"amplitude": Δ > 0, "seed": int}`` (needs a number ``threshold``).
    """

    def __init__(self, linear: LinearOperator, threshold: Any = 0.0, *, width: float = 1.0,
                 gradient: str = "straight_through", dither: Mapping[str, Any] | None = None) -> None:
        super().__init__(linear)
        w = _number(width, "width", "Sign")
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"Sign: width must be finite and > 0, got {width!r}")
        parts = tuple(linear.range_shape) + ((2,) if linear.range_complex else ())
        tensor = None
        if isinstance(threshold, torch.Tensor):
            if dither is not None:
                raise ValueError("Sign: a dither adds to a number threshold, not to a tensor one")
            if threshold.is_complex() or not threshold.is_floating_point():
                raise TypeError(f"Sign: threshold must be a real floating tensor, got {threshold.dtype}")
            check_broadcast(threshold.shape, parts, "Sign: threshold",
                            f"the real parts {parts} of the range of {linear.name}")
            if not bool(torch.isfinite(threshold).all()):
                raise ValueError("Sign: threshold must be finite everywhere")
            offset, tensor = None, threshold.detach().clone()
        else:
            offset = _number(threshold, "threshold", "Sign")
            if not math.isfinite(offset):
                raise ValueError(f"Sign: threshold must be finite, got {threshold!r}")
        self.dither = None
        if dither is not None:
            if not isinstance(dither, Mapping) or set(dither) != {"amplitude", "seed"}:
                raise ValueError(f"Sign: dither must be {{'amplitude': Δ, 'seed': s}}, got {dither!r}")
            amp = _number(dither["amplitude"], "dither amplitude", "Sign")
            seed = dither["seed"]
            if not (math.isfinite(amp) and amp > 0):
                raise ValueError(f"Sign: the dither amplitude must be finite and > 0, got {dither['amplitude']!r}")
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"Sign: the dither seed must be a whole number, got {seed!r}")
            self.dither = {"amplitude": amp, "seed": int(seed)}
            tensor = offset + dither_threshold(linear.range_shape, linear.range_complex, amp, int(seed))
        self.offset = offset
        if tensor is None:
            self.threshold = offset
        else:
            self.register_buffer("threshold", tensor)
        self.width = w
        self.slope = 1.0 / w
        self.gradient = _gradient(gradient, "Sign")
        self._freeze()

    def _tau(self, z: torch.Tensor):
        t = self.threshold
        return t.to(z.dtype) if isinstance(t, torch.Tensor) else t

    def _g(self, z):
        return sign_values(z, self._tau(z))

    def _derivative(self, z):
        if self.gradient == "zero":
            return None
        return (z - self._tau(z)).abs() <= self.width

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": "sign"}
        if self.dither is not None:
            out.update(threshold=self.offset, dither=dict(self.dither))
        else:
            t = self.threshold
            out["threshold"] = t.tolist() if isinstance(t, torch.Tensor) else t
        return {**out, "width": self.width, "gradient": self.gradient}


def dither_shape(range_shape: tuple[int, ...], complex_range: bool) -> tuple[int, ...]:
    """The shape of a dither on ``range_shape``: its D axis (``-3``) of size 1 (the dither
    repeats along D, so a D-slab's is the scan's), and a trailing 2 (real, imaginary) for a
    complex range. Ranges of fewer than 3 axes are taken whole."""
    shape = list(range_shape)
    if len(shape) >= 3:
        shape[-3] = 1
    return tuple(shape) + ((2,) if complex_range else ())


def dither_threshold(range_shape: tuple[int, ...], complex_range: bool, amplitude: float, seed: int) -> torch.Tensor:
    """The dither ``u = Δ (2 r − 1)``, ``r ~ U[0, 1)`` (``torch.rand``, float64, CPU generator
    seeded with ``seed``), of shape :func:`dither_shape`: the same numbers for the same
    ``(seed, shape)`` on every machine and for every D-slab of a range."""
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    r = torch.rand(dither_shape(tuple(range_shape), complex_range), generator=gen, dtype=torch.float64)
    return float(amplitude) * (2.0 * r - 1.0)


_MODELS = {"clip": Clip, "quantize": Quantize, "sign": Sign}


def nonlinear_from_dict(data: Mapping[str, Any], linear: LinearOperator) -> NonLinearForward:
    """The model of ``data`` (a :meth:`NonLinearForward.to_dict`, or a scan's ``detector``
    record, whose other keys are ignored) after ``linear``."""
    if not isinstance(data, Mapping):
        raise TypeError(f"nonlinear_from_dict: expected a mapping, got {type(data).__name__}")
    kind = data.get("model")
    if kind not in _MODELS:
        raise ValueError(f"nonlinear_from_dict: 'model' must be one of {sorted(_MODELS)}, got {kind!r}")
    try:
        if kind == "clip":  # a level per detector pixel is stored as nested lists
            low, high = (torch.tensor(b, dtype=torch.float64) if isinstance(b, (list, tuple)) else b
                         for b in (data.get("low"), data.get("high")))
            return Clip(linear, low, high)
        if kind == "quantize":
            return Quantize(linear, data["bits"], data["low"], data["high"],
                            gradient=data.get("gradient", "straight_through"))
        threshold = data.get("threshold", 0.0)
        if isinstance(threshold, (list, tuple)):  # a level per measurement part, as nested lists
            threshold = torch.tensor(threshold, dtype=torch.float64)
        return Sign(linear, threshold, width=data.get("width", 1.0),
                    gradient=data.get("gradient", "straight_through"), dither=data.get("dither"))
    except KeyError as err:
        raise ValueError(f"nonlinear_from_dict: a {kind!r} model needs {err.args[0]!r}") from None
