"""Rolling evaluation along D (pipeline.models.rolling): the whole pass's values, a few slices held."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import DnCNN3D, UNet3D
from pipeline.models.rolling import chunk_slices, roll_unet, rolling, rolling_chunk, rolling_for
from pipeline.reconstruct.memory import _LiveBytes, activation_bytes_per_voxel, rolling_activation_bytes


def _unet(widths, norm="none", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = UNet3D(2, 2, widths=widths, norm=norm).to(dtype).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("widths,norm", [([4, 8], "none"), ([3, 6, 12], "none"), ([4, 8], "batch"), ([5], "none")])
def test_rolled_unet_equals_the_whole_pass_in_float64(widths, norm):
    net = _unet(widths, norm)
    f = net.size_multiple
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for d, h, w in ((1, 8, 8), (7, 12, 10), (19, 9, 16), (41, 8, 8)):
            x = torch.randn(1, 2, d, h, w, dtype=torch.float64, generator=gen)
            ref = net(x)
            for chunk in (f, 3 * f, 64):
                out = roll_unet(net, x, chunk) + x  # residual
                assert out.shape == ref.shape
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
            with rolling(2 * h * w):  # through forward, as reconstruct calls it
                torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


def test_rolled_dncnn_equals_the_whole_pass_in_float64():
    torch.manual_seed(0)
    net = DnCNN3D(2, 2, width=6, depth=5).double().eval()
    with torch.no_grad():
        for d in (1, 4, 23):
            x = torch.randn(1, 2, d, 9, 11, dtype=torch.float64)
            ref = net(x)
            for chunk in (1, 3, 50):
                with rolling(chunk * 9 * 11):
                    torch.testing.assert_close(net(x), ref, rtol=1e-12, atol=1e-12)


def test_rolled_float32_on_cpu_matches_to_rounding():
    net = _unet([8, 16], dtype=torch.float32)
    x = torch.randn(1, 2, 30, 32, 24)
    with torch.no_grad():
        ref = net(x)
        with rolling(4 * 32 * 24):
            out = net(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_rolling_is_inference_only_and_skips_global_norms():
    net = _unet([4, 8], dtype=torch.float32)
    x = torch.randn(1, 2, 12, 16, 16, requires_grad=True)
    with rolling():
        assert rolling_chunk() is None  # gradients are on
        y = net(x)  # gradients on: the whole pass, differentiable
        y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert rolling_chunk() is None
    inst = _unet([4, 8], norm="instance", dtype=torch.float64)
    xi = torch.randn(1, 2, 12, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ref = inst(xi)
        with rolling(16 * 16):
            torch.testing.assert_close(inst(xi), ref, rtol=0, atol=0)  # instance norm: runs whole
    with rolling_for("meta") as rolls:
        assert rolls is False and rolling_chunk() is None
    with pytest.raises(ValueError, match="positive"):
        with rolling(0):
            pass


def test_chunk_slices_rounds_up_to_the_grid():
    assert chunk_slices(1 << 17, 256 * 256, 2) == 2
    assert chunk_slices(1 << 17, 256 * 256, 8) == 8
    assert chunk_slices(1 << 17, 128 * 128, 2) == 8
    assert chunk_slices(1 << 17, 100 * 100, 4) == 16
    with pytest.raises(ValueError, match="multiple of the pooling grid"):
        roll_unet(_unet([4, 8, 16]), torch.zeros(1, 2, 8, 8, 8, dtype=torch.float64), 2)


def test_rolled_pass_holds_a_few_slices_whatever_the_depth():
    """The counted peak besides input and output grows by the output's bytes per slice only;
    a whole pass grows by every layer's."""
    net = _unet([8, 16], dtype=torch.float32)
    s = 16
    peaks = {}
    with torch.no_grad():
        for depth in (32, 128):
            x = torch.zeros(1, 2, depth, s, s)
            with rolling(2 * s * s), _LiveBytes() as live:
                net(x)
            peaks[depth] = live.peak / (s * s)
    per_slice = (peaks[128] - peaks[32]) / 96
    assert per_slice <= 2 * 2 * 4 + 1e-6  # the output and the residual sum: 2 channels, float32
    whole = activation_bytes_per_voxel([net], 2, 2, torch.device("cpu"))
    assert whole >= 4 * per_slice  # the whole pass: every layer's map per slice
    a, b = rolling_activation_bytes([net], 2, 2, (s, s))
    assert a == pytest.approx(per_slice, rel=0.1)
    assert peaks[128] <= a * 128 + b + 1e-6 and peaks[32] <= a * 32 + b + 1e-6


def test_tiles_roll_inside_each_tile_with_the_same_result():
    """A tiled backbone (reconstruct --tile) rolls inside each tile batch: same output."""
    from pipeline.models import TiledBackbone

    net = _unet([4, 8])
    tiled = TiledBackbone(net, tile_shape=(24, 24, 24), overlap=2 * net.receptive_radius,
                          tiles_per_batch=2).eval()
    x = torch.randn(1, 2, 40, 34, 30, dtype=torch.float64)
    with torch.no_grad():
        ref = tiled(x)
        with rolling(2 * 24 * 24):
            out = tiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))
