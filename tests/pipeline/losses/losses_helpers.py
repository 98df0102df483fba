"""Tiny 3D MRI and CT problems and fixed linear "networks" for the loss tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from operators3d import (
    GaussianNoise,
    LinearOperator,
    MultiCoilMRI,
    poisson_disc_mask,
    shepp_logan_3d,
    simulate_coil_maps,
)


class LinearAdjointNet(nn.Module):
    """A fixed linear reconstructor ``f(y) = c · Aᴴ y`` (plus a smoothing along W)."""

    def __init__(self, scale: float = 0.7, smooth: float = 0.25) -> None:
        super().__init__()
        self.scale = scale
        self.smooth = smooth
        self.weight = nn.Parameter(torch.tensor(1.0))  # lets backward reach a leaf

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        x = op.adjoint(y) * self.scale
        x = x + self.smooth * torch.roll(x, 1, dims=-1)
        return x * self.weight


class IdentityNet(nn.Module):
    """``f(y) = Aᴴ y`` (exact for a unitary or identity operator)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(1.0))

    def forward(self, y: torch.Tensor, op: LinearOperator) -> torch.Tensor:
        return op.adjoint(y) * self.weight


@pytest.fixture
def mri_problem():
    """(op, x, y): 3 coils, (4, 12, 12) volume, hybrid mask, complex128, batch 2."""
    gen = torch.Generator().manual_seed(0)
    shape = (4, 12, 12)
    maps = simulate_coil_maps(3, shape).to(torch.complex128)
    mask = poisson_disc_mask((12, 12), 2, calibration=4, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    x = torch.stack([shepp_logan_3d(shape), shepp_logan_3d(shape).flip(-1)]).to(torch.complex128)
    y = GaussianNoise(0.02).sample(op(x), generator=gen, mask=mask)
    return op, x, y


@pytest.fixture
def ct_problem():
    """(op, x, y): parallel beam, (4, 12, 12) volume, 12 angles, float64, batch 1."""
    from operators3d.ct import ParallelBeamCT

    gen = torch.Generator().manual_seed(0)
    shape = (4, 12, 12)
    angles = torch.arange(12, dtype=torch.float64) * (math.pi / 12)
    op = ParallelBeamCT(volume_shape=shape, angles=angles).to(torch.float64)
    x = shepp_logan_3d(shape).to(torch.float64).unsqueeze(0)
    y = GaussianNoise(0.05).sample(op(x), generator=gen)
    return op, x, y
