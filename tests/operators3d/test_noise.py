"""Tests of the noise models in operators3d.noise.

Moment checks use a fixed seed and allow 5 standard errors: for ``n`` samples the mean has
standard error ``sqrt(Var/n)`` and the sample variance ``sqrt((μ₄ − Var²)/n)``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from operators3d.noise import (
    GaussianNoise,
    NoiseModel,
    PoissonGaussianNoise,
    PoissonNoise,
    TransmissionNoise,
    noise_model_from_dict,
)

N = 200_000
Z_LEVELS = (0.3, 2.0, 25.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_moments(samples, mean, var, mu4, what):
    """Sample mean and variance within 5 standard errors of ``mean`` and ``var``."""
    n = samples.numel()
    m = samples.mean().item()
    v = samples.var().item()
    assert abs(m - mean) <= 5 * math.sqrt(var / n), (what, m, mean)
    assert abs(v - var) <= 5 * math.sqrt((mu4 - var**2) / n), (what, v, var)


# ----------------------------------------------------------------------------- Gaussian
def test_gaussian_real_moments():
    sigma = 0.3
    clean = torch.rand(N, generator=_gen(1), dtype=torch.float64)
    y = GaussianNoise(sigma).sample(clean, generator=_gen(2))
    assert y.shape == clean.shape and y.dtype == clean.dtype
    _check_moments(y - clean, 0.0, sigma**2, 3 * sigma**4, "real")


def test_gaussian_complex_moments_per_part():
    sigma = 0.2
    clean = torch.randn(N, dtype=torch.complex128, generator=_gen(1))
    y = GaussianNoise(sigma).sample(clean, generator=_gen(2))
    assert y.dtype == torch.complex128
    n = y - clean
    for part, what in ((n.real, "real part"), (n.imag, "imaginary part")):
        _check_moments(part, 0.0, sigma**2, 3 * sigma**4, what)
    # Real and imaginary parts are independent: their correlation is within 5 / sqrt(N) of 0.
    corr = (n.real * n.imag).mean().item() / sigma**2
    assert abs(corr) <= 5 / math.sqrt(N)
    var = GaussianNoise(sigma).variance(clean)
    assert var.dtype == torch.float64 and torch.allclose(var, torch.full_like(var, sigma**2))


def test_gaussian_mask_leaves_unmeasured_entries_zero():
    mask = torch.rand(16, 16, generator=_gen(3)) < 0.3
    clean = torch.randn(2, 4, 16, 16, dtype=torch.complex64, generator=_gen(4)) * mask
    y = GaussianNoise(0.1).sample(clean, generator=_gen(5), mask=mask)
    assert torch.all(y[..., ~mask] == 0)
    assert torch.all(y[..., mask] != clean[..., mask])
    var = GaussianNoise(0.1).variance(clean, mask=mask)
    assert torch.all(var[..., ~mask] == 0) and torch.allclose(var[..., mask], torch.tensor(0.01))
    with pytest.raises(ValueError, match="GaussianNoise.sample: mask"):
        GaussianNoise(0.1).sample(clean, mask=torch.ones(3, 16))


def test_gaussian_gradient_is_identity():
    clean = torch.randn(3, 4, 5, requires_grad=True)
    y = GaussianNoise(0.5).sample(clean, generator=_gen())
    (g,) = torch.autograd.grad(y.sum(), clean)
    assert torch.equal(g, torch.ones_like(g))


# ------------------------------------------------------------------------------ Poisson
@pytest.mark.parametrize("gain", [1.0, 0.05])
def test_poisson_is_unbiased_with_variance_gain_z(gain):
    model = PoissonNoise(gain)
    clean = torch.tensor(Z_LEVELS, dtype=torch.float64).repeat_interleave(N // 4).reshape(3, -1)
    y = model.sample(clean, generator=_gen(6))
    assert torch.allclose(y / gain, (y / gain).round())  # multiples of the gain
    for z, row in zip(Z_LEVELS, y):
        lam = z / gain
        # y = γ k, k ~ Poisson(λ): Var = γ² λ = γ z, μ₄ = γ⁴ (λ + 3λ²).
        _check_moments(row, z, gain * z, gain**4 * (lam + 3 * lam**2), f"z={z}")
    assert torch.allclose(model.variance(clean), gain * clean)


@pytest.mark.parametrize("gain,sigma", [(0.5, 0.3), (0.02, 0.1)])
def test_poisson_gaussian_moments(gain, sigma):
    model = PoissonGaussianNoise(gain, sigma)
    clean = torch.tensor(Z_LEVELS, dtype=torch.float64).repeat_interleave(N // 4).reshape(3, -1)
    y = model.sample(clean, generator=_gen(7))
    for z, row in zip(Z_LEVELS, y):
        lam = z / gain
        vp, vg = gain * z, sigma**2
        mu4 = gain**4 * (lam + 3 * lam**2) + 6 * vp * vg + 3 * vg**2
        _check_moments(row, z, vp + vg, mu4, f"z={z}")
    assert torch.allclose(model.variance(clean), gain * clean + sigma**2)


def test_poisson_negative_clean():
    model = PoissonNoise(1.0)
    with pytest.raises(ValueError, match="PoissonNoise.sample: clean must be >= 0"):
        model.sample(torch.tensor([1.0, -0.5]), generator=_gen())
    with pytest.raises(ValueError, match="PoissonGaussianNoise.sample: clean must be >= 0"):
        PoissonGaussianNoise(1.0, 0.1).sample(torch.tensor([1.0, -0.5]), generator=_gen())
    # Rounding-sized negatives read as 0.
    y = model.sample(torch.tensor([1000.0, -1e-5]), generator=_gen())
    assert y[1].item() == 0.0
    # Explicit clamping, for re-measuring a network output.
    y = model.sample(torch.tensor([3.0, -2.0]), generator=_gen(), clamp_negative=True)
    assert y[1].item() == 0.0
    assert torch.equal(model.variance(torch.tensor([2.0, -1.0])), torch.tensor([2.0, 0.0]))
    with pytest.raises(TypeError, match="PoissonNoise.sample: expected a real"):
        model.sample(torch.ones(3, dtype=torch.complex64))


def test_poisson_mask_and_straight_through_gradient():
    mask = torch.tensor([True, False, True, False])
    clean = torch.tensor([5.0, 7.0, 9.0, 0.0], requires_grad=True)
    y = PoissonGaussianNoise(1.0, 0.5).sample(clean, generator=_gen(), mask=mask)
    assert y[1].item() == 7.0 and y[3].item() == 0.0
    (g,) = torch.autograd.grad(y.sum(), clean)
    assert torch.equal(g, torch.ones(4))


# ------------------------------------------------------------------------- transmission
@pytest.mark.parametrize("photons", [1e3, 1e5])
def test_transmission_moments_match_the_delta_method(photons):
    """``y = −log(N/I₀)``, ``N ~ Poisson(I₀ e^{−p})``: mean ``p + v/2``, variance ``v = e^{p}/I₀``
    to the order the test resolves (the next terms are ``O(v²)``)."""
    model = TransmissionNoise(photons)
    levels = (0.2, 1.5, 3.0)
    clean = torch.tensor(levels, dtype=torch.float64).repeat_interleave(N // 4).reshape(3, -1)
    y = model.sample(clean, generator=_gen(11))
    counts = photons * torch.exp(-y)
    assert torch.allclose(counts, counts.round(), rtol=0, atol=1e-6 * photons)  # whole photon counts
    for p, row in zip(levels, y):
        v = math.exp(p) / photons
        n = row.numel()
        assert abs(row.mean().item() - (p + v / 2)) <= 5 * math.sqrt(v / n) + 2 * v**2, (p, row.mean())
        assert abs(row.var().item() / v - 1) <= 5 * math.sqrt(2 / n) + 3 * v, (p, row.var(), v)
    assert torch.allclose(model.variance(clean), torch.exp(clean) / photons)


def test_transmission_zero_counts_mask_and_gradient():
    model = TransmissionNoise(10.0)
    # Far behind dense material nearly every count is 0: read as one photon, y = log(I₀).
    y = model.sample(torch.full((1000,), 30.0), generator=_gen(12))
    assert torch.allclose(y, torch.full_like(y, math.log(10.0)))
    mask = torch.tensor([True, False, True])
    clean = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    y = model.sample(clean, generator=_gen(), mask=mask)
    assert y[1].item() == 1.0 and y.dtype == clean.dtype
    (g,) = torch.autograd.grad(y.sum(), clean)
    assert torch.equal(g, torch.ones(3))
    assert torch.equal(model.variance(clean.detach(), mask=mask)[1], torch.tensor(0.0))
    with pytest.raises(ValueError, match="TransmissionNoise: photons must be finite and > 0"):
        TransmissionNoise(0.0)
    with pytest.raises(TypeError, match="TransmissionNoise.sample: expected a real"):
        model.sample(torch.ones(3, dtype=torch.complex64))


# --------------------------------------------------------------- determinism, metadata
@pytest.mark.parametrize(
    "model",
    [GaussianNoise(0.1), PoissonNoise(0.5), PoissonGaussianNoise(0.5, 0.1), TransmissionNoise(1e3)],
)
def test_seeded_sampling_is_deterministic(model):
    clean = torch.rand(4, 5, 6, generator=_gen(9)) * 10
    a = model.sample(clean, generator=_gen(1))
    b = model.sample(clean, generator=_gen(1))
    c = model.sample(clean, generator=_gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "model",
    [GaussianNoise(0.01), PoissonNoise(0.5), PoissonGaussianNoise(2, 0.1), TransmissionNoise(1e4)],
)
def test_dict_round_trip(model):
    data = json.loads(json.dumps(model.to_dict()))
    assert noise_model_from_dict(data) == model
    assert type(model).from_dict(data) == model
    assert isinstance(model, NoiseModel)


def test_dict_format_and_errors():
    assert GaussianNoise(0.01).to_dict() == {"kind": "gaussian", "sigma": 0.01}
    assert PoissonNoise(2).to_dict() == {"kind": "poisson", "gain": 2.0}
    assert PoissonGaussianNoise(2, 0.1).to_dict() == {
        "kind": "poisson_gaussian",
        "gain": 2.0,
        "sigma": 0.1,
    }
    assert TransmissionNoise(1e4).to_dict() == {"kind": "transmission_poisson", "photons": 1e4}
    with pytest.raises(ValueError, match="noise_model_from_dict: expected kind"):
        noise_model_from_dict({"kind": "laplace", "scale": 1.0})
    with pytest.raises(ValueError, match="missing"):
        noise_model_from_dict({"kind": "poisson_gaussian", "gain": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        noise_model_from_dict({"kind": "gaussian", "sigma": 1.0, "sgima": 2.0})
    with pytest.raises(ValueError, match="GaussianNoise.from_dict: expected kind 'gaussian'"):
        GaussianNoise.from_dict({"kind": "poisson", "gain": 1.0})


def test_parameters_for_sure():
    assert GaussianNoise(0.2).gain == 0.0 and GaussianNoise(0.2).sigma == 0.2
    assert PoissonNoise(0.5).sigma == 0.0 and PoissonNoise(0.5).gain == 0.5
    pg = PoissonGaussianNoise(gain=0.5, sigma=0.2)
    assert (pg.gain, pg.sigma) == (0.5, 0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pg.sigma = 1.0  # type: ignore[misc]


def test_bad_parameters():
    with pytest.raises(ValueError, match="GaussianNoise: sigma must be finite and >= 0"):
        GaussianNoise(-0.1)
    with pytest.raises(ValueError, match="GaussianNoise: sigma"):
        GaussianNoise(float("nan"))
    with pytest.raises(ValueError, match="PoissonNoise: gain must be finite and > 0"):
        PoissonNoise(0.0)
    with pytest.raises(ValueError, match="PoissonGaussianNoise: gain"):
        PoissonGaussianNoise(-1.0, 0.1)
    with pytest.raises(ValueError, match="PoissonGaussianNoise: sigma"):
        PoissonGaussianNoise(1.0, -0.1)
    with pytest.raises(TypeError, match="GaussianNoise: sigma must be a real number"):
        GaussianNoise("0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GaussianNoise.sample: expected a floating"):
        GaussianNoise(0.1).sample(torch.ones(3, dtype=torch.int64))
    assert torch.equal(GaussianNoise(0.0).sample(torch.ones(3)), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling():
    clean = torch.rand(1000, device="cuda") * 5
    g = torch.Generator(device="cuda").manual_seed(0)
    for model in (GaussianNoise(0.1), PoissonNoise(0.5), PoissonGaussianNoise(0.5, 0.1)):
        y = model.sample(clean, generator=g)
        assert y.device == clean.device and y.shape == clean.shape
    with pytest.raises(ValueError, match="generator is on cpu"):
        GaussianNoise(0.1).sample(clean, generator=_gen())
    z = torch.randn(100, dtype=torch.complex64, device="cuda")
    assert GaussianNoise(0.1).sample(z, generator=g).dtype == torch.complex64
