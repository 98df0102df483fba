"""A fixed intensity scale per scan: slab-wise results equal whole-volume ones."""

import pytest
import torch

from operators3d import MultiCoilMRI, simulate_coil_maps
from pipeline.models import ArtifactRemoval, UnrolledNetwork, intensity_scale, scan_intensity_scale


class PointwiseNet(torch.nn.Module):
    """A 1×1×1 convolution: no coupling along D, so slabs may be processed apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 2, 1, dtype=torch.float64)
        self.in_channels = self.out_channels = 2

    def forward(self, x):
        return self.conv(x) ** 2


def _problem():
    g = torch.Generator().manual_seed(0)
    shape = (6, 8, 10)
    maps = simulate_coil_maps(3, shape).to(torch.complex128)
    mask = torch.rand(8, 10, generator=g) < 0.5
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    x = torch.randn(shape, dtype=torch.complex128, generator=g)
    x[:2] *= 10  # slabs of very different intensity
    return op, op(x)[None]


@pytest.mark.parametrize("kind", ["artifact", "unrolled"])
def test_slabs_equal_whole_volume_with_a_fixed_scale(kind):
    torch.manual_seed(0)
    op, y = _problem()
    net = PointwiseNet()
    model = ArtifactRemoval(net) if kind == "artifact" else UnrolledNetwork(net, num_iters=2)
    slabs = [(y[:, :, a:b], op.slab(slice(a, b))) for a, b in ((0, 2), (2, 4), (4, 6))]
    s = scan_intensity_scale(model, [(y, op)])
    with torch.no_grad():
        with intensity_scale(model, s):
            whole = model(y, op)
            parts = torch.cat([model(ys, o) for ys, o in slabs], dim=-3)
        # The unrolled step size 1/L uses max Σ|S|² over the slab, which is 1 to float32
        # rounding for the simulated (float32) maps: equal to that rounding.
        torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-9)
        # Per-slab RMS (the default) differs between slabs of different intensity.
        loose = torch.cat([model(ys, o) for ys, o in slabs], dim=-3)
    assert not torch.allclose(loose, whole, rtol=1e-3)
    # The scale over all slabs equals the whole-volume one (equal slab sizes).
    assert scan_intensity_scale(model, slabs) == pytest.approx(s, rel=1e-6)  # 1/L as above


def test_context_restores_and_checks():
    model = ArtifactRemoval(PointwiseNet())
    with intensity_scale(model, 2.0):
        assert model.__dict__["_fixed_scale"] == 2.0
        with intensity_scale(model, 3.0):
            assert model.__dict__["_fixed_scale"] == 3.0
        assert model.__dict__["_fixed_scale"] == 2.0
    assert model.__dict__.get("_fixed_scale") is None
    with pytest.raises(ValueError, match="positive finite"):
        intensity_scale(model, 0.0)
    assert scan_intensity_scale(ArtifactRemoval(PointwiseNet(), normalize=False), []) is None
