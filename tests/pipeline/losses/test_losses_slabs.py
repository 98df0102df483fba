"""Every loss runs a forward and backward pass on a 3D MRI slab and a 3D CT slab with each
reconstructor (backbone on Aᴴy / FBP / SENSE, tiled, unrolled gradient and CG)."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d import (
    GaussianNoise,
    MultiCoilMRI,
    PoissonGaussianNoise,
    PoissonNoise,
    Rotate90,
    poisson_disc_mask,
    shepp_logan_3d,
    simulate_coil_maps,
)
from pipeline.losses import (
    MeasurementConsistencyLoss,
    Noise2InverseLoss,
    SplittingLoss,
    SSDULoss,
    SupervisedLoss,
    SureGaussianLoss,
    SurePoissonLoss,
    equivariant_imaging,
    robust_ei,
)
from pipeline.models import ArtifactRemoval, TiledBackbone, UNet3D, UnrolledNetwork

SHAPE = (4, 16, 16)


def _mri():
    gen = torch.Generator().manual_seed(0)
    maps = simulate_coil_maps(3, SHAPE)
    mask = poisson_disc_mask(SHAPE[1:], 2, calibration=4, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    x = shepp_logan_3d(SHAPE).to(torch.complex64).unsqueeze(0)
    y = GaussianNoise(0.01).sample(op(x), generator=gen, mask=mask)
    return op, x, y


def _ct():
    from operators3d.ct import ParallelBeamCT

    gen = torch.Generator().manual_seed(0)
    angles = torch.arange(12, dtype=torch.float64) * (math.pi / 12)
    op = ParallelBeamCT(volume_shape=SHAPE, angles=angles)
    x = shepp_logan_3d(SHAPE).float().unsqueeze(0)
    y = PoissonNoise(0.02).sample(op(x), generator=gen)
    return op, x, y


def _unet(channels):
    return UNet3D(channels, channels, widths=[4, 8])


RECONSTRUCTORS = {
    "initial": lambda c, m: ArtifactRemoval(_unet(c), initial="adjoint" if m == "mri" else "fbp"),
    "classical": lambda c, m: ArtifactRemoval(_unet(c), initial="classical", sense_iters=4),
    "tiled": lambda c, m: ArtifactRemoval(
        TiledBackbone(_unet(c), tile_shape=(4, 8, 8), overlap=(0, 4, 4)),
        initial="adjoint" if m == "mri" else "fbp",
    ),
    "unrolled_gradient": lambda c, m: UnrolledNetwork(_unet(c), num_iters=2),
    "unrolled_cg": lambda c, m: UnrolledNetwork(
        _unet(c), num_iters=2, data_consistency="cg", shared=False, cg_iters=4,
        initial="adjoint" if m == "mri" else "fbp",
    ),
}

LOSSES = {
    "mri": {
        "mc": lambda: MeasurementConsistencyLoss(),
        "ei": lambda: equivariant_imaging(transform=Rotate90, seed=0),
        "rei": lambda: robust_ei(transform=Rotate90, noise_model=GaussianNoise(0.01), seed=0),
        "sure": lambda: SureGaussianLoss(0.01, seed=0),
        "split": lambda: SplittingLoss(seed=0),
        "ssdu": lambda: SSDULoss(seed=0),
        "ssdu_weighted": lambda: SSDULoss(seed=0, weighted=True, metric="mse"),
        "n2i": lambda: Noise2InverseLoss(3, target="measurement", seed=0),
        "supervised": lambda: SupervisedLoss(),
    },
    "ct": {
        "mc": lambda: MeasurementConsistencyLoss(),
        "ei": lambda: equivariant_imaging(transform=Rotate90, seed=0),
        "rei": lambda: robust_ei(transform=Rotate90, noise_model=PoissonNoise(0.02), seed=0),
        "sure": lambda: SureGaussianLoss(0.01, seed=0),
        "pure": lambda: SurePoissonLoss(noise_model=PoissonGaussianNoise(0.02, 0.01), seed=0),
        "split": lambda: SplittingLoss(seed=0),
        "n2i": lambda: Noise2InverseLoss(4, seed=0),
        "n2i_measurement": lambda: Noise2InverseLoss(3, target="measurement", seed=0),
        "supervised": lambda: SupervisedLoss(),
    },
}

CASES = [
    (modality, loss, recon)
    for modality in ("mri", "ct")
    for loss in LOSSES[modality]
    for recon in RECONSTRUCTORS
]


@pytest.fixture(scope="module")
def problems():
    return {"mri": _mri(), "ct": _ct()}


@pytest.mark.parametrize("modality,loss_name,recon_name", CASES)
def test_forward_backward(problems, modality, loss_name, recon_name):
    torch.manual_seed(0)
    op, x, y = problems[modality]
    channels = 2 if modality == "mri" else 1
    base = RECONSTRUCTORS[recon_name](channels, modality)
    loss = LOSSES[modality][loss_name]()
    model = loss.adapt_model(base).train()
    x_hat = model(y, op)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    out = loss(x_hat, y, op, model, reference=x)
    assert out.total.ndim == 0 and torch.isfinite(out.total)
    assert all(torch.isfinite(v) for v in out.parts.values())
    out.total.backward()
    grads = [p.grad for p in base.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(y, op).shape == x.shape


def test_cone_beam_ei_and_noise2inverse():
    from operators3d.ct import ConeBeamCT, min_det_shape

    shape = (4, 12, 12)
    angles = torch.arange(16, dtype=torch.float64) * (2 * math.pi / 16)
    geometry = dict(volume_shape=shape, angles=angles, src_dist=40.0, det_dist=20.0)
    op = ConeBeamCT(det_shape=min_det_shape(**geometry), **geometry)
    x = shepp_logan_3d(shape).float().unsqueeze(0)
    y = op(x)
    for loss in (equivariant_imaging(transform=Rotate90, seed=0), Noise2InverseLoss(4, seed=0)):
        base = ArtifactRemoval(_unet(1), initial="fbp")
        model = loss.adapt_model(base).train()
        out = loss(model(y, op), y, op, model)
        out.total.backward()
        assert torch.isfinite(out.total)
        assert any(float(p.grad.abs().max()) > 0 for p in base.parameters() if p.grad is not None)
