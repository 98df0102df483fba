"""Undersampling masks: acceleration, calibration, determinism, density, errors."""

from __future__ import annotations

import pytest
import torch

from operators3d.masks import (
    acceleration_of,
    calibration_region,
    gaussian_mask,
    poisson_disc_mask,
)

GRIDS = [((32, 28), 8), ((64, 64), 16), ((128, 96), 24), ((256, 256), 24)]
ACCELERATIONS = [2, 4, 6, 8]
MASKS = [poisson_disc_mask, gaussian_mask]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _radius(shape: tuple[int, int]) -> torch.Tensor:
    h, w = shape
    ky = (torch.arange(h) - h // 2) * (2.0 / h)
    kz = (torch.arange(w) - w // 2) * (2.0 / w)
    return torch.sqrt(ky[:, None] ** 2 + kz[None, :] ** 2)


@pytest.mark.parametrize("make", MASKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("grid, calib", GRIDS, ids=lambda v: str(v))
@pytest.mark.parametrize("acc", ACCELERATIONS)
def test_acceleration_and_calibration(make, grid, calib, acc):
    mask = make(grid, acc, calibration=calib, generator=_seeded(acc))
    assert mask.shape == grid and mask.dtype == torch.bool
    assert abs(acceleration_of(mask) - acc) <= 0.05 * acc
    assert bool(mask[calibration_region(grid, calib)].all())


@pytest.mark.parametrize("acc", [3, 5])
def test_gaussian_count_is_exact(acc):
    grid = (64, 48)
    mask = gaussian_mask(grid, acc, calibration=(10, 6), generator=_seeded(0))
    assert int(mask.sum()) == round(64 * 48 / acc)


@pytest.mark.parametrize("make", MASKS, ids=lambda f: f.__name__)
def test_same_seed_same_mask_other_seed_other_mask(make):
    a = make((64, 64), 4, calibration=12, generator=_seeded(1))
    b = make((64, 64), 4, calibration=12, generator=_seeded(1))
    c = make((64, 64), 4, calibration=12, generator=_seeded(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("make", MASKS, ids=lambda f: f.__name__)
def test_global_generator_and_no_calibration(make):
    mask = make((40, 36), 3, calibration=0)
    assert abs(acceleration_of(mask) - 3) <= 0.15


@pytest.mark.parametrize("make", MASKS, ids=lambda f: f.__name__)
def test_density_decreases_away_from_centre(make):
    grid = (128, 128)
    mask = make(grid, 6, calibration=16, generator=_seeded(3))
    rho = _radius(grid)
    outside_calib = torch.ones(grid, dtype=torch.bool)
    outside_calib[calibration_region(grid, 16)] = False
    inner = mask[(rho > 0.2) & (rho < 0.5) & outside_calib].float().mean()
    outer = mask[(rho > 0.8) & (rho < 1.1)].float().mean()
    assert inner > 1.3 * outer


def test_poisson_points_keep_their_distance():
    # At acceleration 8 the radius scale exceeds one pixel, so no two sampled points outside
    # the calibration block are lattice neighbours.
    grid = (128, 96)
    mask = poisson_disc_mask(grid, 8, calibration=0, generator=_seeded(4))
    assert not bool((mask[1:, :] & mask[:-1, :]).any())
    assert not bool((mask[:, 1:] & mask[:, :-1]).any())


@pytest.mark.parametrize("acc", [2.5, 3, 4, 5, 7])
def test_poisson_uniform_density_power_zero(acc):
    grid = (64, 64)
    mask = poisson_disc_mask(grid, acc, calibration=8, density_power=0, generator=_seeded(5))
    assert abs(acceleration_of(mask) - acc) <= 0.05 * acc


def test_acceleration_one_samples_everything():
    for make in MASKS:
        assert bool(make((16, 12), 1, calibration=4, generator=_seeded(0)).all())


def test_calibration_region_is_centred():
    rows, cols = calibration_region((32, 28), (8, 7))
    assert (rows.start, rows.stop) == (12, 20)
    assert (cols.start, cols.stop) == (11, 18)
    # DC (N // 2) sits at index c // 2 of the block.
    assert 32 // 2 - rows.start == 8 // 2 and 28 // 2 - cols.start == 7 // 2
    assert calibration_region((5, 5), 0) == (slice(2, 2), slice(2, 2))


def test_acceleration_of():
    mask = torch.zeros(4, 6, dtype=torch.bool)
    assert acceleration_of(mask) == float("inf")
    mask[0, :3] = True
    assert acceleration_of(mask) == 8.0


@pytest.mark.parametrize("make", MASKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(32, 28), acceleration=0.5, calibration=4), "acceleration must be"),
        (dict(shape=(32, 28), acceleration=4, calibration=(40, 4)), "must fit in the grid"),
        (dict(shape=(32, 28), acceleration=8, calibration=12), "alone takes 144 samples"),
        (dict(shape=(8, 32, 28), acceleration=4, calibration=4), "must be 2D"),
        (dict(shape=(32, 28), acceleration=4, calibration=(4, 4, 4)), "pair"),
    ],
)
def test_bad_requests_raise(make, kwargs, message):
    with pytest.raises(ValueError, match=make.__name__) as info:
        kwargs = dict(kwargs)
        make(kwargs.pop("shape"), kwargs.pop("acceleration"), **kwargs)
    assert message in str(info.value)
