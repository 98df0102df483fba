"""Properties: EI vanishes for an equivariant, range-exact reconstructor; splits are disjoint
covers; SURE / PURE are unbiased; splits are fresh, seeded and resumable."""

from __future__ import annotations

import math

import pytest
import torch
from losses_helpers import IdentityNet, ct_problem, mri_problem  # noqa: F401
from torch import nn

from operators3d import (
    Diagonal,
    GaussianNoise,
    Identity,
    MultiCoilMRI,
    PoissonGaussianNoise,
    PoissonNoise,
    Rotate90,
    Shift,
    TransmissionNoise,
    poisson_disc_mask,
)
from pipeline.losses import (
    EquivariantImagingLoss,
    MeasurementConsistencyLoss,
    Noise2InverseLoss,
    SplittingLoss,
    SSDULoss,
    SureGaussianLoss,
    SurePoissonLoss,
    angle_subsets,
    calibration_size,
    equivariant_imaging,
    ssdu_probabilities,
)
from pipeline.models import ArtifactRemoval


class _IdentityBackbone(nn.Module):
    in_channels = out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        # float64 like the data: reconstructors cast channels to the backbone's precision
        self.weight = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, z):
        return z * self.weight


# ----------------------------------------------------------------------------- EI
def test_ei_zero_for_identity_operator_and_network():
    op = Identity((4, 8, 8))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = op(x)
    for model in (IdentityNet(), ArtifactRemoval(_IdentityBackbone())):
        for transform in (Rotate90, Shift, Rotate90(3)):
            loss = equivariant_imaging(transform=transform, seed=0)
            out = loss(model(y, op), y, op, model)
            assert out.parts["ei"].item() < 1e-28
            assert out.parts["mc"].item() < 1e-28


def test_ei_zero_for_unitary_mri_and_adjoint_network():
    # Fully sampled single-coil MRI is unitary; f = Aᴴ is exact on the range and commutes
    # with rotations and shifts.
    op = MultiCoilMRI(mask=torch.ones(8, 8), volume_shape=(3, 8, 8), dtype=torch.complex128)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, dtype=torch.complex128, generator=gen)
    y = op(x)
    net = IdentityNet()
    for transform in (Rotate90, Shift):
        out = EquivariantImagingLoss(transform=transform, seed=1)(net(y, op), y, op, net)
        assert out.total.item() < 1e-24


def test_ei_nonzero_when_null_space_moves(mri_problem):
    op, x, y = mri_problem
    net = IdentityNet()
    out = EquivariantImagingLoss(transform=Rotate90(1))(net(y, op), y, op, net)
    assert out.total.item() > 1e-4


