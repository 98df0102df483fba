"""Tiled evaluation: equals the untiled backbone (values and gradients) when the overlap covers
the receptive field; never keeps activations for the whole slab."""

from __future__ import annotations

import math

import pytest
import torch

from operators3d import MultiCoilMRI, Rotate90, poisson_disc_mask, simulate_coil_maps
from pipeline.losses import equivariant_imaging
from pipeline.models import ArtifactRemoval, TiledBackbone, UNet3D, axis_windows, tile_starts


def test_tile_starts_cover_aligned_and_spaced():
    for size, tile, overlap, multiple in [(64, 16, 4, 2), (30, 16, 6, 2), (104, 40, 10, 8),
                                          (48, 48, 8, 4), (20, 32, 8, 4), (100, 20, 0, 1)]:
        starts = tile_starts(size, tile, overlap, multiple)
        t = min(tile, size)
        assert starts[0] == 0 and starts[-1] + t == size
        assert all(s % multiple == 0 for s in starts)
        step = (t - overlap) // multiple * multiple
        assert all(0 < b - a <= step for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="no aligned step"):
        tile_starts(64, 8, 7, 2)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_axis_windows_partition_of_unity_with_zero_margins(kind):
    size, tile, margin = 50, 20, 3
    starts = tile_starts(size, tile, 8, 2)
    windows = axis_windows(size, tile, starts, margin, kind, dtype=torch.float64)
    total = torch.zeros(size, dtype=torch.float64)
    for s, w in zip(starts, windows):
        total[s : s + tile] += w
        if s > 0:
            assert float(w[:margin].abs().max()) == 0
        if s + tile < size:
            assert float(w[-margin:].abs().max()) == 0
    assert torch.allclose(total, torch.ones(size, dtype=torch.float64))


def _pair(widths=(3, 4), **tiled):
    torch.manual_seed(0)
    net = UNet3D(2, 2, widths=list(widths)).double()
    return net, TiledBackbone(net, **tiled)


@pytest.mark.parametrize("tiles_per_batch", [1, 3])
def test_tiled_equals_untiled_values_and_gradients(tiles_per_batch):
    net, tiled = _pair(tile_shape=(24, 24, 28), tiles_per_batch=tiles_per_batch)
    assert tiled.exact and tiled.overlap == (18, 18, 18) and tiled.margin == (9, 9, 9)
    x = torch.randn(1, 2, 3, 30, 35, dtype=torch.float64, requires_grad=True)
    padded, starts, _ = tiled.plan(x.shape[2:])
    assert len(starts[1]) > 1 and len(starts[2]) > 1
    a, b = net(x), tiled(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *net.parameters()], g)
    gb = torch.autograd.grad(b, [x, *net.parameters()], g)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-10)


def test_small_overlap_blends_but_is_not_exact():
    net, tiled = _pair(tile_shape=(8, 16, 16), overlap=(0, 4, 4))
    assert not tiled.exact
    x = torch.randn(1, 2, 8, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = net(x), tiled(x)
    err = float((a - b).abs().max())
    assert 1e-8 < err < float(a.abs().max())
    assert tiled.recompute_factor((8, 32, 32)) == pytest.approx((3 * 16 / 32) ** 2)


def test_activations_never_for_the_whole_slab():
    net, tiled = _pair(widths=(8, 8), tile_shape=(8, 16, 16), overlap=(0, 4, 4))
    x = torch.randn(1, 2, 8, 48, 48, dtype=torch.float64, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tiled(x).sum().backward()
    # What the forward keeps: the slab input (a reference, not a copy) and 1D windows.
    distinct = {(t.data_ptr(), t.numel()) for t in saved}
    largest = max(n for _, n in distinct)
    assert largest <= x.numel()
    activation = 8 * 8 * 16 * 16  # one tile's 8-channel feature map
    big = [n for p, n in distinct if n >= activation and p != x.data_ptr()]
    assert not big
    # the untiled network keeps several slab-sized 8-channel maps
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum().backward()
    assert max(t.numel() for t in saved) >= 8 * x[0, 0].numel()


def test_no_grad_path_and_errors():
    net, tiled = _pair(tile_shape=(8, 16, 16), overlap=(0, 4, 4))
    x = torch.randn(1, 2, 8, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        a = tiled(x)
    assert torch.allclose(a, tiled(x))
    with pytest.raises(ValueError, match="multiples of the backbone's size_multiple 2"):
        TiledBackbone(net, tile_shape=(7, 16, 16))
    with pytest.raises(ValueError, match="statistics over its whole input"):
        TiledBackbone(UNet3D(1, 1, norm="instance"), tile_shape=16)
    TiledBackbone(UNet3D(1, 1, norm="instance"), tile_shape=16, overlap=4, allow_global_norm=True)


@pytest.mark.parametrize("modality", ["mri", "ct"])
def test_tiled_reconstructor_loss_gradients_equal_untiled(modality):
    """An EI step through a tiled reconstructor equals the untiled one (loss and gradients)."""
    shape = (3, 18, 18)
    gen = torch.Generator().manual_seed(0)
    if modality == "mri":
        maps = simulate_coil_maps(2, shape).to(torch.complex128)
        mask = poisson_disc_mask(shape[1:], 2, calibration=4, generator=gen)
        op = MultiCoilMRI(mask=mask, coil_maps=maps)
        x = torch.randn((1,) + shape, dtype=torch.complex128, generator=gen)
        channels, initial = 2, "adjoint"
    else:
        from operators3d.ct import ParallelBeamCT

        op = ParallelBeamCT(volume_shape=shape, angles=torch.arange(9) * (math.pi / 9))
        x = torch.rand((1,) + shape, dtype=torch.float64, generator=gen)
        channels, initial = 1, "fbp"
    y = op(x)
    torch.manual_seed(1)
    unet = UNet3D(channels, channels, widths=[2, 3]).double()
    plain = ArtifactRemoval(unet, initial=initial)
    tiled = ArtifactRemoval(TiledBackbone(unet, tile_shape=(4, 24, 24), overlap=(0, 18, 18)),
                            initial=initial)
    results = []
    for model in (plain, tiled):
        loss = equivariant_imaging(transform=Rotate90, seed=5)
        out = loss(model(y, op), y, op, model)
        grads = torch.autograd.grad(out.total, list(unet.parameters()))
        results.append((out.total.detach(), grads))
    (la, ga), (lb, gb) = results
    assert torch.allclose(la, lb, rtol=1e-10)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-8, atol=1e-12)
