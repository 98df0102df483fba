"""Classical baseline: SENSE by CG beats zero-filling; ESPIRiT maps give nearly the same SENSE."""

import pytest
import torch

from operators3d import (
    GaussianNoise,
    MultiCoilMRI,
    estimate_coil_maps,
    poisson_disc_mask,
    sense_cg,
    shepp_logan_3d,
    simulate_coil_maps,
)
from pipeline.metrics import nmse

SHAPE = (4, 64, 56)
CAL = 16


@pytest.fixture(scope="module")
def scan():
    gen = torch.Generator().manual_seed(0)
    x = shepp_logan_3d(SHAPE).to(torch.complex128)
    maps = simulate_coil_maps(8, SHAPE, dtype=torch.complex128)
    mask = poisson_disc_mask(SHAPE[1:], 4, calibration=CAL, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    clean = op(x)
    y = GaussianNoise(1e-3 * float(clean.abs().max())).sample(clean, generator=gen, mask=mask)
    return x, maps, mask, op, y


def test_sense_at_4x_reduces_error_of_zero_filled(scan):
    x, _, _, op, y = scan
    zero_filled = op.adjoint(y)
    sense = sense_cg(y, op, num_iters=30)
    support = x.abs() > 0
    err_zf, err_sense = nmse(zero_filled, x, mask=support), nmse(sense, x, mask=support)
    assert err_sense < 0.5 * err_zf, (err_sense, err_zf)


def test_sense_without_noise_recovers_the_volume(scan):
    x, _, _, op, _ = scan
    sense = sense_cg(op(x), op, num_iters=200, tol=1e-10)
    assert nmse(sense, x) < 1e-3


def test_sense_with_espirit_maps_is_close_to_true_maps(scan):
    x, maps, mask, op, y = scan
    est = estimate_coil_maps(y, calibration=CAL)
    assert est.shape == maps.shape
    op_est = MultiCoilMRI(mask=mask, coil_maps=est.to(torch.complex128))
    true_sense = sense_cg(y, op, num_iters=30)
    est_sense = sense_cg(y, op_est, num_iters=30)
    support = x.abs() > 0
    # ESPIRiT maps carry their own phase: compare magnitudes inside the object.
    err_true, err_est = nmse(true_sense, x, mask=support), nmse(est_sense, x, mask=support)
    assert err_est < 1.5 * err_true + 2e-3, (err_est, err_true)
    assert nmse(est_sense, true_sense, mask=support) < 0.02


def test_tikhonov_weight_shrinks_the_solution(scan):
    _, _, _, op, y = scan
    plain = sense_cg(y, op, num_iters=20)
    damped = sense_cg(y, op, num_iters=20, l2_weight=1.0)
    assert damped.norm() < plain.norm()
    with pytest.raises(ValueError, match="l2_weight must be >= 0"):
        sense_cg(y, op, l2_weight=-1.0)
