"""A user's own operator works with every loss that applies, through the operator capabilities.

``PixelSampling`` (inpainting: keep the voxels of a fixed mask) is written here the way a user
would write one: ``_forward``/``_adjoint`` plus the capabilities its physics changes
(``measurement_mask``, a faster ``restrict_measurements``, an exact ``_lipschitz``). Every loss
must then give exactly what it gives for the library's equivalent ``M ∘ I``
(:class:`~operators3d.MaskedOperator` of an :class:`~operators3d.Identity`).
"""

from __future__ import annotations

import pytest
import torch
from losses_helpers import LinearAdjointNet

from operators3d import (
    GaussianNoise,
    Identity,
    LinearOperator,
    MaskedOperator,
    PoissonNoise,
    Rotate90,
    shepp_logan_3d,
)
from operators3d.testing import assert_adjoint
from pipeline import losses

SHAPE = (4, 8, 8)


class PixelSampling(LinearOperator):
    """Inpainting: ``y = m ⊙ x`` for a fixed 0/1 voxel mask; unsampled voxels are not measured."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape, mask.shape)
        self.register_buffer("mask", mask.bool())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask

    def measurement_mask(self) -> torch.Tensor:
        return self.mask

    def restrict_measurements(self, mask: torch.Tensor) -> LinearOperator:
        if mask.dtype == torch.bool and tuple(mask.shape) == self.range_shape:
            return PixelSampling(self.mask & mask)
        return super().restrict_measurements(mask)

    def _lipschitz(self) -> float:
        return 1.0


def _problem(noise: str = "gaussian"):
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(SHAPE, generator=gen) < 0.6
    x = torch.stack([shepp_logan_3d(SHAPE), shepp_logan_3d(SHAPE).flip(-1)]).to(torch.float64) + 0.1
    op = PixelSampling(mask)
    reference = MaskedOperator(Identity(SHAPE), mask)
    if noise == "poisson":
        y = PoissonNoise(0.05).sample(op(x), generator=gen)
    else:
        y = GaussianNoise(0.05).sample(op(x), generator=gen) * mask
    return op, reference, x, y


def _value(loss_factory, op, y):
    """The loss, its parts and the network's gradient for ``op`` (a fresh, seeded loss)."""
    loss = loss_factory()
    model = loss.adapt_model(LinearAdjointNet().double())
    model.train()
    x_hat = model(y, op)
    out = loss(x_hat, y, op, model)
    out.total.backward()
    net = getattr(model, "model", model)
    return out, net.weight.grad.clone()


LOSSES = {
    "mc": lambda: losses.MeasurementConsistencyLoss(),
    "ei": lambda: losses.equivariant_imaging(transform=Rotate90, seed=0),
    "robust_ei": lambda: losses.robust_ei(transform=Rotate90, noise_model=GaussianNoise(0.05), seed=0),
    "sure": lambda: losses.SureGaussianLoss(0.05, seed=0),
    "split": lambda: losses.SplittingLoss(0.4, seed=0),
    "n2i_measurement": lambda: losses.Noise2InverseLoss(3, target="measurement", seed=0),
    "n2i_reconstruction": lambda: losses.Noise2InverseLoss(3, seed=0),
}


def test_the_custom_operator_is_a_linear_operator_with_its_capabilities():
    op, reference, _, y = _problem()
    assert_adjoint(op.double(), rtol=1e-12)
    assert op.kind is None and not op.is_ct
    assert op.kspace_mask() is None
    assert op.num_measured(y) == reference.num_measured(y) == 2 * int(op.mask.sum())
    assert op.lipschitz() == 1.0
    restricted = op.restrict_measurements(torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)) < 0.5)
    assert isinstance(restricted, PixelSampling)  # its own, faster restriction


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_the_same_for_the_custom_operator_as_for_the_library_one(name):
    op, reference, _, y = _problem()
    out, grad = _value(LOSSES[name], op, y)
    ref_out, ref_grad = _value(LOSSES[name], reference, y)
    assert torch.isfinite(out.total)
    assert out.parts.keys() == ref_out.parts.keys()
    for key in out.parts:
        assert torch.allclose(out.parts[key], ref_out.parts[key], rtol=1e-12, atol=1e-14), key
    assert torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_poisson_sure_and_the_measurement_mean_count_only_measured_voxels():
    op, reference, x, y = _problem("poisson")
    out, _ = _value(lambda: losses.SurePoissonLoss(gain=0.05, seed=0), op, y)
    ref_out, _ = _value(lambda: losses.SurePoissonLoss(gain=0.05, seed=0), reference, y)
    assert torch.allclose(out.total, ref_out.total, rtol=1e-12)
    mc = losses.MeasurementConsistencyLoss()(x, y, op).total
    by_hand = ((op(x) - y) ** 2).sum() / (2 * op.mask.sum())
    assert torch.allclose(mc, by_hand, rtol=1e-12)


def test_losses_that_need_another_capability_say_which():
    op, _, _, y = _problem()
    ssdu = losses.SSDULoss(seed=0)
    model = ssdu.adapt_model(LinearAdjointNet().double())
    with pytest.raises(TypeError, match="kspace_mask"):
        model(y, op)
    with pytest.raises(NotImplementedError, match="restrict_angles"):
        op.restrict_angles([0, 1])


def test_the_default_lipschitz_is_the_power_method():
    class Plain(PixelSampling):
        _lipschitz = LinearOperator._lipschitz

    op = Plain(torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)) < 0.5)
    assert op.lipschitz() == pytest.approx(1.0, rel=1e-3)
