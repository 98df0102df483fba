"""Losses through a non-linear detector (issue 18.2): measurement consistency in the measurement
space of ``y = g(A x)``, EI re-measuring through ``g``, terms that assume linear data refused,
and the training scans' ``detector`` record reaching the loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from operators3d import Clip, ParallelBeamCT, Rotate90, Sign
from pipeline.config_base import ConfigError
from pipeline.data import SimulateCTConfig, open_scan, simulate_ct
from operators3d import GaussianNoise
from pipeline.losses import EquivariantImagingLoss, MeasurementConsistencyLoss, SureGaussianLoss
from pipeline.losses.detector import detector_model, nonlinear_consistency
from pipeline.train.build import build_loss, scan_facts
from pipeline.train.config import LossConfig

SHAPE = (2, 12, 12)


def _op(dtype=torch.float64) -> ParallelBeamCT:
    angles = torch.arange(10, dtype=torch.float64) * (math.pi / 10)
    return ParallelBeamCT(volume_shape=SHAPE, angles=angles, det_count=18).to(dtype)


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *SHAPE), generator=g, dtype=torch.float64)


class _Recorder(nn.Module):
    """``f(y) = c Aᵀ y``, remembering the measurements it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
        self.seen: list[torch.Tensor] = []

    def forward(self, y, op):
        self.seen.append(y.detach().clone())
        return self.c * op.adjoint(y)


def test_clipped_consistency_compares_in_the_clipped_measurement_space():
    op, x, x_hat = _op(), _x(0), _x(1).requires_grad_(True)
    level = float(op(x).quantile(0.3))
    record = {"model": "clip", "low": level, "high": None}
    y = torch.clamp(op(x), min=level)
    out = MeasurementConsistencyLoss(detector=record)(x_hat, y, op)
    expected = (y - torch.clamp(op(x_hat), min=level)).square().sum() / y.numel()
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-12)
    # the true image is consistent with its clipped data; the linear loss says it is not
    assert MeasurementConsistencyLoss(detector=record)(x, y, op).total.item() < 1e-24
    assert MeasurementConsistencyLoss()(x, y, op).total.item() > 1e-3
    # the gradient is the Jacobian transpose of clip∘A: Aᵀ(1[Ax̂ ≥ low] ⊙ 2(g(Ax̂) − y)/m)
    out.total.backward()
    z = op(x_hat.detach())
    w = torch.where(z >= level, 2 * (torch.clamp(z, min=level) - y) / y.numel(), torch.zeros_like(z))
    torch.testing.assert_close(x_hat.grad, op.adjoint(w), rtol=1e-12, atol=1e-15)


def test_one_bit_consistency_is_the_logistic_loss_on_the_linear_part():
    op, x, x_hat = _op(), _x(0), _x(1).requires_grad_(True)
    tau, width = float(op(x).median()), 0.3
    record = {"model": "sign", "threshold": tau, "width": width, "gradient": "zero"}
    y = Sign(op, tau).forward(x)
    value = MeasurementConsistencyLoss(detector=record)(x_hat, y, op).total
    expected = torch.log1p(torch.exp(-y * (op(x_hat) - tau) / width)).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    value.backward()  # sign is never differentiated: the gradient flows through A alone
    assert x_hat.grad.abs().sum() > 0
    # a one-bit quantiser reads the same bit: low/high about the middle of its range
    lo, hi = 0.0, 2 * tau
    q = torch.where(op(x) >= tau, hi, lo)
    quantised = nonlinear_consistency(detector_model({"model": "quantize", "bits": 1, "low": lo, "high": hi}, op),
                                      x_hat.detach(), q, q.numel())
    expected_q = torch.log1p(torch.exp(-y * (op(x_hat.detach()) - tau) / tau)).mean()
    assert quantised.item() == pytest.approx(expected_q.item(), rel=1e-12)


