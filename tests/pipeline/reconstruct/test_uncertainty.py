"""``recon3d reconstruct --uncertainty N``: the bootstrap RMS-error map written beside the image —
slab-wise equal to the whole volume, seeded, described in its metadata, shown by report, and
refused where it cannot be drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.reconstruct import ReconstructConfig, reconstruct, validate_ome
from reconstruct_helpers import CT_SHAPE, save_model


@pytest.fixture(scope="module")
def noisy_ct(tmp_path_factory) -> str:
    """A 12×16×16 parallel-beam CT scan with photon-counting noise (I₀ = 10⁴)."""
    from pipeline.data import SimulateCTConfig, simulate_ct

    out = tmp_path_factory.mktemp("scans") / "ct_noisy.zarr"
    simulate_ct(SimulateCTConfig(out=str(out), shape=CT_SHAPE, angles=12, chunk_depth=2, seed=1, photons=1e4,
                                 workers=1, scheduler="sync", progress=False))
    return str(out)


def _run(scan, out, **kw) -> str:
    kw.setdefault("chunks", (2, 8, 8))
    reconstruct(ReconstructConfig(scan=scan, out=str(out), progress=False, scheduler="sync", **kw))
    return str(out)


def _map(out: str, level: int = 0) -> np.ndarray:
    return np.asarray(zarr.open(out, mode="r")[f"uncertainty/{level}"])


def test_slab_by_slab_equals_the_whole_volume_with_photon_noise(tmp_path, noisy_ct):
    # Poisson draws by CDF inversion in float64: float32 rounding between a slab's and the whole
    # volume's projections once moved a count and made the maps differ.
    slabs = _run(noisy_ct, tmp_path / "slabs", method="fbp", filter="hann", uncertainty=3, slab=2)
    whole = _run(noisy_ct, tmp_path / "whole", method="fbp", filter="hann", uncertainty=3, slab=12,
                 chunks=(12, 8, 8))
    a, b = _map(slabs), _map(whole)
    assert np.isfinite(a).all() and (a > 0).all()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * float(b.max()))
    # the image itself is unchanged by asking for the map
    plain = _run(noisy_ct, tmp_path / "plain", method="fbp", filter="hann", slab=2)
    np.testing.assert_array_equal(np.asarray(zarr.open(slabs, mode="r")["0"]),
                                  np.asarray(zarr.open(plain, mode="r")["0"]))


def test_a_model_with_a_halo_gives_the_whole_volume_map_slab_by_slab(tmp_path, mri_scan):
    weights = save_model(tmp_path / "m.pt", "mri", widths=[4, 8])
    slabs = _run(mri_scan, tmp_path / "slabs", model=str(weights), uncertainty=2, slab=4)
    whole = _run(mri_scan, tmp_path / "whole", model=str(weights), uncertainty=2, slab=24, chunks=(24, 8, 8))
    np.testing.assert_allclose(_map(slabs), _map(whole), rtol=1e-4, atol=1e-6 * float(_map(whole).max()))


def test_the_map_is_seeded_described_and_has_the_pyramid(tmp_path, noisy_ct):
    a = _run(noisy_ct, tmp_path / "a", method="fbp", uncertainty=2, pyramid=2)
    b = _run(noisy_ct, tmp_path / "b", method="fbp", uncertainty=2, pyramid=2)
    c = _run(noisy_ct, tmp_path / "c", method="fbp", uncertainty=2, uncertainty_seed=1, pyramid=2)
    np.testing.assert_array_equal(_map(a), _map(b))
    assert not np.array_equal(_map(a), _map(c))
    group = zarr.open(a, mode="r")
    attrs = dict(group["uncertainty"].attrs)
    info = attrs["recon3d"]
    assert info["kind"] == "uncertainty" and info["draws"] == 2 and "root-mean-square error" in info["quantity"]
    assert attrs["ome"]["multiscales"][0]["name"] == "uncertainty"
    assert _map(a, 1).shape == tuple(s // 2 for s in CT_SHAPE)
    np.testing.assert_allclose(_map(a, 1)[0, 0, 0], _map(a)[:2, :2, :2].mean(), rtol=1e-5)
    assert dict(group.attrs)["recon3d"]["settings"]["uncertainty"]["draws"] == 2
    assert validate_ome(a) == [] and validate_ome(f"{a}/uncertainty") == []


def test_report_shows_the_map_beside_the_error(tmp_path, noisy_ct):
    from pipeline.reconstruct.report import report

    out = _run(noisy_ct, tmp_path / "u", method="fbp", uncertainty=2)
    result = report(out, out_dir=tmp_path / "rep")
    text = result.markdown.read_text()
    assert "uncertainty columns are the per-voxel RMS error" in text


def test_refused_without_a_noise_model(tmp_path):
    from pipeline.data import IngestCTConfig, ingest_ct

    p = np.random.default_rng(0).uniform(0, 1, size=(8, 6, 10)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    scan = str(tmp_path / "ct.zarr")
    ingest_ct(IngestCTConfig(source=str(tmp_path / "p.npy"), out=scan, log=False, chunk_depth=2, workers=1,
                             scheduler="sync", progress=False))
    with pytest.raises(ValueError, match="records none"):
        _run(scan, tmp_path / "u", method="fbp", uncertainty=2)
    with pytest.raises(ValueError, match="--uncertainty must be >= 0"):
        ReconstructConfig(scan=scan, out=str(tmp_path / "v"), method="fbp", uncertainty=-1)


def test_poisson_quantile_draws_have_the_poisson_moments():
    from pipeline.reconstruct.uncertainty import _poisson_quantile

    g = torch.Generator().manual_seed(0)
    for lam in (0.7, 12.0, 29.0, 31.0, 900.0):
        n = _poisson_quantile(torch.full((100_000,), lam), torch.rand(100_000, generator=g))
        assert torch.equal(n, n.round()) and n.min() >= 0
        mean, var = float(n.mean()), float(n.var())
        assert abs(mean - lam) < 4 * (lam / 1e5) ** 0.5
        assert abs(var / lam - 1) < 0.03
