"""Assertions that every operator must pass; shared by recon3d's tests and its users.

Each helper raises ``AssertionError`` with the operator's name and the measured error; none
prints. Run them in float64 / complex128 (the operator built with double-precision tensors)
so that rounding stays far below the tolerances.

Example::

    from operators3d.testing import check_operator
    check_operator(MultiCoilMRI(mask=m, coil_maps=s.to(torch.complex128)))
"""

from __future__ import annotations

import torch

from .base import LinearOperator

__all__ = [
    "random_domain",
    "random_range",
    "assert_adjoint",
    "assert_linear",
    "assert_normal",
    "assert_adjoint_involution",
    "assert_gradients",
    "assert_no_saved_tensors",
    "check_operator",
]


def _random(shape, dtype: torch.dtype, generator: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=generator).to(device)


def _double(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def random_domain(
    op: LinearOperator,
    *,
    batch_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A standard normal tensor of shape ``(*batch_shape, *op.domain_shape)``."""
    generator = generator or torch.Generator().manual_seed(0)
    dtype = dtype or _double(op.domain_dtype())
    return _random(batch_shape + op.domain_shape, dtype, generator, op.device)


def random_range(
    op: LinearOperator,
    *,
    batch_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A standard normal tensor of shape ``(*batch_shape, *op.range_shape)``."""
    generator = generator or torch.Generator().manual_seed(1)
    dtype = dtype or _double(op.range_dtype())
    return _random(batch_shape + op.range_shape, dtype, generator, op.device)


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.vdot(a.reshape(-1), b.reshape(-1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b)))
    return float(torch.linalg.vector_norm(a - b)) / scale if scale > 0 else 0.0


def assert_adjoint(
    op: LinearOperator,
    *,
    rtol: float = 1e-10,
    batch_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> float:
    """Dot-product test ``⟨A x, y⟩ = ⟨x, Aᴴ y⟩``; returns the relative error.

    The relative error is ``|⟨Ax, y⟩ − ⟨x, Aᴴy⟩| / max(|⟨Ax, y⟩|, |⟨x, Aᴴy⟩|)``.
    """
    generator = generator or torch.Generator().manual_seed(1234)
    x = random_domain(op, batch_shape=batch_shape, generator=generator)
    y = random_range(op, batch_shape=batch_shape, generator=generator)
    with torch.no_grad():
        lhs = _vdot(op(x), y)
        rhs = _vdot(x, op.adjoint(y))
    scale = max(abs(complex(lhs)), abs(complex(rhs)))
    err = abs(complex(lhs - rhs)) / scale if scale > 0 else 0.0
    if not err < rtol:
        raise AssertionError(
            f"{op.name}: adjoint test failed, <Ax,y>={complex(lhs):.6g}, <x,A^H y>="
            f"{complex(rhs):.6g}, relative error {err:.3g} >= {rtol:.1g}"
        )
    return err


def assert_linear(
    op: LinearOperator, *, rtol: float = 1e-10, generator: torch.Generator | None = None
) -> float:
    """``A(αx + βz) = αAx + βAz`` for random ``x, z`` and scalars; returns the relative error."""
    generator = generator or torch.Generator().manual_seed(99)
    x = random_domain(op, generator=generator)
    z = random_domain(op, generator=generator)
    if x.is_complex():
        alpha, beta = complex(0.7, -1.3), complex(-2.1, 0.4)
    else:
        alpha, beta = 0.7, -2.1
    with torch.no_grad():
        err = _rel(op(alpha * x + beta * z), alpha * op(x) + beta * op(z))
    if not err < rtol:
        raise AssertionError(f"{op.name}: not linear, relative error {err:.3g} >= {rtol:.1g}")
    return err


def assert_normal(op: LinearOperator, *, rtol: float = 1e-10) -> float:
    """``normal(x) = adjoint(forward(x))``; returns the relative error."""
    x = random_domain(op, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        err = _rel(op.normal(x), op.adjoint(op(x)))
    if not err < rtol:
        raise AssertionError(
            f"{op.name}: normal(x) differs from adjoint(forward(x)), relative error {err:.3g}"
        )
    return err


def assert_adjoint_involution(op: LinearOperator) -> None:
    """``A.H.H is A`` and ``A.H`` swaps domain and range."""
    if op.H.H is not op:
        raise AssertionError(f"{op.name}: A.H.H is not A")
    if op.H.domain_shape != op.range_shape or op.H.range_shape != op.domain_shape:
        raise AssertionError(
            f"{op.name}: A.H has shapes {op.H.range_shape} <- {op.H.domain_shape}, expected "
            f"{op.domain_shape} <- {op.range_shape}"
        )


def assert_gradients(
    op: LinearOperator, *, double_backward: bool = True, fast_mode: bool = False
) -> None:
    """``torch.autograd.gradcheck`` (and gradgradcheck) of forward and adjoint, in double.

    Use small operators (a few dozen entries): gradcheck builds the full Jacobian numerically;
    ``fast_mode`` checks random projections of it instead.
    """
    x = random_domain(op, generator=torch.Generator().manual_seed(3)).requires_grad_()
    y = random_range(op, generator=torch.Generator().manual_seed(4)).requires_grad_()
    for what, fn, arg in (("forward", op, x), ("adjoint", op.adjoint, y)):
        kw = dict(eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)
        if not torch.autograd.gradcheck(fn, (arg,), **kw):
            raise AssertionError(f"{op.name}: gradcheck of {what} failed")
        if double_backward and not torch.autograd.gradgradcheck(fn, (arg,), **kw):
            raise AssertionError(f"{op.name}: gradgradcheck of {what} failed")


def assert_no_saved_tensors(op: LinearOperator) -> None:
    """A forward with gradients saves no tensor for backward (its backward is the adjoint)."""
    x = random_domain(op, generator=torch.Generator().manual_seed(5)).requires_grad_()
    saved: list[int] = []

    def pack(t: torch.Tensor):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = op(x)
        z = op.adjoint(y)
    if saved:
        raise AssertionError(
            f"{op.name}: autograd saved {len(saved)} tensors ({sum(saved)} bytes) for backward"
        )
    z.real.sum().backward() if z.is_complex() else z.sum().backward()
    if x.grad is None:
        raise AssertionError(f"{op.name}: no gradient reached the input")


def check_operator(
    op: LinearOperator, *, rtol: float = 1e-10, gradients: bool = False
) -> dict[str, float]:
    """The whole battery: adjoint (unbatched and batched), linearity, normal, ``.H.H``,
    no saved tensors, and optionally gradcheck. Returns the measured errors."""
    errors = {
        "adjoint": assert_adjoint(op, rtol=rtol),
        "adjoint_batched": assert_adjoint(op, rtol=rtol, batch_shape=(2,)),
        "linear": assert_linear(op, rtol=rtol),
        "normal": assert_normal(op, rtol=rtol),
    }
    assert_adjoint_involution(op)
    assert_no_saved_tensors(op)
    if gradients:
        assert_gradients(op)
    return errors