def test_ei_re_measures_through_the_detector():
    op, x = _op(), _x(0)
    level = float(op(x).quantile(0.4))
    record = {"model": "clip", "low": level, "high": None}
    y = torch.clamp(op(x), min=level)
    net = _Recorder()
    loss = EquivariantImagingLoss(transform=Rotate90, detector=record, seed=3)
    x_hat = net(y, op)
    loss(x_hat, y, op, net).total.backward()
    y2 = net.seen[-1]
    assert y2.min().item() == pytest.approx(level, abs=1e-12)  # the second pass saw clipped data
    assert (y2 == level).float().mean() > 0.05
    # the same loss without the detector hands the network linear measurements below the level
    net_linear = _Recorder()
    EquivariantImagingLoss(transform=Rotate90, seed=3)(net_linear(y, op), y, op, net_linear)
    assert net_linear.seen[-1].min().item() < level - 1e-6
    assert net.c.grad is not None and torch.isfinite(net.c.grad)


def test_apply_values_differentiates_with_the_models_derivative():
    op = _op()
    clip = Clip(op, low=0.2, high=0.8)
    z = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64).requires_grad_(True)
    out = clip.apply_values(z)
    torch.testing.assert_close(out, z.detach().clamp(0.2, 0.8))
    out.sum().backward()
    torch.testing.assert_close(z.grad, ((z.detach() >= 0.2) & (z.detach() <= 0.8)).double())
    sign = Sign(op, 0.5, width=0.25)  # straight-through: 1/width inside the band
    z2 = z.detach().clone().requires_grad_(True)
    sign.apply_values(z2).sum().backward()
    torch.testing.assert_close(z2.grad, ((z2.detach() - 0.5).abs() <= 0.25).double() * 4)
    assert Sign(op, 0.5, gradient="zero").apply_values(z2).requires_grad is False


@pytest.fixture(scope="module")
def clipped_scan(tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "clipped.zarr"
    simulate_ct(SimulateCTConfig(out=str(out), shape=(4, 20, 20), angles=18, chunk_depth=2, workers=1,
                                 scheduler="sync", progress=False, noise_sigma=0.0, saturation=0.6))
    return str(out)


def test_the_scans_detector_reaches_the_loss_and_ignore_drops_it(clipped_scan):
    scan = open_scan(clipped_scan)
    assert scan.metadata.detector["model"] == "clip" and scan.metadata.detector["fraction_at_low"] > 0.02
    facts = scan_facts([clipped_scan])
    assert facts.detector["low"] == pytest.approx(-math.log(0.6))
    y, op = scan.slab(slice(0, 4))
    ref = scan.reference.read_torch(slice(0, 4))[None]
    y = y[None]
    aware = build_loss(LossConfig(terms=[{"name": "mc"}]), facts, seed=0)
    linear = build_loss(LossConfig(terms=[{"name": "mc"}], detector="ignore"), facts, seed=0)
    # noise-free data: the reference is consistent through the detector, not through A alone
    assert aware(ref, y, op).total.item() < 1e-9
    assert linear(ref, y, op).total.item() > 1e-3


@pytest.mark.parametrize("term", [{"name": "n2i"}, {"name": "splitting"}])
def test_terms_that_assume_linear_data_are_refused(clipped_scan, term):
    facts = scan_facts([clipped_scan])
    with pytest.raises(ConfigError, match="non-linear detector.*loss.detector: ignore"):
        build_loss(LossConfig(terms=[{"name": "mc"}, term]), facts, seed=0)


def test_scans_with_different_detectors_are_refused(clipped_scan, tmp_path):
    other = tmp_path / "linear.zarr"
    simulate_ct(SimulateCTConfig(out=str(other), shape=(4, 20, 20), angles=18, chunk_depth=2, workers=1,
                                 scheduler="sync", progress=False))
    with pytest.raises(ConfigError, match="different detectors.*clip.*linear"):
        scan_facts([clipped_scan, str(other)])


def test_amplitude_scaling_moves_rays_across_the_clip_level():
    op, x = _op(), _x(0)
    level = float(op(x).quantile(0.8))
    record = {"model": "clip", "low": None, "high": level}
    y = torch.clamp(op(x), max=level)
    net = _Recorder()
    x_hat = net(y, op).detach()
    EquivariantImagingLoss(transform=lambda v: v, amplitude=(2.0, 2.0), detector=record, seed=0)(x_hat, y, op, net)
    torch.testing.assert_close(net.seen[-1], torch.clamp(op(2 * x_hat), max=level))
    # a range draws a seeded factor inside it, the same for the same seed
    seen = []
    for _ in range(2):
        rec = _Recorder()
        EquivariantImagingLoss(transform=lambda v: v, amplitude=(0.5, 3.0), seed=7)(x_hat, y, op, rec)
        seen.append(rec.seen[-1])
    torch.testing.assert_close(seen[0], seen[1])
    alpha = float((seen[0] * op(x_hat)).sum() / op(x_hat).square().sum())
    assert 0.5 <= alpha <= 3.0 and abs(alpha - 1) > 1e-3
    with pytest.raises(ValueError, match="amplitude must be"):
        EquivariantImagingLoss(transform=lambda v: v, amplitude=(2.0, 1.0))
    with pytest.raises(ValueError, match="amplitude must be"):
        LossConfig(terms=[{"name": "ei", "amplitude": [0.0, 2.0]}])


def test_one_bit_mri_consistency_counts_both_parts_of_the_sampled_entries_only():
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps

    g = torch.Generator().manual_seed(2)
    shape = (2, 12, 10)
    mask = poisson_disc_mask(shape[1:], 2.0, calibration=4, generator=g)
    op = MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(3, shape)).to(torch.complex128)
    x = torch.complex(torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64))
    x_hat = (0.5 * x + 0.1).requires_grad_(True)
    record = {"model": "sign", "threshold": 0.0, "width": 0.3, "gradient": "zero"}
    y = Sign(op, 0.0).forward(x)
    value = MeasurementConsistencyLoss(detector=record)(x_hat[None], y[None], op).total
    sampled = op.measurement_mask().expand(op.range_shape)
    z, bits = torch.view_as_real(op(x_hat))[sampled], torch.view_as_real(y)[sampled]
    expected = torch.log1p(torch.exp(-bits * z / 0.3)).sum() / (2 * int(sampled.sum()))
    assert value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert bool((y[~sampled] == 0).all()) and set(torch.view_as_real(y)[sampled].unique().tolist()) == {-1.0, 1.0}
    value.backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0


