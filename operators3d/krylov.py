"""Krylov tools for choosing regularisation without a reference: conjugate gradient with its
exact directional derivative, and the Lanczos tridiagonalisation.

Reference-free parameter selection (``docs/classical.md``) needs two things of an iterative
reconstruction ``h(z)``: the iterates themselves for many regularisation weights and iteration
counts, and a divergence ``Re⟨w, J_h(z) b⟩`` (Stein 1981; Ramani, Blu & Unser, IEEE TIP 2008).
Early-stopped CG is far from linear in its right-hand side (its step sizes are inner products
of it), and a finite-difference divergence of it depends on the step by 5–20 % in tests; the
forward-mode derivative of the recursion below is exact and costs one more operator
application per iteration (applied together with the first, as a batch).

:func:`lanczos` gives, from one run on ``z``, every CG iterate of every shift
``(N + λI) x = z`` in the same Krylov basis (CG is the Galerkin method of that basis, which
does not depend on ``λ``), and quadratic forms ``cᵀ f(T) c`` of those iterates (Gauss
quadrature: Golub & Meurant, *Matrices, Moments and Quadrature*, 2010).

Also the two plain iterations every operator uses: :func:`conjugate_gradient` (batched CG on
a normal equation, the SENSE and data-consistency solver) and :func:`op_norm` (the power
method for ``‖A‖₂``, the default :meth:`~operators3d.LinearOperator.lipschitz`).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .base import LinearOperator

__all__ = [
    "op_norm",
    "conjugate_gradient",
    "conjugate_gradient_tangent",
    "Lanczos",
    "lanczos",
    "tridiagonal",
    "galerkin_coefficients",
]


def _dot(a: torch.Tensor, b: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``Re⟨a, b⟩`` over the last ``num_dims`` dims, one value per leading index."""
    dims = tuple(range(-num_dims, 0))
    if a.is_complex():
        return (a.conj() * b).real.sum(dim=dims)
    return (a * b).sum(dim=dims)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (a converged system stays where it is)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


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
    rs = _dot(r, r, num_dims)
    b_norm2 = _dot(rhs, rhs, num_dims)
    threshold = (tol**2) * b_norm2
    for _ in range(num_iters):
        if bool((rs <= threshold).all()):
            break
        q = system(p)
        denom = _dot(p, q, num_dims)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(torch.finfo(denom.dtype).tiny), 0)
        x = x + alpha[expand] * p
        r = r - alpha[expand] * q
        rs_new = _dot(r, r, num_dims)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), 0)
        p = r + beta[expand] * p
        rs = rs_new
    assert x.shape[: len(lead)] == lead
    return x


