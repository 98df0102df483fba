"""Each loss equals its formula (METHODS.md) written out by hand on fixed inputs: a fixed linear
"network", a fixed transform, a seeded probe or split."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from losses_helpers import IdentityNet, LinearAdjointNet, ct_problem, mri_problem  # noqa: F401

from operators3d import GaussianNoise, MultiCoilMRI, Rotate90
from pipeline.classical import filtered_backprojection
from pipeline.losses import (
    EquivariantImagingLoss,
    MeasurementConsistencyLoss,
    Noise2InverseLoss,
    SplittingLoss,
    SSDULoss,
    SupervisedLoss,
    SureGaussianLoss,
    SurePoissonLoss,
    WeightedSum,
    residual_norms,
    step_generators,
)


def _close(a, b, rtol=1e-10):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert torch.allclose(a, b.to(a.dtype), rtol=rtol, atol=1e-12), (float(a), float(b))


def _gens(seed):
    return step_generators(torch.Generator().manual_seed(seed), "cpu")


def _measured_count(op, y):
    # batch × coils × D × sampled (ky, kz): entries outside the mask are not measurements.
    b, c, d = y.shape[0], y.shape[-4], y.shape[-3]
    return b * c * d * int((op.mask != 0).sum())


def test_measurement_consistency(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    x_hat = net(y, op)
    out = MeasurementConsistencyLoss()(x_hat, y, op, net)
    by_hand = (op(x_hat) - y).abs().pow(2).sum() / _measured_count(op, y)
    _close(out.total, by_hand)
    assert set(out.parts) == {"mc"}


def test_measurement_consistency_ct(ct_problem):
    op, x, y = ct_problem
    x_hat = x * 0.9
    out = MeasurementConsistencyLoss()(x_hat, y, op)
    _close(out.total, (op(x_hat) - y).pow(2).mean())


def test_equivariant_imaging_fixed_transform(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    x_hat = net(y, op)
    out = EquivariantImagingLoss(transform=Rotate90(1), seed=3)(x_hat, y, op, net)
    x2 = torch.rot90(x_hat, 1, dims=(-2, -1))
    x3 = net(op(x2), op)
    _close(out.total, (x3 - x2).abs().pow(2).sum() / x2.numel())


def test_equivariant_imaging_sampled_and_callable(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    x_hat = net(y, op)
    out = EquivariantImagingLoss(transform=Rotate90, seed=11)(x_hat, y, op, net)
    cpu, _ = _gens(11)
    action = Rotate90.sample(generator=cpu)
    x2 = action(x_hat)
    _close(out.total, (net(op(x2), op) - x2).abs().pow(2).mean())
    # any callable on volumes
    flip = lambda v: torch.flip(v, dims=(-1,))  # noqa: E731
    out = EquivariantImagingLoss(transform=flip)(x_hat, y, op, net)
    x2 = flip(x_hat)
    _close(out.total, (net(op(x2), op) - x2).abs().pow(2).mean())


def test_robust_equivariant_imaging_fresh_noise(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    x_hat = net(y, op)
    noise = GaussianNoise(0.05)
    out = EquivariantImagingLoss(transform=Rotate90(2), noise_model=noise, seed=5)(x_hat, y, op, net)
    _, dev = _gens(5)
    x2 = torch.rot90(x_hat, 2, dims=(-2, -1))
    y2 = noise.sample(op(x2), generator=dev, mask=op.mask)
    _close(out.total, (net(y2, op) - x2).abs().pow(2).mean())
    # the noise differs from EI without noise
    plain = EquivariantImagingLoss(transform=Rotate90(2))(x_hat, y, op, net)
    assert not torch.allclose(plain.total, out.total)


def test_sure_gaussian_complex(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    sigma, tau = 0.02, 1e-3
    x_hat = net(y, op)
    out = SureGaussianLoss(sigma, tau=tau, seed=7)(x_hat, y, op, net)
    _, dev = _gens(7)
    b = torch.view_as_complex(torch.randn(y.shape + (2,), generator=dev, dtype=torch.float64))
    b = b * op.mask

    def h(v):
        return op(net(v, op))

    m = _measured_count(op, y)
    div = (b.conj() * (h(y + tau * b) - h(y))).real.sum() / tau
    by_hand = (y - h(y)).abs().pow(2).sum() / m - 2 * sigma**2 + 2 * sigma**2 / m * div
    _close(out.total, by_hand, rtol=1e-8)
    _close(out.parts["sure.divergence"], 2 * sigma**2 / m * div, rtol=1e-8)


def test_sure_gaussian_real(ct_problem):
    op, x, y = ct_problem
    net = LinearAdjointNet(scale=0.01)
    sigma, tau = 0.05, 1e-2
    x_hat = net(y, op)
    out = SureGaussianLoss(noise_model=GaussianNoise(sigma), tau=tau, seed=1)(x_hat, y, op, net)
    _, dev = _gens(1)
    b = torch.randn(y.shape, generator=dev, dtype=torch.float64)

    def h(v):
        return op(net(v, op))

    m = y.numel()
    by_hand = (y - h(y)).pow(2).sum() / m - sigma**2 + 2 * sigma**2 / m * (
        (b * (h(y + tau * b) - h(y))).sum() / tau
    )
    _close(out.total, by_hand, rtol=1e-8)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_sure_poisson_and_poisson_gaussian(ct_problem, sigma):
    op, x, y = ct_problem
    y = y.abs()
    net = LinearAdjointNet(scale=0.01)
    gain, tau = 0.2, 1e-2
    x_hat = net(y, op)
    out = SurePoissonLoss(gain, sigma=sigma, tau=tau, seed=2)(x_hat, y, op, net)
    _, dev = _gens(2)
    b = torch.randint(0, 2, y.shape, generator=dev).to(torch.float64) * 2 - 1

    def h(v):
        return op(net(v, op))

    m = y.numel()
    delta = (h(y + tau * b) - h(y)) / tau
    pure = (y - h(y)).pow(2).sum() / m - gain * y.sum() / m + 2 * gain / m * (b * y * delta).sum()
    gaussian = -(sigma**2) + 2 * sigma**2 / m * (b * delta).sum()
    _close(out.total, pure + gaussian, rtol=1e-8)


def test_ssdu_l1l2_mse_and_weighted(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    for metric, weighted in [("l1l2", False), ("mse", False), ("l1l2", True), ("mse", True)]:
        loss = SSDULoss(rho=0.4, metric=metric, weighted=weighted, seed=13)
        model = loss.adapt_model(net)
        x_hat = model(y, op)
        split = model.last_split
        theta, lam, probs = split.info["theta"], split.info["lambda"], split.info["probabilities"]
        # the split is a seeded draw: replay it
        _, dev = _gens(13)
        u = torch.rand(op.mask.shape, generator=dev, dtype=torch.float64)
        assert torch.equal(lam, (u < probs) & (op.mask != 0))
        # the network saw y_Θ through A_Θ
        a_theta = MultiCoilMRI(mask=op.mask * theta, coil_maps=op.coil_maps)
        assert torch.allclose(x_hat, net(y * theta, a_theta))
        out = loss(x_hat, y, op, model)
        w = lam.to(torch.float64)
        if weighted:
            w = w / torch.sqrt(1 - probs)
        r = w * (op(x_hat) - y)
        if metric == "l1l2":
            by_hand = r.abs().pow(2).sum().sqrt() / (w * y).abs().pow(2).sum().sqrt() + r.abs().sum() / (
                w * y
            ).abs().sum()
        else:
            count = y.shape[0] * y.shape[-4] * y.shape[-3] * int(lam.sum())
            by_hand = r.abs().pow(2).sum() / count
        _close(out.total, by_hand)


def test_generic_splitting(ct_problem):
    op, x, y = ct_problem
    net = LinearAdjointNet(scale=0.01)
    loss = SplittingLoss(rho=0.3, seed=4)
    model = loss.adapt_model(net)
    x_hat = model(y, op)
    _, dev = _gens(4)
    target = torch.rand(op.range_shape, generator=dev, dtype=torch.float64) < 0.3
    keep = ~target
    assert torch.equal(model.last_split.info["target_mask"], target)
    assert torch.allclose(x_hat, net(y * keep, op))
    out = loss(x_hat, y, op, model)
    by_hand = (target * (op(x_hat) - y)).pow(2).sum() / int(target.sum())
    _close(out.total, by_hand)


@pytest.mark.parametrize("target", ["reconstruction", "measurement"])
def test_noise2inverse_ct(ct_problem, target):
    op, x, y = ct_problem
    net = LinearAdjointNet(scale=0.01)
    loss = Noise2InverseLoss(4, target=target, seed=9)
    model = loss.adapt_model(net)
    x_hat = model(y, op)
    cpu, _ = _gens(9)
    k = int(torch.randint(4, (1,), generator=cpu).item())
    assert model.last_split.info["k"] == k
    held = torch.arange(k, 12, 4)
    rest = torch.tensor([a for a in range(12) if a % 4 != k])
    assert torch.allclose(x_hat, net(y[..., rest, :], op.subset(rest)))
    out = loss(x_hat, y, op, model)
    op_k = op.subset(held)
    if target == "reconstruction":
        ref = filtered_backprojection(y[..., held, :], op_k)
        by_hand = (x_hat - ref).pow(2).mean()
    else:
        by_hand = (op_k(x_hat) - y[..., held, :]).pow(2).mean()
    _close(out.total, by_hand)


def test_noise2inverse_evaluation_averages_splits(ct_problem):
    op, x, y = ct_problem
    net = LinearAdjointNet(scale=0.01)
    model = Noise2InverseLoss(3).adapt_model(net).eval()
    with torch.no_grad():
        out = model(y, op)
        by_hand = sum(
            net(y[..., rest, :], op.subset(rest))
            for rest in (torch.tensor([a for a in range(12) if a % 3 != k]) for k in range(3))
        ) / 3
    assert torch.allclose(out, by_hand)


def test_supervised(mri_problem):
    op, x, y = mri_problem
    x_hat = x * 0.9 + 0.01j
    _close(SupervisedLoss()(x_hat, y, op, reference=x).total, (x_hat - x).abs().pow(2).mean())
    _close(SupervisedLoss(metric="l1")(x_hat, y, op, reference=x).total, (x_hat - x).abs().mean())
    with pytest.raises(ValueError, match="reference"):
        SupervisedLoss()(x_hat, y, op)


def test_weighted_sum_and_algebra(mri_problem):
    op, x, y = mri_problem
    net = IdentityNet()
    x_hat = LinearAdjointNet()(y, op)
    mc = MeasurementConsistencyLoss()
    ei = EquivariantImagingLoss(transform=Rotate90(1))
    total = WeightedSum([(0.5, mc), (2.0, ei)])(x_hat, y, op, net)
    a, b = mc(x_hat, y, op, net).total, ei(x_hat, y, op, net).total
    _close(total.total, 0.5 * a + 2.0 * b)
    assert set(total.parts) == {"mc", "ei"}
    algebra = (0.5 * mc + ei * 2.0)(x_hat, y, op, net)
    _close(algebra.total, total.total)
    named = WeightedSum({"data": mc, "equi": (3.0, ei)})(x_hat, y, op, net)
    assert set(named.parts) == {"data.mc", "equi.ei"}
    _close(named.total, a + 3 * b)
    twice = (mc + mc)(x_hat, y, op, net)
    assert set(twice.parts) == {"mc", "mc_2"}


def test_self_supervised_losses_never_see_the_reference(mri_problem):
    op, x, y = mri_problem
    net = LinearAdjointNet()
    x_hat = net(y, op)
    for cls in (MeasurementConsistencyLoss, EquivariantImagingLoss, SureGaussianLoss,
                SurePoissonLoss, SplittingLoss, SSDULoss, Noise2InverseLoss):
        assert "reference" not in inspect.signature(cls._loss).parameters
    poisoned = torch.full_like(x, float("nan"))
    loss = MeasurementConsistencyLoss() + SupervisedLoss()
    out = loss(x_hat, y, op, net, reference=x)
    assert torch.isfinite(out.total)
    out = MeasurementConsistencyLoss()(x_hat, y, op, net, reference=poisoned)
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("need_abs", [False, True])
def test_residual_norms_gradient_matches_autograd(mri_problem, need_abs):
    op, x, y = mri_problem
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(op.mask.shape, generator=gen, dtype=torch.float64)
    x0 = (x * 0.8).requires_grad_()
    sq, ab = residual_norms(op, x0, y, weight=w, need_abs=need_abs)
    value = sq.sqrt() + ab
    (g,) = torch.autograd.grad(value, x0)
    x1 = (x * 0.8).requires_grad_()
    r = w * (op(x1) - y)
    ref = r.abs().pow(2).sum().sqrt() + (r.abs().sum() if need_abs else 0)
    (g_ref,) = torch.autograd.grad(ref, x1)
    _close(value, ref)
    assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_sure_tau_default_is_relative(ct_problem):
    op, x, y = ct_problem
    net = LinearAdjointNet(scale=0.01)
    x_hat = net(y, op)
    # A linear network: the divergence does not depend on tau.
    a = SureGaussianLoss(0.05, seed=0)(x_hat, y, op, net).total
    b = SureGaussianLoss(0.05, tau=0.5, seed=0)(x_hat, y, op, net).total
    assert math.isclose(float(a.detach()), float(b.detach()), rel_tol=1e-7)


def test_noise2inverse_image_mode():
    """Crops of precomputed sub-reconstructions (K, D, H, W), no operator (any geometry)."""
    from operators3d import shepp_logan_3d
    from pipeline.models import ArtifactRemoval, UNet3D

    gen = torch.Generator().manual_seed(0)
    x = shepp_logan_3d((4, 8, 8)).double()
    subs = torch.stack([x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
                        for _ in range(4)]).unsqueeze(0)  # (1, K, D, H, W)
    torch.manual_seed(0)
    net = ArtifactRemoval(UNet3D(1, 1, widths=[2, 3]).double())
    loss = Noise2InverseLoss(4, seed=6)
    model = loss.adapt_model(net)
    x_hat = model(subs, None)
    cpu, _ = _gens(6)
    k = int(torch.randint(4, (1,), generator=cpu).item())
    rest = torch.cat([subs[:, j : j + 1] for j in range(4) if j != k], dim=1).mean(dim=1)
    assert torch.allclose(x_hat, net(rest, None))
    out = loss(x_hat, subs, None, model)
    _close(out.total, (x_hat - subs[:, k]).pow(2).mean())
    out.total.backward()
    model.eval()
    with torch.no_grad():
        mean = sum(net(torch.cat([subs[:, j : j + 1] for j in range(4) if j != k2], 1).mean(1), None)
                   for k2 in range(4)) / 4
        assert torch.allclose(model(subs, None), mean)
    with pytest.raises(ValueError, match="needs an operator"):
        MeasurementConsistencyLoss()(x_hat, subs, None)
    with pytest.raises(ValueError, match=r"\(\*batch, 3, D, H, W\)"):
        Noise2InverseLoss(3).adapt_model(net)(subs, None)