def test_the_reference_free_estimate_refuses_a_scan_read_through_a_detector(clipped_scan, tmp_path, capsys):
    """evaluate --estimate re-measures A x̂ plus noise and scores held-out rays against A x̂: on
    clipped data that would be a confident wrong number, so it says why it cannot estimate."""
    from pipeline.cli import main
    from pipeline.train.validation import check_estimable

    out = str(tmp_path / "fbp.ome.zarr")
    assert main(["reconstruct", "--scan", clipped_scan, "--method", "fbp", "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", out, "--estimate"]) == 2
    err = capsys.readouterr().err
    assert "non-linear detector (clip)" in err and "--reference" in err
    with pytest.raises(ConfigError, match="non-linear detector"):
        check_estimable([clipped_scan])
    assert main(["reconstruct", "--scan", clipped_scan, "--method", "fbp", "--out", str(tmp_path / "u.ome.zarr"),
                 "--uncertainty", "2", "--no-progress"]) == 2
    assert "--uncertainty cannot map" in capsys.readouterr().err


def test_one_bit_mri_consistency_gradient_is_the_adjoint_of_the_logistic_slope_on_sampled_parts():
    """The logistic MC's gradient on a complex masked range: ``Aᴴ g`` with
    ``g = −y σ(−y z/w)/(w · 2m)`` on each part of each sampled entry and 0 elsewhere (PyTorch's
    complex gradient ``∂L/∂Re + i ∂L/∂Im``), so nothing leaks from unsampled k-space."""
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps

    g = torch.Generator().manual_seed(5)
    shape = (2, 12, 10)
    mask = poisson_disc_mask(shape[1:], 2.0, calibration=4, generator=g)
    op = MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(3, shape)).to(torch.complex128)
    x = torch.complex(torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))
    y = Sign(op, 0.0).forward(x)
    record = {"model": "sign", "threshold": 0.0, "width": 0.2, "gradient": "zero"}
    x_hat = (0.3 * x.flip(-1)).requires_grad_(True)
    sampled = op.measurement_mask().expand(op.range_shape)
    m = int(sampled.sum())
    nonlinear_consistency(detector_model(record, op), x_hat, y, m).backward()
    z, bits = torch.view_as_real(op(x_hat.detach())), torch.view_as_real(y)
    slope = -bits * torch.sigmoid(-bits * z / 0.2) / (0.2 * 2 * m)
    slope = torch.where(sampled.unsqueeze(-1), slope, torch.zeros((), dtype=slope.dtype))
    torch.testing.assert_close(x_hat.grad, op.adjoint(torch.view_as_complex(slope.contiguous())), rtol=1e-10, atol=1e-14)
    # bits outside the mask carry nothing: changing them leaves the loss as it is
    y2 = y.clone()
    y2[~sampled] = 1 + 1j
    a = nonlinear_consistency(detector_model(record, op), x_hat.detach(), y, m)
    assert nonlinear_consistency(detector_model(record, op), x_hat.detach(), y2, m).item() == pytest.approx(a.item(), rel=1e-14)


