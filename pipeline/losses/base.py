"""The loss contract, weighted sums, per-step random generators and a memory-light residual.

Contract (DESIGN.md): ``loss(x_hat, y, op, model) -> LossOutput(total, parts)`` where
``x_hat = model(y, op)`` is the reconstruction the training loop already computed, ``y`` the
measurements ``(*batch, *op.range_shape)``, ``op`` the slab's operator and ``model`` the
(adapted) reconstructor, which losses such as EI and SURE run again. Splitting losses wrap the
model once, ``model = loss.adapt_model(model)``, before training. A supervised loss takes
``reference=``; the base class passes the reference only to losses that declare
``needs_reference``, so self-supervised losses never see it.

Conventions (METHODS.md): squared errors are averaged over *measured* entries (entries outside
an MRI mask are not measurements and count in no mean); a complex entry contributes ``|z|²``;
for complex data a noise ``sigma`` is the standard deviation of the real and of the imaginary
part each.

Randomness: each loss owns a CPU ``torch.Generator`` seeded by ``seed=``; every call draws one
64-bit seed from it and makes the generators of that step with :func:`step_generators`, so a
seed fixes every transform, probe, noise and split, and the state travels in the loss's
``state_dict()`` (``_extra_state``) for exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping, Sequence

import torch
from torch import nn

from operators3d import LinearOperator

__all__ = [
    "LossOutput",
    "Loss",
    "WeightedSum",
    "step_generators",
    "squared_residual",
    "residual_norms",
]


@dataclass
class LossOutput:
    """A loss value and its named parts.

    Attributes:
        total: the scalar to minimise (carries gradients).
        parts: named scalars for logging (detached), e.g. ``{"mc": ..., "ei": ...}``.
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def step_generators(
    master: torch.Generator, device: torch.device | str
) -> tuple[torch.Generator, torch.Generator]:
    """The generators of one step: ``(cpu, device)``, seeded by one draw from ``master``.

    On CPU both are the same generator object (draws interleave in call order); on another
    device the second is a generator on that device with the same seed.

    Math:
        ``s = randint(0, 2⁶², generator=master)``; ``cpu = Generator().manual_seed(s)``.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=master).item())
    cpu = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    if device.type == "cpu":
        return cpu, cpu
    return cpu, torch.Generator(device=device).manual_seed(seed)


class Loss(nn.Module):
    """Base class: ``loss(x_hat, y, op, model) -> LossOutput``; combine with ``+`` and ``*``.

    Subclasses implement ``_loss(x_hat, y, op, model)`` (or, with ``needs_reference``,
    ``_loss(x_hat, y, op, model, reference=...)``) and may override :meth:`adapt_model`.

    Args:
        seed: seed of the loss's generator; ``None`` draws one from torch's global RNG.
    """

    name: ClassVar[str] = "loss"
    needs_reference: ClassVar[bool] = False
    #: Whether the loss accepts ``op=None`` with ``y`` in the image domain.
    image_mode: ClassVar[bool] = False

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__()
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._rng = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ contract
    def forward(
        self,
        x_hat: torch.Tensor,
        y: torch.Tensor,
        op: LinearOperator,
        model: nn.Module | None = None,
        *,
        reference: torch.Tensor | None = None,
    ) -> LossOutput:
        """The loss of reconstruction ``x_hat = model(y, op)``."""
        if op is None and not self.image_mode:
            raise ValueError(
                f"{type(self).__name__}: needs an operator (op=None, image mode, is supported by "
                "Noise2InverseLoss and SupervisedLoss)"
            )
        if op is not None and not isinstance(op, LinearOperator):
            raise TypeError(
                f"{type(self).__name__}: op must be a LinearOperator, got {type(op).__name__}"
            )
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"{type(self).__name__}: needs reference= (supervised loss)")
            return self._loss(x_hat, y, op, model, reference=reference)
        return self._loss(x_hat, y, op, model)

    def _loss(self, x_hat, y, op, model) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} does not implement _loss")

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """The model to train with this loss (identity unless the loss splits measurements)."""
        return model

    def _require_model(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            raise ValueError(f"{type(self).__name__}: needs model= (it runs the network again)")
        return model

    # ------------------------------------------------------------------ randomness
    def generators(self, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
        """This step's ``(cpu, device)`` generators (see :func:`step_generators`)."""
        return step_generators(self._rng, device)

    def get_extra_state(self):
        return {"seed": self.seed, "rng_state": self._rng.get_state()}

    def set_extra_state(self, state) -> None:
        self.seed = int(state["seed"])
        self._rng.set_state(state["rng_state"])

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: object) -> "WeightedSum":
        if isinstance(other, Loss):
            return WeightedSum(_terms(self) + _terms(other))
        return NotImplemented

    def __mul__(self, weight: object) -> "WeightedSum":
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            return WeightedSum([(float(weight) * w, loss) for w, loss in _terms(self)])
        return NotImplemented

    __rmul__ = __mul__


