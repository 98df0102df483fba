"""Reference-free error estimates (pipeline/estimate.py): held-out splits, the
cross-validation statistic's noise debiasing, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d import GaussianNoise, MultiCoilMRI, ParallelBeamCT, TransmissionNoise, poisson_disc_mask
from operators3d.coils import simulate_coil_maps
from pipeline.estimate import cross_validation, estimate_error, holdout_splits


def _mri(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = poisson_disc_mask((24, 24), 3.0, calibration=(6, 6), generator=g)
    op = MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(4, (2, 24, 24), dtype=torch.complex128))
    x = torch.randn(2, 24, 24, generator=g, dtype=torch.float64).to(torch.complex128)
    return op, x, GaussianNoise(0.05)


def _ct():
    op = ParallelBeamCT(volume_shape=(2, 20, 20), angles=torch.arange(24) * (math.pi / 24)).to(torch.float64)
    x = torch.zeros(2, 20, 20, dtype=torch.float64)
    x[:, 5:15, 6:14] = 0.02
    return op, x, TransmissionNoise(1e4)


def test_mri_splits_hold_out_sampled_positions_outside_the_centre():
    op, x, _ = _mri()
    y = op(x)
    splits = holdout_splits(y, op, fraction=0.2, folds=3, generator=torch.Generator().manual_seed(1))
    mask = op.mask.bool()
    for s in splits:
        held = s.held[0, 0]  # the same positions for every coil and slice
        assert torch.equal(s.held, torch.broadcast_to(held, y.shape))
        assert held.any() and not (held & ~mask).any()
        assert not held[9:15, 9:15].any()  # the 6×6 fully sampled centre is never held out
        assert torch.equal(s.op.mask.bool(), mask & ~held)
        assert not (s.y[s.held]).abs().sum()  # the rest's data has nothing at the held positions
    assert not torch.equal(splits[0].held, splits[1].held)


def test_ct_splits_hold_out_whole_views():
    op, x, _ = _ct()
    y = op(x)
    (s,) = holdout_splits(y, op, fraction=0.25, folds=1, generator=torch.Generator().manual_seed(2))
    held_views = s.held[0, :, 0]
    assert int(held_views.sum()) == 6 and torch.equal(s.held, torch.broadcast_to(s.held[:, :, :1], y.shape))
    assert s.y.shape[-2] == 18 and torch.allclose(s.op(x), y[:, ~held_views])
    with pytest.raises(ValueError, match="fraction"):
        holdout_splits(y, op, fraction=1.0, folds=1, generator=torch.Generator())


@pytest.mark.parametrize("make", [_mri, _ct])
def test_cross_validation_is_the_held_out_error_once_the_noise_is_removed(make):
    # A reconstructor that ignores its data and returns x + δ: the statistic's expectation over the
    # noise is ‖A_H δ‖²/|H| of each split (MRI), ⟨A_H δ, M A_H δ⟩·A/(|H| n) in FBP's ramp metric M
    # (parallel-beam CT), exactly; with δ = 0 it is 0 (the noise energy removed).
    from pipeline.models.physics import ImageMetric

    op, x, noise = make()
    metric = None if isinstance(op, MultiCoilMRI) else ImageMetric(op)
    g = torch.Generator().manual_seed(5)
    delta = x.abs().max() * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    for err, scale in ((delta, 1.0), (torch.zeros_like(x), 0.0)):
        f = lambda y, sub, e=err: x + e  # noqa: E731
        values, expected = [], []
        for trial in range(40):
            y = noise.sample(op(x), generator=g, mask=op.mask.bool() if isinstance(op, MultiCoilMRI) else None)
            values += cross_validation(y, op, noise, f, fraction=0.2, folds=1,
                                       generator=torch.Generator().manual_seed(trial))
            (s,) = holdout_splits(y, op, fraction=0.2, folds=1, generator=torch.Generator().manual_seed(trial))
            if metric is None:
                expected.append(float(op(err)[s.held].abs().square().sum()) / int(s.held.sum()))
            else:
                r = op(err) * s.held
                views, held = y.shape[-2], int(s.held[0, :, 0].sum())
                expected.append(float((r * metric(r)).sum()) * views / held / x.numel())
        mean, target = sum(values) / len(values), sum(expected) / len(expected)
        per_entry = float(noise.variance(op(x).real if not op(x).is_complex() else op(x)).mean())
        if metric is not None:  # the noise energy per voxel in the metric
            per_entry *= metric.diagonal * y[0].numel() / x[0].numel()
        assert abs(mean - target) < 0.1 * per_entry + 0.05 * target  # noise removed: ~0 for δ = 0
        if scale:
            assert target > 5 * per_entry  # the test can tell an error from the noise


def test_estimate_is_reproducible_with_a_seed_and_refuses_one_draw():
    from operators3d import sense_cg

    op, x, noise = _mri()
    y = noise.sample(op(x), generator=torch.Generator().manual_seed(0), mask=op.mask.bool())
    f = lambda y, sub: sense_cg(y, sub, l2_weight=0.01, num_iters=5)  # noqa: E731
    a = estimate_error(y, op, noise, f, draws=2, folds=2, seed=3)
    b = estimate_error(y, op, noise, f, draws=2, folds=2, seed=3)
    c = estimate_error(y, op, noise, f, draws=2, folds=2, seed=4)
    assert a.to_dict() == b.to_dict() and a.mse != c.mse
    assert a.mse_low < a.mse < a.mse_high and a.mse > 0
    ps = a.psnr(1.0)
    assert ps["estimated_psnr_low"] < ps["estimated_psnr"] < ps["estimated_psnr_high"]
    with pytest.raises(ValueError, match="draws"):
        estimate_error(y, op, noise, f, draws=1)


def _blob_slices(n: int = 48, depth: int = 2) -> torch.Tensor:
    """Smooth blobs with sharp-edged discs: power at every frequency, rotation-like statistics."""
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n, dtype=torch.float64),
                            torch.linspace(-1, 1, n, dtype=torch.float64), indexing="ij")
    x = torch.zeros(depth, n, n, dtype=torch.float64)
    for _ in range(12):
        cy, cx, r = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1.2, 1.2, 0.25])
                     + torch.tensor([-0.6, -0.6, 0.05]))
        x += 0.01 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).to(torch.float64)
    return x * (xx ** 2 + yy ** 2 < 0.9)


def _radial_power(x: torch.Tensor, band: tuple[float, float]) -> float:
    k = torch.sqrt(torch.fft.fftfreq(x.shape[-2])[:, None] ** 2 + torch.fft.fftfreq(x.shape[-1])[None, :] ** 2)
    sel = (k >= band[0]) & (k < band[1])
    return float(torch.fft.fft2(x).abs().square()[..., sel].mean())


def test_matched_pilot_gives_back_the_detail_the_data_carry():
    from pipeline.estimate import matched_pilot, pilot_estimate

    n = 48
    op = ParallelBeamCT(volume_shape=(2, n, n), angles=torch.arange(90) * (math.pi / 90)).to(torch.float64)
    x = _blob_slices(n)
    y = op(x)
    quiet = GaussianNoise(1e-9)
    # a blurred estimate (the detail a regularised reconstruction loses): the pilot's power in the
    # band comes back to within 25 % of the object's, from 20x below
    k = torch.sqrt(torch.fft.fftfreq(n)[:, None] ** 2 + torch.fft.fftfreq(n)[None, :] ** 2)
    blurred = torch.fft.ifft2(torch.fft.fft2(x) * torch.exp(-((k / 0.1) ** 2))).real
    pilot = matched_pilot(y, op, quiet, blurred)
    band = (0.1, 0.2)
    assert _radial_power(blurred, band) < 0.05 * _radial_power(x, band)
    assert abs(_radial_power(pilot, band) / _radial_power(x, band) - 1) < 0.25
    # the object itself is (nearly) a fixed point, and the mean of every slice is kept
    fixed = matched_pilot(y, op, quiet, x)
    assert float((fixed - x).norm() / x.norm()) < 0.01
    assert torch.allclose(pilot.mean(dim=(-2, -1)), blurred.mean(dim=(-2, -1)), rtol=1e-6, atol=1e-12)
    # the noise power is taken off the measured spectrum: noise adds no detail to the pilot (at
    # this level, counting the noise as detail would give the band 2.4x the object's power)
    noise = GaussianNoise(float(y.abs().max()) * 0.1)
    noisy = noise.sample(y, generator=torch.Generator().manual_seed(0))
    assert abs(_radial_power(matched_pilot(noisy, op, noise, blurred), band) / _radial_power(x, band) - 1) < 0.35
    # other operators: the undersmoothed pilot
    mop, mx, mnoise = _mri()
    my = mop(mx)
    assert torch.equal(matched_pilot(my, mop, mnoise, mx), pilot_estimate(my, mop))