def test_a_dithered_one_bit_record_gives_every_slab_its_own_threshold_in_mc_and_ei():
    """``simulate mri --one-bit-dither``: MC's logistic loss is taken about the slab's ``τ``
    (rebuilt from the record on the slab operator), and EI re-measures ``sign(A T x̂ − τ)``."""
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps

    g = torch.Generator().manual_seed(4)
    shape = (3, 12, 10)
    mask = poisson_disc_mask(shape[1:], 2.0, calibration=4, generator=g)
    maps = simulate_coil_maps(3, shape).to(torch.complex128)
    op = MultiCoilMRI(mask=mask, coil_maps=maps).to(torch.complex128)
    x = torch.complex(torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64))
    record = {"model": "sign", "threshold": 0.0, "dither": {"amplitude": 1.5, "seed": 9}, "width": 0.3,
              "gradient": "zero"}
    y = detector_model(record, op)(x)  # what the scan stores
    slab = MultiCoilMRI(mask=mask, coil_maps=maps[:, 1:3]).to(torch.complex128)
    tau = detector_model(record, slab).threshold
    assert tau.shape == (3, 1, 12, 10, 2) and torch.equal(tau, detector_model(record, op).threshold)
    y_slab = y[:, 1:3]
    x_hat = (0.5 * x[1:3]).requires_grad_(True)
    value = MeasurementConsistencyLoss(detector=record)(x_hat[None], y_slab[None], slab).total
    sampled = slab.measurement_mask().expand(slab.range_shape)
    z, bits = torch.view_as_real(slab(x_hat.detach())), torch.view_as_real(y_slab)
    terms = torch.nn.functional.softplus(-bits * (z - tau) / 0.3)[sampled]
    assert value.item() == pytest.approx(float(terms.sum() / (2 * int(sampled.sum()))), rel=1e-12)
    undithered = MeasurementConsistencyLoss(detector={**record, "dither": None})(x_hat[None], y_slab[None], slab).total
    assert abs(undithered.item() - value.item()) > 1e-3  # the dither is used, not dropped
    value.backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    # EI with the identity as the transform: the second pass sees the slab's dithered bits of x̂
    net = _Recorder().to(torch.float64)
    x_hat = x[1:3].clone()
    EquivariantImagingLoss(transform=lambda v: v, detector=record, seed=1)(x_hat, y_slab, slab, net)
    parts = torch.view_as_real(slab(x_hat))
    expected = torch.where(parts >= tau, 1.0, -1.0).to(parts.dtype) * sampled.unsqueeze(-1)
    torch.testing.assert_close(torch.view_as_real(net.seen[-1]), expected, rtol=0, atol=0)