# ----------------------------------------------------------------------------- splits
def test_ssdu_split_is_a_disjoint_cover_with_calibration_in_theta(mri_problem):
    op, x, y = mri_problem
    loss = SSDULoss(rho=0.4, seed=0)
    model = loss.adapt_model(IdentityNet())
    omega = op.mask != 0
    calib = calibration_size(op.mask)
    assert min(calib) >= 4  # the mask was built with a 4×4 calibration block
    block = tuple(slice(n // 2 - c // 2, n // 2 - c // 2 + c) for n, c in zip(op.mask.shape, calib))
    fractions = []
    for _ in range(200):
        model(y, op)
        split = model.last_split
        theta, lam = split.info["theta"], split.info["lambda"]
        assert not bool((theta & lam).any())
        assert torch.equal(theta | lam, omega)
        assert bool(theta[block].all())
        fractions.append(float(lam.sum()) / float(omega.sum()))
    assert abs(sum(fractions) / len(fractions) - 0.4) < 0.02


def test_ssdu_probabilities():
    mask = poisson_disc_mask((32, 32), 3, calibration=6, generator=torch.Generator().manual_seed(2))
    probs = ssdu_probabilities(mask, 0.4)
    assert math.isclose(float(probs.sum()), 0.4 * float((mask != 0).sum()), rel_tol=1e-6)
    assert float(probs[mask == 0].abs().max()) == 0
    assert float(probs[13:19, 13:19].abs().max()) == 0  # calibration stays in Θ
    assert float(probs.max()) <= 0.95
    # variable density: the probability decreases away from the centre
    centre = probs[10:22, 10:22][mask[10:22, 10:22] & (probs[10:22, 10:22] > 0)].mean()
    edge = probs[:6][mask[:6]].mean()
    assert centre > edge
    with pytest.raises(ValueError, match="rho"):
        ssdu_probabilities(mask, 0.99)


def test_ssdu_refuses_non_mri(ct_problem):
    op, x, y = ct_problem
    model = SSDULoss().adapt_model(IdentityNet())
    with pytest.raises(TypeError, match="MultiCoilMRI"):
        model(y, op)


def test_generic_split_is_a_disjoint_cover_of_measured_entries(mri_problem):
    op, x, y = mri_problem
    model = SplittingLoss(rho=0.3, seed=1).adapt_model(IdentityNet())
    model(y, op)
    info = model.last_split.info
    keep, target = info["input_mask"], info["target_mask"]
    measured = torch.broadcast_to(op.mask != 0, op.range_shape)
    assert not bool((keep & target).any())
    assert torch.equal(keep | target, measured)


def test_noise2inverse_angle_subsets_are_a_disjoint_cover(ct_problem):
    op, x, y = ct_problem
    for k in (2, 3, 4, 5):
        subsets = angle_subsets(12, k)
        joined = torch.cat(subsets)
        assert joined.numel() == 12 and torch.equal(joined.sort().values, torch.arange(12))
    model = Noise2InverseLoss(4, seed=0).adapt_model(IdentityNet())
    for _ in range(6):
        model(y, op)
        info = model.last_split.info
        both = torch.cat([info["input_angles"], info["target_angles"]]).sort().values
        assert torch.equal(both, torch.arange(12))
        assert torch.equal(info["target_angles"], torch.arange(info["k"], 12, 4))
    with pytest.raises(ValueError, match="num_splits"):
        angle_subsets(3, 4)


def test_noise2inverse_mri_subsets_are_a_disjoint_cover(mri_problem):
    op, x, y = mri_problem
    model = Noise2InverseLoss(3, seed=0).adapt_model(IdentityNet())
    model(y, op)
    subsets = model.last_split.info["subsets"]
    total = torch.zeros_like(subsets[0], dtype=torch.int64)
    for s in subsets:
        total += s.to(torch.int64)
    assert torch.equal(total, (op.mask != 0).to(torch.int64))


def test_splits_are_fresh_seeded_and_resumable(mri_problem):
    op, x, y = mri_problem
    loss = SSDULoss(seed=21)
    model = loss.adapt_model(IdentityNet())
    draws = []
    for _ in range(3):
        model(y, op)
        draws.append(model.last_split.info["lambda"].clone())
    assert not torch.equal(draws[0], draws[1])
    again = SSDULoss(seed=21)
    other = again.adapt_model(IdentityNet())
    other(y, op)
    assert torch.equal(other.last_split.info["lambda"], draws[0])
    # resume: a fresh loss loading the state after the first draw continues the sequence
    resumed = SSDULoss(seed=999)
    state = again.state_dict()
    resumed.load_state_dict(state)
    third = resumed.adapt_model(IdentityNet())
    third(y, op)
    assert torch.equal(third.last_split.info["lambda"], draws[1])


def test_loss_requires_the_adapted_model(mri_problem):
    op, x, y = mri_problem
    net = IdentityNet()
    with pytest.raises(ValueError, match="adapt"):
        SSDULoss()(net(y, op), y, op, net)


# ----------------------------------------------------------------------------- SURE unbiased
def _unbiased(values: list[float], truths: list[float]) -> tuple[float, float]:
    d = torch.tensor(values, dtype=torch.float64) - torch.tensor(truths, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


class _Smoother(nn.Module):
    """A fixed linear denoiser ``f(y) = S Aᴴ y`` (S mixes neighbours along H and W)."""

    def forward(self, y, op):
        x = op.adjoint(y)
        return (0.5 * x + 0.2 * torch.roll(x, 1, -1) + 0.15 * torch.roll(x, -1, -2)
                + 0.1 * torch.roll(x, 1, -2))


def _gaussian_check(op, z, noise, mask, num_draws=1500):
    gen = torch.Generator().manual_seed(0)
    model = _Smoother()
    loss = SureGaussianLoss(noise_model=noise, seed=3)
    values, truths = [], []
    m = None
    for _ in range(num_draws):
        y = noise.sample(z, generator=gen, mask=mask)
        x_hat = model(y, op)
        values.append(loss(x_hat, y, op, model).total.item())
        h = op(x_hat)
        m = m or (int(torch.broadcast_to(mask, z.shape).sum()) if mask is not None else z.numel())
        truths.append(float((h - z).abs().pow(2).sum()) / m)
    return _unbiased(values, truths)


def test_sure_gaussian_unbiased_real():
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(2, 6, 6, generator=gen, dtype=torch.float64) + 0.5
    op = Diagonal(weights)
    z = op(torch.rand(2, 6, 6, generator=gen, dtype=torch.float64))
    bias, se = _gaussian_check(op, z, GaussianNoise(0.3), None)
    assert abs(bias) < 3 * se, (bias, se)


def test_sure_gaussian_unbiased_complex_masked():
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 6, generator=gen) < 0.6
    op = MultiCoilMRI(mask=mask, volume_shape=(2, 6, 6), dtype=torch.complex128)
    x = torch.randn(2, 6, 6, generator=gen, dtype=torch.complex128)
    bias, se = _gaussian_check(op, op(x), GaussianNoise(0.4), mask)
    assert abs(bias) < 3 * se, (bias, se)


@pytest.mark.parametrize("noise", [PoissonNoise(0.5), PoissonGaussianNoise(0.5, 0.4)])
def test_sure_poisson_unbiased(noise):
    gen = torch.Generator().manual_seed(3)
    op = Diagonal(torch.rand(2, 6, 6, generator=gen, dtype=torch.float64) + 0.5)
    z = op(torch.rand(2, 6, 6, generator=gen, dtype=torch.float64) * 8 + 2)
    model = _Smoother()
    loss = SurePoissonLoss(noise_model=noise, seed=4)
    values, truths, naive = [], [], []
    for _ in range(1500):
        y = noise.sample(z, generator=gen)
        x_hat = model(y, op)
        values.append(loss(x_hat, y, op, model).total.item())
        truths.append(float((op(x_hat) - z).pow(2).mean()))
        naive.append(float((op(x_hat) - y).pow(2).mean()))
    bias, se = _unbiased(values, truths)
    assert abs(bias) < 3 * se, (bias, se)
    # the test has the power to see a bias: the plain residual fails it
    naive_bias, naive_se = _unbiased(naive, truths)
    assert abs(naive_bias) > 3 * naive_se


class _Gain(nn.Module):
    """A fixed per-entry shrinkage ``f(y) = g ⊙ Aᴴy`` (the Jacobian of ``A f`` is ``diag(g)`` for
    ``A = I``)."""

    def __init__(self, gain: torch.Tensor) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, y, op):
        return self.gain * op.adjoint(y)


def _transmission_mean(p: torch.Tensor, photons: float) -> torch.Tensor:
    """``E[−log(max(N, 1)/I₀)]``, ``N ~ Poisson(I₀ e^{−p})``, summed over the counts' pmf."""
    rate = (photons * torch.exp(-p)).reshape(-1, 1)
    k = torch.arange(0, int(rate.max() + 12 * rate.max().sqrt() + 20), dtype=p.dtype)
    pmf = torch.exp(k * rate.log() - rate - torch.lgamma(k + 1))
    return (pmf * -torch.log(k.clamp_min(1) / photons)).sum(-1).reshape(p.shape)


def test_sure_transmission_unbiased():
    """Post-log CT noise: per-entry variances ``e^{y}/I₀`` make SURE unbiased to first order.

    SURE estimates the risk about the measurements' mean, which ``−log`` moves by ``≈ v/2`` off
    the line integrals; the truth is taken about that mean (computed exactly)."""
    p = torch.linspace(0.1, 4.0, 72, dtype=torch.float64).reshape(2, 6, 6)  # line integrals
    op = Identity((2, 6, 6))
    # trust the long, noisy rays least: the divergence weighs each variance by its own gain
    model = _Gain(0.1 + 0.85 * p / 4.0)
    noise = TransmissionNoise(1e4)
    gen = torch.Generator().manual_seed(5)
    loss = SureGaussianLoss(noise_model=noise, seed=6)
    homoscedastic = SureGaussianLoss(sigma=float(noise.variance(p).mean().sqrt()), seed=6)
    mean = _transmission_mean(p, noise.photons)
    values, truths, flat = [], [], []
    for _ in range(1500):
        y = noise.sample(p, generator=gen)
        x_hat = model(y, op)
        values.append(loss(x_hat, y, op, model).total.item())
        flat.append(homoscedastic(x_hat, y, op, model).total.item())
        truths.append(float((op(x_hat) - mean).pow(2).mean()))
    bias, se = _unbiased(values, truths)
    assert abs(bias) < 3 * se, (bias, se)
    # the test has the power to see a bias: one variance for every entry fails it
    flat_bias, flat_se = _unbiased(flat, truths)
    assert abs(flat_bias) > 3 * flat_se, (flat_bias, flat_se)
    with pytest.raises(ValueError, match="not both"):
        SureGaussianLoss(0.1, noise_model=noise)


class _FBPSmoother(nn.Module):
    """A fixed linear reconstructor: a blurred ``Aᵀ R y`` (R the Ram–Lak filter)."""

    def forward(self, y, op):
        from pipeline.classical import filtered_backprojection

        x = filtered_backprojection(y, op)
        return 0.6 * x + 0.2 * torch.roll(x, 1, -1) + 0.2 * torch.roll(x, -1, -2)


def test_image_metric_is_the_image_norm_on_the_range(ct_problem):
    from pipeline.models.physics import ImageMetric

    op, x, _ = ct_problem
    metric = ImageMetric(op)
    gen = torch.Generator().manual_seed(7)
    r, s = (torch.randn(op.range_shape, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.allclose((r * metric(s)).sum(), (metric(r) * s).sum(), rtol=1e-10)  # self-adjoint
    assert (r * metric(r)).sum() >= 0
    delta = torch.zeros(op.range_shape, dtype=torch.float64)
    delta[1, 3, 8] = 1.0
    assert metric(delta)[1, 3, 8].item() == pytest.approx(metric.diagonal, rel=1e-12)
    # ‖x‖² = c⟨Ax, R Ax⟩ for a smooth image (FBP inverts A on its range)
    smooth = torch.exp(-((torch.arange(12.0) - 5.5) ** 2) / 12).double()
    xs = smooth[None, :, None] * smooth[None, None, :] * torch.ones(4, 1, 1, dtype=torch.float64)
    p = op(xs)
    assert (p * metric(p)).sum().item() == pytest.approx(xs.pow(2).sum().item(), rel=0.05)
    with pytest.raises(ValueError, match="parallel-beam"):
        ImageMetric(op.restrict_measurements(torch.rand(op.range_shape, generator=gen) < 0.5))


def test_sure_image_metric_unbiased(ct_problem):
    """``metric="image"``: an unbiased estimate of ``‖M^{1/2}(h − Ax)‖²/n``."""
    from pipeline.models.physics import ImageMetric

    op, x, _ = ct_problem
    z = op(x[0])
    noise = GaussianNoise(0.2)
    model = _FBPSmoother()
    metric = ImageMetric(op)
    loss = SureGaussianLoss(noise_model=noise, metric="image", seed=8)
    plain = SureGaussianLoss(noise_model=noise, seed=8)
    gen = torch.Generator().manual_seed(9)
    values, truths, plains = [], [], []
    for _ in range(600):
        y = noise.sample(z, generator=gen)
        x_hat = model(y, op)
        r = op(x_hat) - z
        values.append(loss(x_hat, y, op, model).total.item())
        plains.append(plain(x_hat, y, op, model).total.item())
        truths.append(float((r * metric(r)).sum()) / x_hat.numel())
    bias, se = _unbiased(values, truths)
    assert abs(bias) < 3 * se, (bias, se)
    # the test has the power to tell the metrics apart
    other, other_se = _unbiased(plains, truths)
    assert abs(other) > 3 * other_se, (other, other_se)
    with pytest.raises(ValueError, match="metric"):
        SureGaussianLoss(0.1, metric="fourier")


def test_sure_poisson_refuses_complex(mri_problem):
    op, x, y = mri_problem
    net = IdentityNet()
    with pytest.raises(TypeError, match="complex"):
        SurePoissonLoss(0.5)(net(y, op), y, op, net)


def test_measurement_consistency_counts_only_measured_entries(mri_problem):
    op, x, y = mri_problem
    x_hat = x * 0.5
    value = MeasurementConsistencyLoss()(x_hat, y, op).total
    residual = (op(x_hat) - y).abs().pow(2)
    assert float(residual[..., op.mask == 0].abs().max()) == 0
    assert math.isclose(float(value), float(residual[..., op.mask != 0].mean()), rel_tol=1e-12)


def test_sure_averages_to_the_closed_form_risk_of_a_linear_denoiser():
    """Denoising (A = I) with the fixed linear smoother ``x̂ = S y``: the risk is known in closed
    form, ``E‖S y − x‖²/n = (‖(S − I) x‖² + σ² ‖S‖_F²)/n``; SURE averaged over noise draws
    lands on it (within 3 standard errors), not merely on each draw's realised error."""
    gen = torch.Generator().manual_seed(5)
    shape, sigma = (2, 6, 6), 0.3
    op = Diagonal(torch.ones(shape, dtype=torch.float64))
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    model = _Smoother()
    n = x.numel()
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    s = torch.stack([model(e, op).reshape(-1) for e in basis], dim=1)  # column j = S e_j
    risk = (float(((s - torch.eye(n, dtype=torch.float64)) @ x.reshape(-1)).square().sum())
            + sigma**2 * float(s.square().sum())) / n
    loss = SureGaussianLoss(noise_model=GaussianNoise(sigma), seed=4)
    noise = GaussianNoise(sigma)
    values = []
    for _ in range(2000):
        y = noise.sample(x, generator=gen)
        values.append(loss(model(y, op), y, op, model).total.item())
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std() / math.sqrt(v.numel()))
    assert abs(float(v.mean()) - risk) < 3 * se, (float(v.mean()), risk, se)
    assert se < 0.05 * risk  # the test can tell a wrong risk apart
