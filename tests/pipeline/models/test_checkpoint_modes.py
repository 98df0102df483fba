"""UNet3D checkpoint modes and memory-light backward: same values and gradients as the plain
network, as a backbone in a two-pass EI step too; the in-place activation backward is exact
and stays differentiable twice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from operators3d import MultiCoilMRI, Rotate90, poisson_disc_mask, simulate_coil_maps
from pipeline.losses import equivariant_imaging
from pipeline.models import ArtifactRemoval, UNet3D
from pipeline.models import unet as unet_module

MODES = ["level", "network"]


def _pair(mode: str, **kw) -> tuple[UNet3D, UNet3D]:
    torch.manual_seed(0)
    plain = UNet3D(2, 2, **kw)
    other = UNet3D(2, 2, checkpoint=mode, **kw)
    other.load_state_dict(plain.state_dict())
    return plain, other


def _grads(net: UNet3D, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = net(x)
    return (out, *torch.autograd.grad(out, [x, *net.parameters()], g))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("widths,activation,norm", [
    ([3, 4], "relu", "none"),
    ([3, 4, 5], "leaky_relu", "none"),
    ([3, 4], "silu", "none"),
    ([4, 4], "relu", "group"),
])
def test_checkpoint_modes_equal_plain_bitwise(mode, widths, activation, norm):
    plain, other = _pair(mode, widths=widths, activation=activation, norm=norm)
    x = torch.randn(1, 2, 5, 10, 12)  # odd depth: padded; unequal sides: axes reordered
    g = torch.randn(1, 2, 5, 10, 12)
    for u, v in zip(_grads(plain, x, g), _grads(other, x, g)):
        assert torch.equal(u, v)  # the same kernels in the same order: no rounding difference


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_modes_in_a_two_pass_ei_step(mode):
    shape = (4, 12, 12)
    gen = torch.Generator().manual_seed(0)
    mask = poisson_disc_mask(shape[1:], 2, calibration=4, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(3, shape))
    y = op(torch.randn(shape, dtype=torch.complex64, generator=gen)).unsqueeze(0)
    results = []
    for net in _pair(mode, widths=[4, 8]):
        model = ArtifactRemoval(net)
        loss = equivariant_imaging(transform=Rotate90, seed=0)
        out = loss(model(y, op), y, op, model)
        grads = torch.autograd.grad(out.total, list(model.parameters()))
        results.append((out.total.detach(), *grads))
    for u, v in zip(*results):
        assert torch.equal(u, v)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("mode", ["none", *MODES])
def test_in_place_activation_backward_matches_torch(monkeypatch, activation, mode):
    # Against the same network with torch's activations (whose backward allocates).
    torch.manual_seed(0)
    net = UNet3D(2, 2, widths=[3, 4], activation=activation, checkpoint=mode)
    x = torch.randn(1, 2, 4, 10, 12)
    g = torch.randn(1, 2, 4, 10, 12)
    g_copy = g.clone()
    ours = _grads(net, x, g)
    assert torch.equal(g, g_copy)  # the caller's gradient is not the one overwritten
    monkeypatch.setattr(unet_module._RectifyInPlace, "apply",
                        lambda h, s: F.leaky_relu(h, s) if s else F.relu(h))
    reference = _grads(net, x, g)
    for u, v in zip(ours, reference):
        assert torch.equal(u, v)


@pytest.mark.parametrize("mode", ["none", *MODES])
def test_gradcheck_and_double_backward(mode):
    torch.manual_seed(0)
    net = UNet3D(1, 1, widths=[2, 2], activation="leaky_relu", checkpoint=mode).double()
    x = torch.randn(1, 1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,))
    assert torch.autograd.gradgradcheck(net, (x,))


def test_checkpoint_mode_errors():
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        UNet3D(1, 1, checkpoint="block")
    assert UNet3D(1, 1, checkpoint=None).checkpoint == "none"
    assert "checkpoint=network" in repr(UNet3D(1, 1, checkpoint="network"))
