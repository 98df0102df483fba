"""Ingest of small HDF5 k-space (plain and ISMRMRD-style), .npy, and TIFF projection stacks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from operators3d import MultiCoilMRI, centered_fft, poisson_disc_mask, shepp_logan_3d, simulate_coil_maps
from pipeline.cli import main
from pipeline.data import IngestCTConfig, IngestMRIConfig, check_scan, ingest_ct, ingest_mri, open_scan

h5py = pytest.importorskip("h5py")
tifffile = pytest.importorskip("tifffile")

C, D, H, W = 3, 10, 16, 14


def _kspace():
    """Full 3D k-space (C, kx, ky, kz) of a phantom, its hybrid-space form and mask."""
    x = shepp_logan_3d((D, H, W)).to(torch.complex64)
    maps = simulate_coil_maps(C, (D, H, W))
    mask = poisson_disc_mask((H, W), 2, calibration=8, generator=torch.Generator().manual_seed(0))
    hybrid = MultiCoilMRI(mask=mask, coil_maps=maps)(x)
    return centered_fft(hybrid, dims=(1,)).numpy(), hybrid.numpy(), mask.numpy()


def _ingest_mri(source, out, **kw):
    return ingest_mri(IngestMRIConfig(source=str(source), out=str(out), chunk_depth=2, workers=1,
                                      scheduler="sync", progress=False, **kw))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ingest_plain_hdf5_kspace(tmp_path):
    kspace, hybrid, mask = _kspace()
    src = tmp_path / "k.h5"
    with h5py.File(src, "w") as f:
        f["kspace"] = kspace
    before = _digest(src)
    # A block budget of a few ky columns forces several pass-1 blocks.
    outcome = _ingest_mri(src, tmp_path / "m.zarr", block_bytes=C * D * W * 8 * 3 * 5)
    assert outcome.state == "created"
    assert _digest(src) == before  # the input is only read
    scan = open_scan(tmp_path / "m.zarr")
    assert scan.measurements.shape == (C, D, H, W)
    np.testing.assert_allclose(scan.measurements.read(), hybrid, atol=1e-5)
    assert np.array_equal(scan.mask.read(), mask)
    geom = scan.metadata.geometry
    assert geom.calibration == (8, 8) and abs(geom.acceleration - 2) < 0.1
    assert scan.coil_maps.shape == (C, D, H, W)  # estimated by ESPIRiT
    assert check_scan(tmp_path / "m.zarr").ok
    assert "_ingest" not in set(scan.group.group_keys())  # the temporary array is gone


def test_ingest_ismrmrd_style_hdf5(tmp_path):
    kspace, hybrid, mask = _kspace()
    head_t = np.dtype([
        ("flags", "<u8"), ("number_of_samples", "<u2"), ("active_channels", "<u2"),
        ("idx", [("kspace_encode_step_1", "<u2"), ("kspace_encode_step_2", "<u2")]),
    ])
    rec_t = np.dtype([("head", head_t), ("data", h5py.vlen_dtype(np.float32))])
    rows = []
    noise = np.zeros(1, head_t)[0]
    noise["flags"], noise["number_of_samples"], noise["active_channels"] = 1 << 18, D, C
    rows.append((noise, np.ones(2 * C * D, np.float32)))  # a noise scan: skipped
    for ky, kz in zip(*np.nonzero(mask)):
        head = np.zeros(1, head_t)[0]
        head["number_of_samples"], head["active_channels"] = D, C
        head["idx"]["kspace_encode_step_1"], head["idx"]["kspace_encode_step_2"] = ky, kz
        line = kspace[:, :, ky, kz]
        rows.append((head, np.stack([line.real, line.imag], -1).astype(np.float32).ravel()))
    data = np.empty(len(rows), rec_t)
    for i, (head, values) in enumerate(rows):
        data[i] = (head, values)
    src = tmp_path / "raw.h5"
    xml = (f"<ismrmrdHeader><encoding><encodedSpace><matrixSize><x>{D}</x><y>{H}</y><z>{W}</z>"
           "</matrixSize></encodedSpace></encoding></ismrmrdHeader>")
    with h5py.File(src, "w") as f:
        f.create_dataset("dataset/data", data=data)
        f.create_dataset("dataset/xml", data=np.array([xml.encode()], dtype=h5py.string_dtype()))
    _ingest_mri(src, tmp_path / "m.zarr")
    scan = open_scan(tmp_path / "m.zarr")
    np.testing.assert_allclose(scan.measurements.read(), hybrid, atol=1e-5)
    assert np.array_equal(scan.mask.read(), mask)


def test_ingest_npy_with_readout_crop_and_known_maps(tmp_path):
    kspace, hybrid, _ = _kspace()
    np.save(tmp_path / "k.npy", kspace)
    maps = (np.ones((C, 6, H, W)) / np.sqrt(C)).astype(np.complex64)
    np.save(tmp_path / "maps.npy", maps)
    _ingest_mri(tmp_path / "k.npy", tmp_path / "m.zarr", readout_crop=6, coil_maps=str(tmp_path / "maps.npy"))
    scan = open_scan(tmp_path / "m.zarr")
    assert scan.metadata.volume_shape == (6, H, W)
    np.testing.assert_allclose(scan.measurements.read(), hybrid[:, 2:8], atol=1e-5)
    assert np.array_equal(scan.coil_maps.read(), maps)


def _projections(tmp_path, a=12, v=6, u=18):
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 2, size=(a, v, u))
    flat, dark = np.full((v, u), 900.0), np.full((v, u), 20.0)
    folder = tmp_path / "proj"
    folder.mkdir()
    for k in range(a):
        tifffile.imwrite(folder / f"proj_{k:04d}.tif", (dark + (flat - dark) * np.exp(-p[k])).astype(np.float32))
    tifffile.imwrite(tmp_path / "flat.tif", np.stack([flat, flat]).astype(np.float32))  # a stack: averaged
    tifffile.imwrite(tmp_path / "dark.tif", dark.astype(np.float32))
    return p, folder


def test_ingest_tiff_stack_with_flat_and_dark(tmp_path):
    p, folder = _projections(tmp_path)
    out = tmp_path / "ct.zarr"
    outcome = ingest_ct(IngestCTConfig(
        source=str(folder), out=str(out), flat=str(tmp_path / "flat.tif"), dark=str(tmp_path / "dark.tif"),
        chunk_depth=2, block_bytes=6 * 18 * 4 * 2 * 5, workers=1, scheduler="sync", progress=False))
    assert outcome.state == "created"
    scan = open_scan(out)
    assert scan.measurements.shape == (6, 12, 18)
    np.testing.assert_allclose(scan.measurements.read(), p.transpose(1, 0, 2), atol=2e-5)
    np.testing.assert_allclose(scan.angles.read(), np.arange(12) * np.pi / 12)
    y, op = scan.slab(slice(0, 2))
    assert op(torch.zeros(2, 18, 18)).shape == y.shape
    assert check_scan(out).ok


def test_ingest_npy_projections_with_angle_file_via_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=(9, 4, 10)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    angles = np.sort(rng.uniform(0, np.pi, 9))
    np.savetxt(tmp_path / "angles.txt", angles)
    out = str(tmp_path / "ct.zarr")
    rc = main(["ingest", "ct", str(tmp_path / "p.npy"), "--out", out, "--no-log", "--angles",
               str(tmp_path / "angles.txt"), "--angles-unit", "rad", "--no-progress", "--workers", "1"])
    assert rc == 0, capsys.readouterr().err
    scan = open_scan(out)
    np.testing.assert_array_equal(scan.measurements.read(), p.transpose(1, 0, 2))
    np.testing.assert_allclose(scan.angles.read(), angles)
    np.savetxt(tmp_path / "short.txt", angles[:5])
    rc = main(["ingest", "ct", str(tmp_path / "p.npy"), "--out", str(tmp_path / "b.zarr"), "--no-log",
               "--angles", str(tmp_path / "short.txt"), "--no-progress"])
    assert rc == 2 and "has 5 angles but there are 9 projections" in capsys.readouterr().err
    rc = main(["ingest", "ct", str(tmp_path / "p.npy"), "--out", str(tmp_path / "c.zarr"), "--no-progress"])
    assert rc == 2 and "--flat FILE or --i0" in capsys.readouterr().err


def test_interrupted_ingest_resumes(tmp_path, monkeypatch):
    from pipeline.data import ingest as ingest_module

    p, folder = _projections(tmp_path)
    config = IngestCTConfig(source=str(folder), out=str(tmp_path / "ct.zarr"), flat=str(tmp_path / "flat.tif"),
                            dark=str(tmp_path / "dark.tif"), chunk_depth=2, block_bytes=6 * 18 * 4 * 2 * 4,
                            workers=1, scheduler="sync", progress=False)
    original = ingest_module.ProjectionSource.read
    calls = {"n": 0}

    def flaky(self, a0, a1):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, a0, a1)

    monkeypatch.setattr(ingest_module.ProjectionSource, "read", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest_ct(config)
    assert any("incomplete" in problem for problem in check_scan(config.out).problems)
    monkeypatch.setattr(ingest_module.ProjectionSource, "read", original)
    assert ingest_ct(config).state == "resumed"
    np.testing.assert_allclose(open_scan(config.out).measurements.read(), p.transpose(1, 0, 2), atol=2e-5)


def test_ingest_records_a_saturating_detector_and_counts_what_it_clipped(tmp_path, capsys):
    """A detector that saturated at 80 % of the open beam and reads nothing under 30 %: the raw
    counts are clipped as the detector did, and ``--saturation``/``--floor`` record it."""
    from operators3d import Clip, nonlinear_from_dict

    rng = np.random.default_rng(3)
    p = rng.uniform(0, 2, size=(10, 4, 12))
    i0 = 1000.0
    counts = np.clip(i0 * np.exp(-p), 0.3 * i0, 0.8 * i0).astype(np.float32)
    np.save(tmp_path / "counts.npy", counts)
    out = str(tmp_path / "sat.zarr")
    rc = main(["ingest", "ct", str(tmp_path / "counts.npy"), "--out", out, "--i0", str(i0), "--saturation", "0.8",
               "--floor", "0.3", "--no-progress", "--workers", "1"])
    said = capsys.readouterr()
    assert rc == 0, said.err
    scan = open_scan(out)
    record = scan.metadata.detector
    assert record["model"] == "clip" and record["saturation"] == 0.8 and record["floor"] == 0.3
    assert record["low"] == pytest.approx(-np.log(0.8)) and record["high"] == pytest.approx(-np.log(0.3))
    y = scan.measurements.read()
    assert record["fraction_at_low"] == pytest.approx(np.mean(p < -np.log(0.8)), abs=1e-6)
    assert record["fraction_at_high"] == pytest.approx(np.mean(p > -np.log(0.3)), abs=1e-6)
    assert "recon3d ingest ct" in said.out + said.err and "at low" in said.out + said.err
    _, op = scan.slab(slice(0, 2))
    assert isinstance(nonlinear_from_dict(record, op), Clip)
    np.testing.assert_allclose(y, np.clip(p, -np.log(0.8), -np.log(0.3)).transpose(1, 0, 2), atol=2e-5)
    with pytest.raises(ValueError, match="must be below --saturation"):
        IngestCTConfig(source=str(tmp_path / "counts.npy"), out=out, i0=i0, saturation=0.3, floor=0.8)
    plain = IngestCTConfig(source=str(tmp_path / "counts.npy"), out=out, i0=i0).parameters()
    assert "saturation" not in plain and "floor" not in plain  # scans ingested before still resume
