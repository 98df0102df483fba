"""Reconstructors, the complex ↔ channel boundary, implicit CG, and operator helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from operators3d import (
    IndexSelect,
    MaskedOperator,
    MultiCoilMRI,
    op_norm,
    poisson_disc_mask,
    sense_cg,
    shepp_logan_3d,
    simulate_coil_maps,
)
from operators3d.testing import assert_adjoint
from pipeline.classical import filtered_backprojection
from pipeline.models import (
    ArtifactRemoval,
    UNet3D,
    UnrolledNetwork,
    from_channels,
    normal_solve,
    to_channels,
)


class Identity2(nn.Module):
    """A backbone that returns its input (with a parameter, for gradients)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_channels = self.out_channels = channels
        self.weight = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, z):
        return z * self.weight


def _mri(dtype=torch.complex128, coils=3, shape=(3, 10, 10)):
    gen = torch.Generator().manual_seed(0)
    maps = simulate_coil_maps(coils, shape).to(dtype)
    mask = poisson_disc_mask(shape[1:], 2, calibration=4, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    x = shepp_logan_3d(shape).to(dtype).unsqueeze(0)
    return op, x, op(x)


def _ct(shape=(2, 16, 16), num_angles=30):
    from operators3d.ct import ParallelBeamCT

    angles = torch.arange(num_angles, dtype=torch.float64) * (math.pi / num_angles)
    op = ParallelBeamCT(volume_shape=shape, angles=angles)
    x = shepp_logan_3d(shape).double().unsqueeze(0)
    return op, x, op(x)


def _normal_matrix(op):
    """The dense matrix of AᴴA (tiny operators only)."""
    n = math.prod(op.domain_shape)
    eye = torch.eye(n, dtype=torch.complex128).reshape((n,) + op.domain_shape)
    return op.normal(eye).reshape(n, n).T


def test_channels_round_trip():
    z = torch.randn(2, 3, 4, 5, dtype=torch.complex64)
    c = to_channels(z)
    assert c.shape == (2, 2, 3, 4, 5) and torch.equal(c[:, 0], z.real) and torch.equal(c[:, 1], z.imag)
    assert torch.equal(from_channels(c, complex=True), z)
    r = torch.randn(2, 3, 4, 5)
    assert torch.equal(from_channels(to_channels(r), complex=False), r)
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        from_channels(to_channels(r), complex=True)


def test_artifact_removal_identity_and_homogeneity():
    op, x, y = _mri()
    model = ArtifactRemoval(Identity2(2))
    assert torch.allclose(model(y, op), op.adjoint(y), atol=1e-14)
    assert model(y[0], op).shape == x.shape[1:]  # unbatched
    torch.manual_seed(0)
    unet = ArtifactRemoval(UNet3D(2, 2, widths=[3, 4]).double())
    assert torch.allclose(unet(3.5 * y, op), 3.5 * unet(y, op), atol=1e-10)
    with pytest.raises(ValueError, match="complex image needs a backbone with in_channels=2"):
        ArtifactRemoval(UNet3D(1, 1))(y, op)


def test_sense_initial_estimate_and_implicit_gradients():
    op, x, y = _mri()
    model = ArtifactRemoval(Identity2(2), initial="sense", sense_iters=40, normalize=False)
    assert torch.allclose(model(y, op), sense_cg(y, op, num_iters=40, tol=0.0), atol=1e-10)
    # An unrolled network starts from the SENSE estimate of its own settings (λ, iterations).
    unrolled = UnrolledNetwork(Identity2(2), num_iters=1, data_consistency="gradient", step_size=1e-12,
                               initial="sense", sense_iters=30, sense_l2=0.05, normalize=False).double()
    expected = sense_cg(y, op, l2_weight=0.05, num_iters=30, tol=0.0)
    assert torch.allclose(unrolled(y, op), expected, atol=1e-8)
    # normal_solve: gradients by implicit differentiation, against the dense solution
    b = op.adjoint(y).detach().requires_grad_()
    lam = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    sol = normal_solve(b, op, damping=lam, num_iters=80, tol=0.0)
    v = torch.randn(sol.shape, dtype=sol.dtype, generator=torch.Generator().manual_seed(3))
    gb, glam = torch.autograd.grad((v.conj() * sol).real.sum(), (b, lam))
    n = b[0].numel()
    system = _normal_matrix(op) + 0.3 * torch.eye(n, dtype=torch.complex128)
    exact = torch.linalg.solve(system, b.detach().reshape(-1))
    assert torch.allclose(sol.detach().reshape(-1), exact, atol=1e-9)
    w = torch.linalg.solve(system, v.reshape(-1))  # (N + λI)⁻¹ v, the system is Hermitian
    assert torch.allclose(gb.reshape(-1), w, atol=1e-9)
    assert torch.allclose(glam, -(exact.conj() * w).real.sum(), atol=1e-9)


def test_unrolled_gradient_steps_by_hand():
    op, x, y = _mri()
    model = UnrolledNetwork(Identity2(2), num_iters=3, step_size=0.7, normalize=False)
    lip = op.lipschitz()
    aty = op.adjoint(y)
    z = aty / lip
    for _ in range(3):
        z = z - (0.7 / lip) * (op.normal(z) - aty)
    assert torch.allclose(model(y, op), z, atol=1e-12)


def test_unrolled_cg_steps_by_hand():
    op, x, y = _mri()
    model = UnrolledNetwork(Identity2(2), num_iters=2, data_consistency="cg", cg_weight=0.2,
                            cg_iters=50, normalize=False)
    lip = op.lipschitz()
    aty = op.adjoint(y)
    z = aty / lip
    for _ in range(2):
        # MoDL: x = (AᴴA + λL I)⁻¹(Aᴴy + λL z) with z = D(x) = x
        rhs = aty + 0.2 * lip * z
        z = torch.linalg.solve(_normal_matrix(op) + 0.2 * lip * torch.eye(z[0].numel(), dtype=z.dtype),
                               rhs.reshape(-1)).reshape(z.shape)
    assert torch.allclose(model(y, op), z, atol=1e-10)
    out = model(y, op)
    out.abs().sum().backward()
    assert model.log_step.grad is not None and torch.isfinite(model.log_step.grad).all()


def test_unrolled_shared_and_separate_weights():
    unet = UNet3D(2, 2, widths=[3, 4])
    n = sum(p.numel() for p in unet.parameters())
    shared = UnrolledNetwork(unet, num_iters=4)
    separate = UnrolledNetwork(UNet3D(2, 2, widths=[3, 4]), num_iters=4, shared=False)
    assert sum(p.numel() for p in shared.parameters()) == n + 1
    assert sum(p.numel() for p in separate.parameters()) == 4 * n + 4
    first, second = separate.backbones[0], separate.backbones[1]
    assert not torch.equal(first.head.weight, second.head.weight)


def test_lipschitz_bounds():
    op, _, _ = _mri(coils=2)
    power = op_norm(op, num_iters=200, generator=torch.Generator().manual_seed(0)) ** 2
    assert op.lipschitz() >= power * (1 - 1e-6)
    full = MultiCoilMRI(mask=torch.ones(10, 10), volume_shape=(3, 10, 10), dtype=torch.complex128)
    assert full.lipschitz() == pytest.approx(1.0)
    ct, _, _ = _ct()
    gen = torch.Generator().manual_seed(0)
    power = op_norm(ct, num_iters=100, dtype=torch.float64, generator=gen) ** 2
    assert power <= ct.lipschitz() <= 4 * power


def test_filtered_backprojection_matches_fbp_and_is_differentiable():
    from operators3d.ct import fbp

    op, x, y = _ct(shape=(2, 32, 32), num_angles=90)
    ours, theirs = filtered_backprojection(y, op), fbp(y, op)
    assert float((ours - theirs).norm() / theirs.norm()) < 0.1
    yg = y.clone().requires_grad_()
    filtered_backprojection(yg, op).pow(2).sum().backward()
    assert yg.grad is not None and torch.isfinite(yg.grad).all()
    # it is linear with the adjoint as backward: ⟨F y, v⟩ = ⟨y, Fᵀ v⟩
    v = torch.randn_like(x)
    yv = y.clone().requires_grad_()
    (g,) = torch.autograd.grad((filtered_backprojection(yv, op) * v).sum(), yv)
    assert math.isclose(float((filtered_backprojection(y, op) * v).sum()), float((y * g).sum()),
                        rel_tol=1e-10)


class _Zero(nn.Module):
    """A residual-free backbone that returns its input (the reconstructor's initial estimate)."""

    def forward(self, x):
        return x


def test_fbp_window_of_the_initial_estimate():
    from operators3d.ct import fbp

    op, x, y = _ct(shape=(2, 32, 32), num_angles=90)
    hann = ArtifactRemoval(_Zero(), initial="fbp", fbp_filter="hann", normalize=False)
    assert torch.equal(hann(y, op), filtered_backprojection(y, op, filter="hann"))
    assert float((hann(y, op) - fbp(y, op, filter="hann")).norm() / fbp(y, op, filter="hann").norm()) < 0.1
    assert not torch.equal(hann(y, op), ArtifactRemoval(_Zero(), initial="fbp", normalize=False)(y, op))
    unrolled = UnrolledNetwork(_Zero(), num_iters=1, initial="fbp", fbp_filter="cosine", step_size=1e-9,
                               normalize=False)
    assert torch.allclose(unrolled(y, op), filtered_backprojection(y, op, filter="cosine"), rtol=1e-6)
    assert "fbp_filter=hann" in repr(hann)
    with pytest.raises(ValueError, match="fbp_filter must be one of"):
        ArtifactRemoval(_Zero(), initial="fbp", fbp_filter="hamming")


def test_restrictions_are_buffers_with_matched_adjoints():
    op, x, y = _mri(coils=2)
    gen = torch.Generator().manual_seed(1)
    entry_mask = torch.rand(op.range_shape, generator=gen) < 0.5
    grid_mask = torch.rand(op.mask.shape, generator=gen) < 0.5
    ct, xct, sino = _ct(num_angles=8)
    restricted = [
        op.restrict_measurements(entry_mask),
        op.restrict_measurements(grid_mask),
        ct.restrict_angles([0, 3, 5]),
        IndexSelect(ct, [1, 2, 7]),
        MaskedOperator(ct, torch.rand(ct.range_shape, generator=gen, dtype=torch.float64)),
    ]
    assert isinstance(restricted[0], MaskedOperator)
    assert isinstance(restricted[1], MultiCoilMRI)
    for r in restricted:
        assert list(r.parameters()) == []
        assert len(list(r.buffers())) > 0
        assert_adjoint(r, rtol=1e-10)
    # measured entries and counts
    m = restricted[0].measurement_mask()
    assert torch.equal(torch.broadcast_to(m, op.range_shape), entry_mask & (op.mask != 0))
    assert restricted[0].num_measured(y) == int(m.sum())
    assert ct.num_measured(sino) == sino.numel()
    assert torch.allclose(restricted[2](xct), ct(xct)[..., [0, 3, 5], :])
    assert torch.allclose(restricted[3](xct), ct(xct)[..., [1, 2, 7], :])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """EI (tiled UNet, MRI and CT) gives the same loss and gradients on CUDA as on CPU."""
    results = {}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _cuda_vs_cpu(results)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for key, (value, grads) in results.items():
        if key[0] != "cuda":
            continue
        ref_value, ref_grads = results[("cpu",) + key[1:]]
        if key[2] == "ssdu":  # the split is drawn on each device's generator
            assert math.isfinite(value)
            continue
        assert value == pytest.approx(ref_value, rel=1e-3)
        for g, r in zip(grads, ref_grads):  # float32 on both (cuDNN's TF32 off)
            assert float((g - r).norm() / r.norm()) < 1e-3


def _cuda_vs_cpu(results):
    from operators3d import Rotate90
    from pipeline.losses import SSDULoss, equivariant_imaging
    from pipeline.models import TiledBackbone

    for device in ("cpu", "cuda"):
        for modality in ("mri", "ct"):
            op, x, y = _mri(dtype=torch.complex64) if modality == "mri" else _ct()
            if modality == "ct":
                y = y.float()
            op = op.to(device)
            c = 2 if modality == "mri" else 1
            torch.manual_seed(0)
            unet = UNet3D(c, c, widths=[3, 4])
            model = ArtifactRemoval(TiledBackbone(unet, tile_shape=(2, 8, 8), overlap=(0, 4, 4)),
                                    initial="adjoint" if modality == "mri" else "fbp").to(device)
            for name, loss in (("ei", equivariant_imaging(transform=Rotate90, seed=0)),
                               ("ssdu", SSDULoss(seed=0))):
                if name == "ssdu" and modality == "ct":
                    continue
                adapted = loss.adapt_model(model)
                yd = y.to(device)  # one tensor: the split is recorded for this y
                out = loss(adapted(yd, op), yd, op, adapted)
                grads = torch.autograd.grad(out.total, list(unet.parameters()))
                results[(device, modality, name)] = (out.total.item(), [g.cpu() for g in grads])


def test_backbone_in_lower_precision():
    """A bf16 backbone (as a bf16 engine makes it) takes and returns the image's precision."""
    op, x, y = _mri(dtype=torch.complex64)
    model = ArtifactRemoval(UNet3D(2, 2, widths=[3, 4]).to(torch.bfloat16))
    out = model(y, op)
    assert out.dtype == torch.complex64 and torch.isfinite(out).all()
    out.abs().sum().backward()
