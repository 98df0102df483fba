"""Coil maps: simulated maps are normalised and smooth; ESPIRiT recovers them."""

from __future__ import annotations

import pytest
import torch

from operators3d.coils import estimate_coil_maps, simulate_coil_maps
from operators3d.fft import centered_fft
from operators3d.masks import calibration_region, poisson_disc_mask


def _phantom(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured ellipsoid with an inner blob, and its support."""
    d, h, w = shape
    z = (torch.arange(d) - d / 2) / (d / 2)
    y = (torch.arange(h) - h / 2) / (h / 2)
    x = (torch.arange(w) - w / 2) / (w / 2)
    z, y, x = torch.meshgrid(z, y, x, indexing="ij")
    support = (y / 0.7) ** 2 + (x / 0.55) ** 2 + (z / 1.5) ** 2 < 1
    texture = 1 + 0.5 * torch.sin(6 * y) * torch.cos(4 * x)
    blob = ((y - 0.2) / 0.2) ** 2 + ((x + 0.1) / 0.15) ** 2 < 1
    image = support * texture + 0.5 * blob
    return image.to(torch.complex64), support


@pytest.fixture(scope="module")
def scan():
    shape = (3, 64, 56)
    maps = simulate_coil_maps(8, shape)
    image, support = _phantom(shape)
    kspace = centered_fft(maps * image)  # fully sampled hybrid k-space, (C, D, kH, kW)
    return maps, image, support, kspace


# ----------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("shape", [(4, 32, 24), (33, 30)])
def test_simulated_maps_are_normalised(shape):
    maps = simulate_coil_maps(6, shape)
    assert maps.shape == (6, *shape) and maps.dtype == torch.complex64
    torch.testing.assert_close((maps.abs() ** 2).sum(0), torch.ones(shape), atol=1e-5, rtol=0)


def test_simulated_maps_are_smooth_and_distinct():
    maps = simulate_coil_maps(16, (48, 64, 64), dtype=torch.complex128)
    for dim in (-1, -2, -3):
        step = (maps.diff(dim=dim).abs()).max()
        assert step < 0.1
    # Coils differ: the normalised map matrix is far from rank one.
    flat = maps.reshape(16, -1)
    singular = torch.linalg.svdvals(flat)
    assert singular[1] > 0.2 * singular[0]


def test_simulated_maps_deterministic_and_seeded():
    fixed = simulate_coil_maps(12, (2, 16, 16))
    assert torch.equal(fixed, simulate_coil_maps(12, (2, 16, 16)))
    a = simulate_coil_maps(12, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    b = simulate_coil_maps(12, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    c = simulate_coil_maps(12, (2, 16, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close((c.abs() ** 2).sum(0), torch.ones(2, 16, 16), atol=1e-5, rtol=0)


def test_simulate_rejects_bad_input():
    with pytest.raises(ValueError, match="simulate_coil_maps"):
        simulate_coil_maps(0, (4, 8, 8))
    with pytest.raises(ValueError, match="simulate_coil_maps"):
        simulate_coil_maps(4, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="simulate_coil_maps"):
        simulate_coil_maps(4, (4, 8, 8), dtype=torch.float32)


# ----------------------------------------------------------------------------- ESPIRiT
def test_espirit_recovers_the_maps(scan):
    maps, image, support, kspace = scan
    est = estimate_coil_maps(kspace, calibration=24)
    assert est.shape == maps.shape and est.dtype == kspace.dtype

    # Equal up to a per-pixel phase: |⟨S_est, S_true⟩| ≈ 1 over the object.
    agreement = (est.conj() * maps).sum(0).abs()[support]
    assert agreement.median() > 0.99
    assert torch.quantile(agreement, 0.05) > 0.95

    # Projecting the true coil images onto the estimated maps keeps them.
    coil_images = maps * image
    projected = est * (est.conj() * coil_images).sum(0, keepdim=True)
    assert torch.linalg.vector_norm(projected - coil_images) < 0.05 * torch.linalg.vector_norm(
        coil_images
    )


def test_espirit_maps_are_normalised_cropped_and_smooth(scan):
    maps, _, support, kspace = scan
    est = estimate_coil_maps(kspace, calibration=24)
    power = (est.abs() ** 2).sum(0)
    nonzero = power > 0
    torch.testing.assert_close(power[nonzero], torch.ones_like(power[nonzero]), atol=1e-4, rtol=0)
    assert bool(nonzero[support].all())  # the object is kept
    assert not bool(nonzero.all())  # the empty corners are cropped
    # Phase fixed to a virtual body coil: neighbouring pixels inside the object agree.
    inner = support[:, 1:, :] & support[:, :-1, :]
    step = (est[:, :, 1:, :] - est[:, :, :-1, :]).abs().sum(0)[inner]
    assert step.max() < 0.2


def test_espirit_uses_only_the_calibration_block(scan):
    maps, _, _, kspace = scan
    full = estimate_coil_maps(kspace, calibration=24)
    mask = poisson_disc_mask(kspace.shape[-2:], 4, calibration=24, generator=torch.Generator())
    undersampled = estimate_coil_maps(kspace * mask, calibration=24)
    torch.testing.assert_close(undersampled, full)
    block = kspace[(..., *calibration_region(kspace.shape[-2:], 24))]
    from_block = estimate_coil_maps(block, shape=kspace.shape[-2:])
    torch.testing.assert_close(from_block, full)
    chunked = estimate_coil_maps(kspace, calibration=24, chunk_size=1)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=0)


def test_espirit_single_slice_and_coarse_grid(scan):
    maps, _, support, kspace = scan
    single = estimate_coil_maps(kspace[:, 1], calibration=(24, 20))
    assert single.shape == maps[:, 1].shape
    agreement = (single.conj() * maps[:, 1]).sum(0).abs()[support[1]]
    assert agreement.median() > 0.99
    # Eigenproblems on a 24-point grid, interpolated, match the per-pixel solution.
    coarse = estimate_coil_maps(kspace, calibration=24, eigen_grid=24)
    exact = estimate_coil_maps(kspace, calibration=24, eigen_grid=None)
    both = (coarse.abs().sum(0) > 0) & (exact.abs().sum(0) > 0) & support
    agreement = (coarse.conj() * exact).sum(0).abs()[both]
    assert agreement.median() > 0.999


def test_estimate_rejects_bad_input(scan):
    _, _, _, kspace = scan
    with pytest.raises(TypeError, match="estimate_coil_maps"):
        estimate_coil_maps(kspace.real, calibration=24)
    with pytest.raises(ValueError, match="estimate_coil_maps: give shape"):
        estimate_coil_maps(kspace)
    with pytest.raises(ValueError, match="kernel_size"):
        estimate_coil_maps(kspace, calibration=4, kernel_size=6)
    with pytest.raises(ValueError, match="method"):
        estimate_coil_maps(kspace, calibration=24, method="walsh")
    with pytest.raises(ValueError, match="calibration"):
        estimate_coil_maps(kspace, calibration=100)
