"""The TV gradient's adjoint, and the exact derivatives of TV-PDHG and of CG (float64)."""

from __future__ import annotations

import math

import torch


def test_finite_difference_is_the_transpose_of_its_adjoint_in_float64():
    from operators3d.testing import check_operator
    from operators3d.tv import FiniteDifference

    grad = FiniteDifference((5, 6, 7), weights=(0.5, 1.0, 2.0), cuts=(2,))
    errors = check_operator(grad)
    assert max(errors.values()) < 1e-12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, dtype=torch.complex128, generator=g)
    p = torch.randn(2, 3, 5, 6, 7, dtype=torch.complex128, generator=g)
    lhs, rhs = torch.vdot(grad(x).flatten(), p.flatten()), torch.vdot(x.flatten(), grad.adjoint(p).flatten())
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    assert float(grad(x)[..., 0, 1, :, :].abs().max()) == 0  # no difference across the cut at D = 2


def test_tv_pdhg_and_cg_derivatives_equal_central_differences_in_float64():
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps
    from operators3d.krylov import Lanczos, conjugate_gradient_tangent, galerkin_coefficients
    from operators3d.ct import ParallelBeamCT
    from operators3d.tv import tv_pdhg

    g = torch.Generator().manual_seed(0)
    op = ParallelBeamCT(volume_shape=(2, 12, 12), angles=torch.arange(10, dtype=torch.float64) * math.pi / 10)
    y = op(torch.rand(2, 12, 12, dtype=torch.float64, generator=g)) + 0.3 * torch.randn(op.range_shape, generator=g,
                                                                                      dtype=torch.float64)
    b = torch.randn(op.range_shape, generator=g, dtype=torch.float64)
    mus, eps = torch.tensor([0.2, 1.0], dtype=torch.float64), 1e-6
    kw = dict(num_iters=40, nonnegative=True, initial=lambda v: 0.01 * op.adjoint(v))
    x, dx = tv_pdhg(y, op, mus, tangent=b, **kw)[40]
    fd = (tv_pdhg(y + eps * b, op, mus, **kw)[40][0] - tv_pdhg(y - eps * b, op, mus, **kw)[40][0]) / (2 * eps)
    assert float((fd - dx).norm() / dx.norm()) < 1e-6
    torch.testing.assert_close(x, tv_pdhg(y, op, mus, **kw)[40][0], rtol=0, atol=0)  # the tangent changes nothing

    maps = simulate_coil_maps(3, (2, 10, 10)).to(torch.complex128)
    mask = poisson_disc_mask((10, 10), 2.5, calibration=4, generator=torch.Generator().manual_seed(0))
    mri = MultiCoilMRI(mask=mask, coil_maps=maps)
    z = torch.randn(mri.domain_shape, dtype=torch.complex128, generator=g)
    t = torch.randn(mri.domain_shape, dtype=torch.complex128, generator=g)
    lams = torch.tensor([1e-3, 0.1], dtype=torch.float64)
    normal = mri.normal_operator()
    out = conjugate_gradient_tangent(normal, z, lams, num_dims=3, checkpoints=(3, 8), tangent=t)
    plus = conjugate_gradient_tangent(normal, z + eps * t, lams, num_dims=3, checkpoints=(3, 8))
    minus = conjugate_gradient_tangent(normal, z - eps * t, lams, num_dims=3, checkpoints=(3, 8))
    for k in (3, 8):
        fd = (plus[k][0] - minus[k][0]) / (2 * eps)
        assert float((fd - out[k][1]).norm() / out[k][1].norm()) < 1e-6
    # CG's iterates of every shift are Galerkin solutions in the Lanczos basis of (N, z).
    run = Lanczos(normal, z).extend(30)
    for k in (3, 8):
        for i, lam in enumerate(lams.tolist()):
            c = galerkin_coefficients(run.alpha, run.beta, run.norm, k, lam, run.steps)
            assert abs(float(c @ c) - float(out[k][0][i].abs().square().sum())) < 1e-8 * float(c @ c)
