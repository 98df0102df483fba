"""The operator steps of the reconstructors (:mod:`pipeline.models.reconstructors`).

* :func:`initial_estimate` — the image a reconstructor starts from: ``Aᴴy``, FBP/FDK, SENSE,
  the classical one of the modality, or a callable; differentiable in ``y``.
* :func:`normal_solve` — ``(AᴴA + λI) x = b`` by conjugate gradient with implicit gradients
  (SENSE initial estimates, the CG data-consistency step of unrolled networks).
"""

from __future__ import annotations

from typing import Callable

import torch

from operators3d import LinearOperator, conjugate_gradient
from pipeline.classical import filtered_backprojection

__all__ = ["initial_estimate", "normal_solve", "Initial", "FBP_FILTERS"]


_INITIALS = ("adjoint", "fbp", "sense", "classical")
#: The ramp windows of an FBP/FDK initial estimate (those of :func:`operators3d.ct.ramp_filter`).
FBP_FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")

Initial = str | Callable[[torch.Tensor, LinearOperator], torch.Tensor]


class _NormalSolve(torch.autograd.Function):
    """``x = (AᴴA + λI)⁻¹ b`` by CG; backward by a second CG solve (implicit differentiation)."""

    @staticmethod
    def forward(ctx, b, damping, op, num_iters, tol):  # type: ignore[override]
        lam = float(damping)
        nd = len(op.domain_shape)
        x = conjugate_gradient(
            op.normal_operator(), b, num_dims=nd, num_iters=num_iters, tol=tol, damping=lam
        )
        ctx.op, ctx.lam, ctx.nd, ctx.num_iters, ctx.tol = op, lam, nd, num_iters, tol
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            g = conjugate_gradient(
                ctx.op.normal_operator(), grad, num_dims=ctx.nd, num_iters=ctx.num_iters,
                tol=ctx.tol, damping=ctx.lam,
            )
            grad_damping = None
            if ctx.needs_input_grad[1]:
                # x = M⁻¹ b, dx/dλ = −M⁻¹ x, M self-adjoint: ∂L/∂λ = −Re⟨x, M⁻¹ grad⟩.
                prod = (x.conj() * g).real if x.is_complex() else x * g
                grad_damping = -prod.sum()
        return g, grad_damping, None, None, None


def normal_solve(
    b: torch.Tensor,
    op: LinearOperator,
    *,
    damping: float | torch.Tensor = 0.0,
    num_iters: int = 10,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Solve ``(AᴴA + λI) x = b`` by conjugate gradient, each batch element its own system.

    Gradients (to ``b`` and to a tensor ``λ``) come from implicit differentiation — a second CG
    solve in backward — so no CG iterate is kept; they are exact for the converged solution.

    Shape:
        ``b``: ``(*batch, *op.domain_shape)``; returns the same.

    Math:
        ``x = (AᴴA + λI)⁻¹ b``, ``∂L/∂b = (AᴴA + λI)⁻¹ ∂L/∂x``, ``∂L/∂λ = −Re⟨x, ∂L/∂b⟩``.
    """
    if not isinstance(damping, torch.Tensor):
        damping = torch.tensor(float(damping), dtype=torch.float64)
    return _NormalSolve.apply(b, damping, op, num_iters, tol)


def initial_estimate(
    y: torch.Tensor,
    op: LinearOperator,
    kind: Initial = "adjoint",
    *,
    sense_iters: int = 10,
    sense_l2: float = 0.0,
    fbp_filter: str = "ram-lak",
) -> torch.Tensor:
    """An initial image from measurements: ``Aᴴy``, FBP/FDK, SENSE, or a callable.

    All are differentiable in ``y`` (EI's second pass reconstructs from ``A T_g x̂``):
    ``"fbp"`` is :func:`~pipeline.classical.filtered_backprojection` (FBP for parallel
    beam, FDK for cone beam, through the matched adjoint); ``"sense"`` solves
    ``(AᴴA + λI) x = Aᴴy`` with :func:`normal_solve` (implicit gradients); ``"classical"``
    picks FBP/FDK for CT, SENSE for MRI and ``Aᴴy`` otherwise. ``fbp_filter`` is the ramp's
    window (``"ram-lak"``, ``"shepp-logan"``, ``"cosine"``, ``"hann"``): a smoother window
    gives a noisy scan a cleaner start.

    Shape:
        ``(*batch, *op.range_shape) → (*batch, *op.domain_shape)``.
    """
    if callable(kind):
        return kind(y, op)
    if kind == "adjoint":
        return op.adjoint(y)
    if kind == "sense":
        return normal_solve(op.adjoint(y), op, damping=sense_l2, num_iters=sense_iters, tol=0.0)
    if kind == "fbp":
        if not op.is_ct:
            raise ValueError(f"initial_estimate: 'fbp' needs a CT operator, got {op.name}")
        return filtered_backprojection(y, op, filter=fbp_filter)
    if kind == "classical":
        from operators3d import MultiCoilMRI

        if isinstance(op, MultiCoilMRI):
            return initial_estimate(y, op, "sense", sense_iters=sense_iters, sense_l2=sense_l2)
        if op.is_ct:
            return filtered_backprojection(y, op, filter=fbp_filter)
        return op.adjoint(y)
    raise ValueError(f"initial_estimate: kind must be one of {_INITIALS} or a callable, got {kind!r}")


def _check_initial(initial: Initial, owner: str) -> None:
    if not callable(initial) and initial not in _INITIALS:
        raise ValueError(f"{owner}: initial must be one of {_INITIALS} or a callable, got {initial!r}")


def _check_filter(fbp_filter: str, owner: str) -> None:
    if fbp_filter not in FBP_FILTERS:
        raise ValueError(f"{owner}: fbp_filter must be one of {FBP_FILTERS}, got {fbp_filter!r}")