def conjugate_gradient_tangent(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    damping: torch.Tensor,
    *,
    num_dims: int,
    checkpoints: Iterable[int],
    tangent: torch.Tensor | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """CG on ``(N + λ_j I) x = z`` for every ``λ_j`` at once, from ``x = 0``, with the exact
    derivative of each iterate along ``tangent`` (forward mode).

    Shape:
        ``rhs``: ``(*domain)`` (its last ``num_dims`` dims); ``damping``: ``(L,)``; returns
        ``{k: (x_k, dx_k)}`` with ``x_k``, ``dx_k`` of shape ``(L, *domain)`` (``dx_k`` None
        without a tangent).

    Math:
        Hestenes–Stiefel CG as :func:`operators3d.conjugate_gradient` (``tol = 0``: exactly
        ``k`` iterations), and its derivative: ``dα = (d⟨r,r⟩ ⟨p,q⟩ − ⟨r,r⟩ d⟨p,q⟩)/⟨p,q⟩²``,
        ``dx ← dx + dα p + α dp``, ``dr ← dr − dα q − α dq``, ``dβ`` likewise, ``dp ← dr +
        dβ p + β dp`` with ``dq = (N + λ) dp`` (``dx_k = J_{x_k}(z) · tangent``).

    Args:
        normal: ``v ↦ N v`` for a Hermitian positive semi-definite ``N`` that broadcasts over
            leading dims.
        rhs: the right-hand side ``z``.
        damping: the shifts ``λ_j ≥ 0``.
        num_dims: trailing dims of one system.
        checkpoints: the iteration counts ``k`` to return.
        tangent: the direction ``b`` of the derivative, shaped like ``rhs``.
    """
    marks = sorted({int(k) for k in checkpoints})
    if not marks or marks[0] < 1:
        raise ValueError(f"conjugate_gradient_tangent: checkpoints must be >= 1, got {marks}")
    lam = damping.to(device=rhs.device, dtype=rhs.real.dtype).reshape((-1,) + (1,) * num_dims)
    count = lam.shape[0]
    x = torch.zeros((count,) + rhs.shape, dtype=rhs.dtype, device=rhs.device)
    r = rhs.expand_as(x).clone()
    p = r.clone()
    rs = _dot(r, r, num_dims)
    with_tangent = tangent is not None
    if with_tangent:
        dx = torch.zeros_like(x)
        dr = tangent.expand_as(x).clone()
        dp = dr.clone()
        drs = 2 * _dot(r, dr, num_dims)
    out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    shape = (...,) + (None,) * num_dims
    for k in range(1, marks[-1] + 1):
        if with_tangent:
            both = normal(torch.cat([p, dp]))
            q, dq = both[:count] + lam * p, both[count:] + lam * dp
            del both
        else:
            q = normal(p) + lam * p
        den = _dot(p, q, num_dims)
        alpha = _safe_div(rs, den)
        x = x + alpha[shape] * p
        r = r - alpha[shape] * q
        rs_new = _dot(r, r, num_dims)
        beta = _safe_div(rs_new, rs)
        if with_tangent:
            dden = _dot(dp, q, num_dims) + _dot(p, dq, num_dims)
            dalpha = _safe_div(drs * den - rs * dden, den * den)
            dx = dx + dalpha[shape] * p + alpha[shape] * dp
            dr = dr - dalpha[shape] * q - alpha[shape] * dq
            drs_new = 2 * _dot(r, dr, num_dims)
            dbeta = _safe_div(drs_new * rs - rs_new * drs, rs * rs)
            dp = dr + dbeta[shape] * p + beta[shape] * dp
            drs = drs_new
        p = r + beta[shape] * p
        rs = rs_new
        if k in marks:
            out[k] = (x.clone(), dx.clone() if with_tangent else None)
    return out


class Lanczos:
    """The Lanczos tridiagonalisation ``Vᴴ N V = T`` of a Hermitian ``N`` from ``start``,
    extended on demand (:meth:`extend`).

    Only the coefficients are kept (the basis is never stored), in ``dtype`` (default the
    double precision of ``start``): loss of orthogonality stays small for the few hundred
    steps parameter selection needs, and the Gauss-quadrature values ``e₁ᵀ f(T) e₁`` that use
    it are robust to it in any case (Golub & Meurant 2010, ch. 4).

    Shape:
        ``start``: any; ``alpha (m,)``, ``beta (m − 1,)`` (float64), ``norm = ‖start‖``.

    Math:
        ``v₁ = z/‖z‖``, ``w = N v_j − β_{j−1} v_{j−1}``, ``α_j = Re⟨v_j, w⟩``,
        ``w ← w − α_j v_j``, ``β_j = ‖w‖``, ``v_{j+1} = w/β_j``; ``T = tridiag(β, α, β)``.
        Stops early (``exhausted``) when ``β_j`` vanishes: the Krylov space is invariant.
    """

    def __init__(self, normal: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is None:
            dtype = torch.complex128 if start.is_complex() else torch.float64
        self.normal = normal
        v = start.to(dtype)
        self.norm = float(torch.linalg.vector_norm(v))
        self._alphas: list[float] = []
        self._betas: list[float] = []
        self._v = v / self.norm if self.norm > 0 else v
        self._prev = torch.zeros_like(v)
        self._beta = 0.0
        self.exhausted = self.norm == 0.0

    @property
    def steps(self) -> int:
        return len(self._alphas)

    @property
    def alpha(self) -> torch.Tensor:
        return torch.tensor(self._alphas, dtype=torch.float64)

    @property
    def beta(self) -> torch.Tensor:
        return torch.tensor(self._betas[: max(0, self.steps - 1)], dtype=torch.float64)

    def extend(self, steps: int) -> "Lanczos":
        """Run until ``steps`` coefficients exist (or the Krylov space is exhausted)."""
        while self.steps < int(steps) and not self.exhausted:
            w = self.normal(self._v)
            if self._beta:
                w = w - self._beta * self._prev
            a = float(_dot(self._v, w, self._v.ndim))
            w = w - a * self._v
            self._alphas.append(a)
            beta = float(torch.linalg.vector_norm(w))
            if beta <= 1e-12 * max(abs(a), 1e-300):
                self.exhausted = True
                break
            self._betas.append(beta)
            self._beta = beta
            self._prev, self._v = self._v, w / beta
        return self


def lanczos(
    normal: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    num_iters: int,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(alpha, beta, ‖start‖)`` of ``num_iters`` steps of :class:`Lanczos`."""
    run = Lanczos(normal, start, dtype=dtype).extend(num_iters)
    return run.alpha, run.beta, run.norm


def tridiagonal(alpha: torch.Tensor, beta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """The dense ``T`` (its leading ``size × size`` block) of :func:`lanczos`'s coefficients."""
    m = alpha.shape[0] if size is None else int(size)
    t = torch.diag(alpha[:m])
    if m > 1:
        off = beta[: m - 1]
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def galerkin_coefficients(alpha: torch.Tensor, beta: torch.Tensor, norm: float, iters: int,
                          damping: float, size: int) -> torch.Tensor:
    """The coordinates ``c`` (length ``size``) in the Lanczos basis of CG's ``iters``-th
    iterate on ``(N + λI) x = z`` from 0: ``c = ‖z‖ (T_k + λI)⁻¹ e₁``, zero past ``k``.

    Math:
        CG minimises the ``(N + λI)``-energy error over the Krylov space ``K_k(N, z)``, which
        is shift invariant, so ``x_k = V_k (T_k + λI)⁻¹ ‖z‖ e₁`` for every ``λ``.
    """
    k = min(int(iters), alpha.shape[0])
    t = tridiagonal(alpha, beta, k) + damping * torch.eye(k, dtype=torch.float64)
    e1 = torch.zeros(k, dtype=torch.float64)
    e1[0] = norm
    c = torch.zeros(size, dtype=torch.float64)
    c[:k] = torch.linalg.solve(t, e1)
    return c