def _clipped_data(level_quantile: float = 0.8, sigma: float = 0.05):
    op, x = _op(), _x(0)
    noisy = op(x) + sigma * torch.randn(op(x).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    level = float(noisy.quantile(level_quantile))
    return op, torch.clamp(noisy, max=level), {"model": "clip", "low": None, "high": level}, level


def test_sure_through_a_clip_detector_is_sure_on_the_passed_rays_and_the_bound_on_the_others():
    op, y, record, level = _clipped_data()
    sigma, model = 0.05, _Recorder()
    noise = GaussianNoise(sigma)
    x_hat = model(y, op)
    # no ray at the level: exactly the linear SURE (same probe)
    above = {"model": "clip", "low": None, "high": float(y.max()) + 1.0}
    lin = SureGaussianLoss(noise_model=noise, seed=4)(x_hat, y, op, model=model)
    same = SureGaussianLoss(noise_model=noise, detector=above, seed=4)(x_hat, y, op, model=model)
    assert same.total.item() == pytest.approx(lin.total.item(), rel=1e-12)
    # at the level: the residual is (A x̂ − y)² on the passed rays and (clamp(A x̂) − y)² on the clipped ones
    out = SureGaussianLoss(noise_model=noise, detector=record, seed=4)(x_hat, y, op, model=model)
    z, passed, m = op(x_hat), y < level, y.numel()
    assert 0.1 < 1 - passed.double().mean().item() < 0.3
    expected = (torch.where(passed, z - y, torch.clamp(z, max=level) - y).square().sum() / m).item()
    assert out.parts["sure.residual"].item() == pytest.approx(expected, rel=1e-12)
    noise_term = passed.double().mean().item() * sigma**2
    parts = out.parts["sure.residual"].item() - noise_term + out.parts["sure.divergence"].item()
    assert out.total.item() == pytest.approx(parts, rel=1e-12)
    # the probe stays off the clipped rays: the perturbed input equals y there
    perturbed = model.seen[-1]
    assert torch.equal(perturbed[~passed], y[~passed]) and not torch.equal(perturbed[passed], y[passed])
    # the divergence of f = c Aᵀ(·) with the probe on the passed rays b_P is 2σ²/m · c ‖Aᵀ b_P‖²;
    # its expectation is 2σ²/m · c tr(P A Aᵀ P), P the passed rays: the mean over 200 probes, to 5 %
    est = [SureGaussianLoss(noise_model=noise, detector=record, seed=k)(x_hat, y, op, model=model)
           .parts["sure.divergence"].item() for k in range(200)]
    gram = op(op.adjoint(torch.eye(m, dtype=torch.float64).reshape(m, *y.shape[1:])[:, None]))
    trace = sum(float(gram.reshape(m, m)[i, i]) for i in range(m) if passed.flatten()[i])
    assert sum(est) / len(est) == pytest.approx(2 * sigma**2 / m * float(model.c.detach()) * trace, rel=0.05)


def test_sure_takes_a_clip_detector_in_the_measurement_metric_only(clipped_scan):
    facts = scan_facts([clipped_scan])
    loss = build_loss(LossConfig(terms=[{"name": "sure"}, {"name": "ei", "transform": "rotate90"}]), facts, seed=0)
    assert "detector=clip" in repr(loss)
    with pytest.raises(ConfigError, match="metric: measurement"):
        build_loss(LossConfig(terms=[{"name": "sure", "metric": "image"}]), facts, seed=0)
    from dataclasses import replace

    one_bit = replace(facts, detector={"model": "sign", "threshold": 0.5, "width": 0.1})
    with pytest.raises(ConfigError, match="non-linear detector.*loss.detector: ignore"):
        build_loss(LossConfig(terms=[{"name": "sure"}]), one_bit, seed=0)
    with pytest.raises(ValueError, match="clip detector only"):
        SureGaussianLoss(0.1, detector={"model": "quantize", "bits": 2, "lo": 0, "hi": 1})
    with pytest.raises(ValueError, match="metric must be 'measurement'"):
        SureGaussianLoss(0.1, metric="image", detector={"model": "clip", "low": None, "high": 1.0})
