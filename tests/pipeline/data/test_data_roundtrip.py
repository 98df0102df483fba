"""Round trip: simulate → inspect → stream reproduces every slab; operators are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators3d import TransmissionNoise, shepp_logan_3d, simulate_coil_maps
from pipeline.data import (
    CodecConfig,
    SlabStream,
    SlabStreamConfig,
    check_scan,
    inspect_scan,
    open_scan,
)
from pipeline.data.phantoms import coil_maps_slab, make_volume_source
from scan_factories import MRI_SHAPE, kill_phantom_at_slab, make_ct, make_mri


def _stream_all(path, **kw):
    config = SlabStreamConfig(scans=(path,), num_workers=kw.pop("num_workers", 0),
                              include_reference=True, **kw)
    return list(SlabStream(config))


@pytest.mark.parametrize("fixture", ["mri_scan", "ct_scan"])
def test_stream_reproduces_measurements_and_operators_are_exact(fixture, request):
    path = request.getfixturevalue(fixture)
    report = check_scan(path)
    assert report.ok, report.problems
    scan = open_scan(path)
    samples = _stream_all(path)
    slabs = scan.slab_slices()
    assert sorted(s.meta["d_slice"] for s in samples) == [(s.start, s.stop) for s in slabs]
    for y, op, meta in samples:
        d0, d1 = meta["d_slice"]
        stored = scan.measurements.read(slice(d0, d1))
        assert np.array_equal(y.numpy(), stored)  # bit-exact
        ref = meta["reference"]
        assert np.array_equal(ref.numpy(), scan.reference.read(slice(d0, d1)))
        clean = op(ref)
        scale = float(y.abs().max())
        assert torch.allclose(clean, y, atol=1e-5 * scale, rtol=0), float((clean - y).abs().max())
    # A range across chunk boundaries that starts and ends inside chunks equals zarr's own read.
    for arr in (scan.measurements, scan.reference):
        sel = [slice(None)] * len(arr.shape)
        sel[arr.d_axis] = slice(1, arr.depth - 1)
        assert arr.chunk_depth < arr.depth - 2
        assert np.array_equal(arr.read(slice(1, arr.depth - 1)), np.asarray(arr.array[tuple(sel)]))


def test_noisy_scan_stores_its_noise_model(noisy_mri_scan):
    scan = open_scan(noisy_mri_scan)
    noise = scan.metadata.noise()
    assert noise.to_dict() == {"kind": "gaussian", "sigma": 0.05}
    (y, op, meta), *_ = _stream_all(noisy_mri_scan, shuffle=False)
    residual = y - op(meta["reference"])
    sampled = op.mask.bool().expand_as(residual)
    assert torch.all(residual[~sampled] == 0)  # unmeasured entries stay zero
    std = residual[sampled].real.std().item()
    assert 0.04 < std < 0.06


def test_stream_with_workers_matches_main_process(ct_scan):
    inline = _stream_all(ct_scan)
    workers = _stream_all(ct_scan, num_workers=2)
    assert [s.meta["position"] for s in inline] == [s.meta["position"] for s in workers]
    for a, b in zip(inline, workers):
        assert torch.equal(a.y, b.y)
        assert a.meta["d_slice"] == b.meta["d_slice"]


def test_inspect_reports_layout(mri_scan, ct_scan):
    mri = inspect_scan(mri_scan)
    arrays = {a.name: a for a in mri.arrays}
    c = 3
    assert arrays["measurements"].shape == (c, *MRI_SHAPE)
    assert arrays["measurements"].chunks == (c, 2, *MRI_SHAPE[1:])
    assert arrays["measurements"].objects_present == arrays["measurements"].objects_total == 5
    # bytes → Blosc zstd → CRC32C (the default checksum, last so it covers the stored bytes)
    assert "blosc(zstd" in arrays["measurements"].codecs[-2]
    assert arrays["measurements"].codecs[-1] == "crc32c"
    assert 2.2 < mri.summary["acceleration"] < 2.8
    ct = inspect_scan(ct_scan)
    assert {a.name for a in ct.arrays} == {"measurements", "angles", "reference"}
    assert ct.summary["geometry"].startswith("parallel beam, 18 angles")


def test_slab_phantom_and_coil_maps_match_whole_volume():
    shape = (9, 14, 11)
    source = make_volume_source("shepp-logan", shape, seed=0)
    slabs = np.concatenate([source.slab(0, 4), source.slab(4, 9)])
    assert np.array_equal(slabs, shepp_logan_3d(shape).numpy())
    maps = simulate_coil_maps(10, shape, generator=torch.Generator().manual_seed(5))
    parts = torch.cat([coil_maps_slab(10, shape, 0, 5, seed=5), coil_maps_slab(10, shape, 5, 9, seed=5)], 1)
    assert torch.equal(maps, parts)


def test_simulation_does_not_depend_on_workers_or_sharding(tmp_path):
    make_ct(tmp_path / "w2.zarr", workers=2, scheduler="threads", photons=1e3)
    make_ct(tmp_path / "w1.zarr", photons=1e3, codec=CodecConfig(shard_chunks=2))
    a, b = open_scan(tmp_path / "w2.zarr"), open_scan(tmp_path / "w1.zarr")
    assert b.measurements.array.shards is not None
    assert np.array_equal(a.measurements.read(), b.measurements.read())
    assert check_scan(tmp_path / "w1.zarr").ok



def test_photon_counts_are_the_scans_noise_model(tmp_path):
    """A CT scan with ``--photons`` records the post-log transmission noise as its noise model
    (what SURE and robust EI read); metadata of older scans, which kept it as acquisition
    noise, reads the same."""
    from pipeline.data.format import ScanMetadata

    make_ct(tmp_path / "t.zarr", photons=1e3)
    meta = open_scan(tmp_path / "t.zarr").metadata
    assert meta.noise_model == {"kind": "transmission_poisson", "photons": 1e3}
    assert meta.noise() == TransmissionNoise(1e3) and meta.acquisition_noise is None
    legacy = meta.to_dict() | {"noise_model": None, "acquisition_noise": meta.noise_model}
    assert ScanMetadata.from_dict(legacy) == meta


def test_interrupted_simulation_is_incomplete_and_rerun_finishes(tmp_path, monkeypatch):
    from pipeline.data import phantoms

    original = phantoms.AnalyticPhantom.slab
    kill_phantom_at_slab(monkeypatch, 3)
    path = tmp_path / "killed.zarr"
    with pytest.raises(KeyboardInterrupt):
        make_mri(path, noise_sigma=0.01)
    report = check_scan(path)
    assert not report.ok
    assert any("incomplete" in p for p in report.problems)
    with pytest.raises(Exception, match="incomplete"):
        open_scan(path)
    monkeypatch.setattr(phantoms.AnalyticPhantom, "slab", original)
    outcome = make_mri(path, noise_sigma=0.01)
    assert outcome.state == "resumed" and 0 < outcome.tasks_run < outcome.tasks_total
    assert check_scan(path).ok
    make_mri(tmp_path / "clean.zarr", noise_sigma=0.01)
    a, b = open_scan(path), open_scan(tmp_path / "clean.zarr")
    for name in ("measurements", "coil_maps", "reference", "mask"):
        assert np.array_equal(getattr(a, name).read(), getattr(b, name).read()), name
    assert make_mri(path, noise_sigma=0.01).state == "already complete"


def test_rerun_with_other_parameters_is_refused(tmp_path):
    make_ct(tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="other parameters.*angles"):
        make_ct(tmp_path / "s.zarr", angles=20)
    assert make_ct(tmp_path / "s.zarr", angles=20, overwrite=True).state == "created"
    assert open_scan(tmp_path / "s.zarr").angles.shape == (20,)


def test_cone_beam_simulation_and_fdk(tmp_path):
    from pipeline.data import PreprocessConfig, preprocess

    path = tmp_path / "cone.zarr"
    make_ct(path, geometry="cone", shape=(6, 16, 16), angles=16)
    scan = open_scan(path)
    assert scan.metadata.geometry.kind == "cone"
    assert scan.measurements.shape[0] == scan.metadata.geometry.det_shape[0]
    op = scan.full_operator()
    clean = op(torch.from_numpy(scan.reference.read()))
    assert torch.allclose(clean, scan.measurements.read_torch(), atol=1e-5)
    with pytest.raises(ValueError, match="cone-beam"):
        scan.operator(slice(0, 2))
    with pytest.raises(ValueError, match="mode='image'"):
        SlabStream(SlabStreamConfig(scans=(str(path),)))
    preprocess(PreprocessConfig(scan=str(path), progress=False, workers=1, scheduler="sync"))
    assert set(open_scan(path).derived_names()) == {"fbp", "n2i"}
    assert check_scan(path).ok


def test_fsspec_url_scan_round_trip():
    url = "memory://recon3d-tests/ct.zarr"
    make_ct(url)
    assert check_scan(url).ok
    scan = open_scan(url)
    samples = _stream_all(url)
    assert len(samples) == 4
    for y, op, meta in samples:
        d0, d1 = meta["d_slice"]
        assert np.array_equal(y.numpy(), scan.measurements.read(slice(d0, d1)))
