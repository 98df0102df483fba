"""UNet3D: receptive field, shapes, axis reordering, level checkpointing, errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import UNet3D, unet_receptive_radius


def _support(net: UNet3D, shape, centre) -> tuple[int, int]:
    """Extent (left, right) along W of the input voxels that output ``centre`` depends on."""
    x = torch.randn((1, net.in_channels) + tuple(shape), dtype=torch.float64, requires_grad=True)
    out = net(x)
    out[(0, 0) + tuple(centre)].backward()
    cols = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 2, 3)) > 0).reshape(-1)
    return centre[-1] - int(cols.min()), int(cols.max()) - centre[-1]


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_receptive_radius_is_tight(levels):
    torch.manual_seed(0)
    net = UNet3D(1, 1, widths=[2] * levels, residual=False, activation="leaky_relu").double()
    r = net.receptive_radius
    assert r == unet_receptive_radius(levels) == {1: 2, 2: 9, 3: 23}[levels]
    f = net.size_multiple
    width = 2 * r + 4 * f
    reach = 0
    for c in range(width // 2 - f, width // 2 + f):  # every alignment of the pooling grid
        left, right = _support(net, (f, f, width), (0, 0, c))
        assert left <= r and right <= r
        reach = max(reach, left, right)
    assert reach == r


def test_shapes_odd_sizes_and_residual():
    torch.manual_seed(0)
    net = UNet3D(2, 2, widths=[3, 4, 5]).double()
    x = torch.randn(2, 2, 5, 7, 9, dtype=torch.float64)
    assert net(x).shape == x.shape
    with torch.no_grad():
        for p in net.head.parameters():
            p.zero_()
    assert torch.equal(net(x), x)  # residual with a zero head is the identity
    assert UNet3D(2, 3, widths=[4], residual=False)(x.float()).shape == (2, 3, 5, 7, 9)


def test_axis_reordering_is_exact():
    torch.manual_seed(0)
    net = UNet3D(2, 2, widths=[3, 4]).double()
    x = torch.randn(1, 2, 4, 10, 12, dtype=torch.float64)
    a = net(x)
    net.reorder_axes = False
    b = net(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_level_checkpointing_matches_plain():
    torch.manual_seed(0)
    plain = UNet3D(2, 2, widths=[3, 4], norm="batch").double()
    ckpt = UNet3D(2, 2, widths=[3, 4], norm="batch", checkpoint="level").double()
    ckpt.load_state_dict(plain.state_dict())
    plain.eval(), ckpt.eval()
    x = torch.randn(1, 2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 4, 8, 8, dtype=torch.float64)
    a, b = plain(x), ckpt(x)
    assert torch.allclose(a, b, atol=1e-13)
    ga = torch.autograd.grad(a, [x, *plain.parameters()], g)
    gb = torch.autograd.grad(b, [x, *ckpt.parameters()], g)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-12)


def test_norms_and_receptive_radius():
    assert UNet3D(1, 1, widths=[2, 2], norm="instance").receptive_radius is None
    assert UNet3D(1, 1, widths=[2, 2], norm="group").receptive_radius is None
    net = UNet3D(1, 1, widths=[2, 2], norm="batch")
    assert net.receptive_radius is None
    assert net.eval().receptive_radius == 9


def test_errors_name_the_class_and_values():
    with pytest.raises(ValueError, match="UNet3D: residual=True needs in_channels == out_channels"):
        UNet3D(2, 1)
    with pytest.raises(ValueError, match="UNet3D: norm must be one of"):
        UNet3D(1, 1, norm="layer")
    with pytest.raises(ValueError, match=r"expected input \(B, 2, D, H, W\)"):
        UNet3D(2, 2)(torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(TypeError, match="2 channels"):
        UNet3D(2, 2)(torch.zeros(1, 2, 4, 4, 4, dtype=torch.complex64))


def test_dncnn_receptive_radius_and_tiling():
    from pipeline.models import DnCNN3D, TiledBackbone

    torch.manual_seed(0)
    net = DnCNN3D(1, 1, width=3, depth=4, residual=False, activation="leaky_relu").double()
    assert net.receptive_radius == 4
    left, right = _support(net, (1, 1, 20), (0, 0, 10))
    assert left == right == 4
    tiled = TiledBackbone(net, tile_shape=(5, 12, 12))
    x = torch.randn(1, 1, 5, 21, 17, dtype=torch.float64)
    assert tiled.exact
    assert torch.allclose(tiled(x), net(x), atol=1e-13)