def _terms(loss: Loss) -> list[tuple[float, Loss]]:
    if isinstance(loss, WeightedSum):
        return list(zip(loss.weights, loss.losses))
    return [(1.0, loss)]


class WeightedSum(Loss):
    """``Σ_i w_i L_i``: losses combined with weights; parts are collected under their names.

    Shape:
        as the terms.

    Math:
        ``total = Σ_i w_i · L_i.total``; ``parts`` holds every term's (unweighted) parts; a
        repeated name gets a suffix ``_2``, ``_3``, …

    Args:
        terms: a sequence of losses or ``(weight, loss)`` pairs, or a mapping
            ``name → loss | (weight, loss)`` (the name then prefixes the term's parts).
        weights: weights of a plain sequence of losses (default 1 each).
    """

    name: ClassVar[str] = "sum"

    def __init__(
        self,
        terms: Sequence[Loss | tuple[float, Loss]] | Mapping[str, Loss | tuple[float, Loss]],
        *,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(seed=0)
        names: list[str | None] = []
        pairs: list[tuple[float, Loss]] = []
        items: Iterable = terms.items() if isinstance(terms, Mapping) else ((None, t) for t in terms)
        for key, term in items:
            if isinstance(term, tuple):
                if len(term) != 2:
                    raise ValueError(f"WeightedSum: expected (weight, loss) pairs, got {term!r}")
                weight, loss = term
            else:
                weight, loss = 1.0, term
            if not isinstance(loss, Loss):
                raise TypeError(f"WeightedSum: expected Loss terms, got {type(loss).__name__}")
            pairs.append((float(weight), loss))
            names.append(key)
        if not pairs:
            raise ValueError("WeightedSum: expected at least one loss")
        if weights is not None:
            if isinstance(terms, Mapping) or len(weights) != len(pairs):
                raise ValueError(
                    f"WeightedSum: weights= needs a plain sequence of {len(pairs)} losses, "
                    f"got {len(weights)} weights"
                )
            pairs = [(float(w), loss) for w, (_, loss) in zip(weights, pairs)]
        for w, _ in pairs:
            if not math.isfinite(w):
                raise ValueError(f"WeightedSum: weights must be finite, got {w}")
        self.weights = [w for w, _ in pairs]
        self.losses = nn.ModuleList(loss for _, loss in pairs)
        self.term_names = names

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return any(loss.needs_reference for loss in self.losses)

    @property
    def image_mode(self) -> bool:  # type: ignore[override]
        return all(loss.image_mode for loss in self.losses)

    def extra_repr(self) -> str:
        return " + ".join(f"{w:g}·{type(l).__name__}" for w, l in zip(self.weights, self.losses))

    def forward(self, x_hat, y, op, model=None, *, reference=None) -> LossOutput:
        total = None
        parts: dict[str, torch.Tensor] = {}
        for w, key, loss in zip(self.weights, self.term_names, self.losses):
            out = loss(x_hat, y, op, model, reference=reference)
            total = out.total * w if total is None else total + out.total * w
            for part, value in out.parts.items():
                label = part if key is None else f"{key}.{part}"
                unique, n = label, 2
                while unique in parts:
                    unique, n = f"{label}_{n}", n + 1
                parts[unique] = value
        assert total is not None
        return LossOutput(total, parts)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        for loss in self.losses:
            model = loss.adapt_model(model)
        return model


# ----------------------------------------------------------------------------- residuals
def _own(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``out`` may be modified in place (it shares no memory with ``x``)."""
    return out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def _sum_sq(r: torch.Tensor) -> torch.Tensor:
    flat = r.reshape(-1)
    return torch.vdot(flat, flat).real if r.is_complex() else torch.dot(flat, flat)


class _ResidualNorms(torch.autograd.Function):
    """``(Σ|r|², Σ|r|)`` of ``r = w ⊙ (A x − y)``, saving two images instead of ``r``.

    The residual is the only measurement-sized tensor: it is formed in place, and the weights
    go into the adjoint's operator (:meth:`~operators3d.LinearOperator.restrict_measurements`: a
    ``MultiCoilMRI`` folds them into its mask, blockwise) rather than into a weighted copy.
    """

    @staticmethod
    def forward(ctx, x, y, op, weight, need_abs):  # type: ignore[override]
        r = op(x)
        r = r.sub_(y) if _own(r, x) else r - y
        adjoint_op = op
        if weight is not None:
            r.mul_(weight)
            adjoint_op = op.restrict_measurements(weight)
        sq = _sum_sq(r)
        g_abs = None
        if need_abs:
            ab = r.abs().sum()
        else:
            ab = torch.zeros((), dtype=sq.dtype, device=sq.device)
        g_sq = adjoint_op.adjoint(r)  # Aᴴ(w ⊙ r); d Σ|r|² / dx = 2 Aᴴ(w ⊙ r)
        if _shares(g_sq, r):
            g_sq = g_sq.clone()
        g_sq.mul_(2)
        if need_abs:
            # d Σ|r| / dx = Aᴴ(w ⊙ r/|r|), with r/|r| = 0 where r = 0 (sgn).
            g_abs = adjoint_op.adjoint(r.sgn_())
        del r
        if not x.is_complex():
            g_sq = g_sq.real if g_sq.is_complex() else g_sq
            g_abs = g_abs.real if g_abs is not None and g_abs.is_complex() else g_abs
        ctx.save_for_backward(g_sq, g_abs)
        return sq, ab

    @staticmethod
    def backward(ctx, grad_sq, grad_abs):  # type: ignore[override]
        g_sq, g_abs = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = g_sq * grad_sq
            if g_abs is not None and grad_abs is not None:
                grad = grad + g_abs * grad_abs
        return grad, None, None, None, None


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def residual_norms(
    op: LinearOperator,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    need_abs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ|w ⊙ (A x − y)|²`` and ``Σ|w ⊙ (A x − y)|`` over all entries (batch included).

    Memory: the residual exists only inside the call; backward keeps one (two with
    ``need_abs``) image-sized gradient instead of the measurement-sized residual, which for
    multi-coil k-space is ``C`` times larger. Falls back to plain autograd when ``y`` or
    ``weight`` need gradients.

    Shape:
        ``x``: ``(*batch, *op.domain_shape)``; ``y``: ``(*batch, *op.range_shape)``;
        ``weight``: real, broadcastable to ``y``.

    Math:
        ``r = w ⊙ (A x − y)``; ``∂Σ|r|²/∂x = 2 Aᴴ(w ⊙ r)``, ``∂Σ|r|/∂x = Aᴴ(w ⊙ r/|r|)``.
    """
    if weight is not None and weight.dtype == torch.bool:
        weight = weight.to(y.real.dtype)
    if y.requires_grad or (weight is not None and weight.requires_grad):
        r = op(x) - y
        if weight is not None:
            r = r * weight
        sq = r.abs().pow(2).sum()
        ab = r.abs().sum() if need_abs else torch.zeros((), dtype=sq.dtype, device=sq.device)
        return sq, ab
    return _ResidualNorms.apply(x, y, op, weight, need_abs)


def squared_residual(
    op: LinearOperator, x: torch.Tensor, y: torch.Tensor, *, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``Σ|w ⊙ (A x − y)|²`` (see :func:`residual_norms`)."""
    return residual_norms(op, x, y, weight=weight)[0]
