"""``recon3d evaluate``: out-of-core PSNR / SSIM / NMSE equal the in-memory metrics.

The fixtures write OME-Zarr 0.5 images themselves (:func:`write_ome`), as ``recon3d
reconstruct`` does, and simulate a small MRI scan as the reference.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.metrics import nmse, psnr, ssim
from pipeline.reconstruct import evaluate as ev
from pipeline.reconstruct import evaluate_cli
from pipeline.reconstruct.ome_image import OmeImage

SHAPE = (13, 20, 22)


def write_ome(path: Path | str, volume: np.ndarray, *, chunk_depth: int = 3, scan: str | None = None,
              method: str = "model", scale=(1.0, 1.0, 1.0), levels: int = 1) -> str:
    """An OME-Zarr 0.5 image of a (D, H, W) volume, chunked along D, as reconstruct writes it."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    datasets = []
    for level in range(levels):
        f = 2**level
        data = volume[::f, ::f, ::f].astype(np.float32)
        arr = group.create_array(str(level), shape=data.shape, chunks=(chunk_depth, *data.shape[1:]),
                                 dtype="float32", dimension_names=["z", "y", "x"], fill_value=np.nan)
        arr[:] = data
        datasets.append({"path": str(level), "coordinateTransformations": [
            {"type": "scale", "scale": [s * f for s in scale]}]})
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "millimeter"} for n in "zyx"],
        "datasets": datasets}]}
    group.attrs["recon3d"] = {"scan": scan, "method": method}
    return str(path)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    """A simulated 13×20×22 MRI scan (reference chunks of 4 slices)."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scan") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=SHAPE, coils=2, acceleration=2, calibration=6, chunk_depth=4,
                                   seed=0, noise_sigma=0.01, out=str(out), progress=False))
    return str(out)


@pytest.fixture(scope="module")
def reference(scan) -> np.ndarray:
    from pipeline.data import open_scan

    return open_scan(scan).reference.read()


@pytest.fixture(scope="module")
def recon(reference) -> np.ndarray:
    """|reference| plus structured and random error (float32, as OUT stores it)."""
    rng = np.random.default_rng(1)
    mag = np.abs(reference)
    d = np.arange(SHAPE[0])[:, None, None]
    return (0.9 * mag + 0.05 * mag.max() * np.sin(d / 3.0) + 0.03 * mag.max() * rng.standard_normal(SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def out(tmp_path_factory, recon, scan) -> str:
    return write_ome(tmp_path_factory.mktemp("out") / "out.zarr", recon, chunk_depth=3, scan=scan)


def _torch(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _mag(reference: np.ndarray) -> np.ndarray:
    """|reference| in float64, formed as metrics forms it (torch's complex64 abs)."""
    return _torch(reference).abs().double().numpy()


@pytest.mark.parametrize("slab_depth", [None, 2, 3, 5, 13])
def test_unmasked_metrics_equal_in_memory(out, scan, recon, reference, slab_depth):
    from skimage.metrics import structural_similarity

    res = ev.evaluate(out, scan, slab_depth=slab_depth, workers=2)
    x, ref = _torch(recon), _torch(reference)
    assert res["psnr"] == pytest.approx(psnr(x, ref), rel=1e-12)
    assert res["nmse"] == pytest.approx(nmse(x, ref), rel=1e-12)
    assert res["ssim"] == pytest.approx(ssim(x, ref), rel=1e-10, abs=1e-12)
    mag = _mag(reference)
    peak = float(mag.max())
    assert res["data_range"] == peak
    sk = structural_similarity(recon.astype(np.float64), mag, win_size=7, data_range=peak)
    assert res["ssim"] == pytest.approx(sk, rel=1e-10, abs=1e-12)
    assert res["mask_voxels"] == math.prod(SHAPE)
    assert res["ssim_voxels"] == (13 - 6) * (20 - 6) * (22 - 6)
    # NMSE / PSNR by plain NumPy as well.
    err = recon.astype(np.float64) - mag
    assert res["nmse"] == pytest.approx((err**2).sum() / (mag**2).sum(), rel=1e-12)
    assert res["psnr"] == pytest.approx(10 * np.log10(peak**2 / (err**2).mean()), rel=1e-12)


def _masked_ssim_reference(recon, reference, mask, data_range):
    """The SSIM map of skimage (full=True) averaged over mask voxels of the valid region."""
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(recon.astype(np.float64), _mag(reference), win_size=7, data_range=data_range, full=True)
    valid = np.zeros(recon.shape, bool)
    valid[3:-3, 3:-3, 3:-3] = True
    return smap[valid & mask].mean()


def test_masked_file_metrics_equal_in_memory(tmp_path, out, scan, recon, reference):
    rng = np.random.default_rng(2)
    mask = rng.random(SHAPE) < 0.6
    np.save(tmp_path / "mask.npy", mask)
    res = ev.evaluate(out, scan, mask=tmp_path / "mask.npy", slab_depth=3)
    x, ref, m = _torch(recon), _torch(reference), _torch(mask)
    assert res["psnr"] == pytest.approx(psnr(x, ref, mask=m), rel=1e-12)
    assert res["nmse"] == pytest.approx(nmse(x, ref, mask=m), rel=1e-12)
    peak = float(_mag(reference)[mask].max())
    assert res["data_range"] == peak
    assert res["ssim"] == pytest.approx(_masked_ssim_reference(recon, reference, mask, peak), rel=1e-10)
    assert res["mask_voxels"] == int(mask.sum())

    # The same mask as a zarr array, and an explicit data range.
    zarr.create_array(str(tmp_path / "mask.zarr"), data=mask, chunks=(4, 20, 22))
    res2 = ev.evaluate(out, scan, mask=tmp_path / "mask.zarr", data_range=2.0, slab_depth=4)
    assert res2["psnr"] == pytest.approx(psnr(x, ref, mask=m, data_range=2.0), rel=1e-12)
    assert res2["ssim"] == pytest.approx(_masked_ssim_reference(recon, reference, mask, 2.0), rel=1e-10)
    assert res2["data_range_source"] == "given"


def test_object_mask(out, scan, recon, reference):
    res = ev.evaluate(out, scan, mask="object", object_threshold=0.2, slab_depth=2)
    mag = _mag(reference)
    mask = mag > 0.2 * mag.max()
    assert 0 < mask.sum() < mask.size
    x, ref, m = _torch(recon), _torch(reference), _torch(mask)
    assert res["psnr"] == pytest.approx(psnr(x, ref, mask=m), rel=1e-12)
    assert res["nmse"] == pytest.approx(nmse(x, ref, mask=m), rel=1e-12)
    assert res["ssim"] == pytest.approx(_masked_ssim_reference(recon, reference, mask, float(mag.max())), rel=1e-10)
    assert res["mask"] == "object" and res["mask_voxels"] == int(mask.sum())


@pytest.mark.parametrize("strip_bytes", [1, 3 * 13 * 22 * 8])
def test_strips_inside_a_slab(out, scan, recon, reference, monkeypatch, strip_bytes):
    """The float64 work goes strip by strip along H (1 and ~3 rows here): same values."""
    monkeypatch.setattr(ev, "STRIP_BYTES", strip_bytes)
    peak = float(_mag(reference).max())
    mask = _mag(reference) > 0.1 * peak
    x, ref = _torch(recon), _torch(reference)
    res = ev.evaluate(out, scan, slab_depth=5, workers=1)
    assert res["psnr"] == pytest.approx(psnr(x, ref), rel=1e-12)
    assert res["ssim"] == pytest.approx(ssim(x, ref), rel=1e-10)
    res = ev.evaluate(out, scan, mask="object", slab_depth=5, workers=1)
    assert res["nmse"] == pytest.approx(nmse(x, ref, mask=_torch(mask)), rel=1e-12)
    assert res["ssim"] == pytest.approx(_masked_ssim_reference(recon, reference, mask, peak), rel=1e-10)


def test_reads_slab_by_slab(tmp_path, scan, monkeypatch):
    """Structural memory check: every read of OUT and of the reference is one slab plus halos."""
    from pipeline.data import SimulateMRIConfig, open_scan, simulate_mri

    shape = (40, 16, 16)
    big_scan = str(tmp_path / "big.zarr")
    simulate_mri(SimulateMRIConfig(shape=shape, coils=1, acceleration=2, calibration=4, chunk_depth=4,
                                   seed=3, out=big_scan, progress=False))
    ref = open_scan(big_scan).reference.read()
    store = write_ome(tmp_path / "big_out.zarr", _mag(ref) * 0.8, chunk_depth=4)
    reads: list[tuple[str, int, int]] = []
    image_read = OmeImage.read
    monkeypatch.setattr(OmeImage, "read", lambda self, lo, hi: (reads.append(("out", lo, hi)), image_read(self, lo, hi))[1])
    from pipeline.data import ScanArray

    scan_read = ScanArray.read
    monkeypatch.setattr(ScanArray, "read", lambda self, d=None, **kw: (
        reads.append(("ref", d.start if d else 0, d.stop if d else shape[0])), scan_read(self, d, **kw))[1])
    res = ev.evaluate(store, big_scan, slab_depth=8, workers=2)
    assert res["slab_depth"] == 8
    out_reads = [(lo, hi) for name, lo, hi in reads if name == "out"]
    ref_reads = [(lo, hi) for name, lo, hi in reads if name == "ref"]
    assert len(out_reads) == 5  # one task per slab of 8
    assert max(hi - lo for lo, hi in out_reads + ref_reads) <= 8 + 2 * 3 < shape[0]
    # Only the halos are read twice: D + 2·r per inner boundary.
    assert sum(hi - lo for lo, hi in out_reads) == shape[0] + 2 * 3 * 4
    assert res["ssim"] == pytest.approx(ssim(_torch(_mag(ref) * 0.8).float(), _torch(ref)), rel=1e-10)


def test_default_slab_is_whole_chunks():
    assert ev._default_slab_depth((1000, 512, 512), 8) == 16  # 16 MiB of float32
    assert ev._default_slab_depth((1000, 4096, 4096), 8) == 8  # at least one chunk
    assert ev._default_slab_depth((13, 20, 22), 3) == 13


def test_errors_name_the_path(tmp_path, out, scan, reference):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        ev.evaluate(tmp_path / "missing.zarr", scan)
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        ev.evaluate(out, tmp_path / "nope.zarr")
    wrong = write_ome(tmp_path / "wrong.zarr", np.zeros((13, 20, 20), np.float32))
    with pytest.raises(ValueError, match=r"wrong\.zarr.*\(13, 20, 20\).*\(13, 20, 22\)"):
        ev.evaluate(wrong, scan)
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    plain.create_array("0", shape=SHAPE, dtype="float32")
    with pytest.raises(ValueError, match="plain.zarr.*not an OME-Zarr"):
        ev.evaluate(tmp_path / "plain.zarr", scan)
    # An OUT used as a "scan": no recon3d scan there.
    with pytest.raises(ValueError, match="out.zarr' is an OME-Zarr image, not a scan"):
        ev.evaluate(out, out)
    # A scan without a reference.
    from pipeline.data import open_scan

    sc = open_scan(scan)
    sc._arrays.pop("reference", None)
    with pytest.raises(ValueError, match="has no 'reference'"):
        ev.evaluate(out, sc)
    # An unfinished reconstruction: unwritten chunks read as NaN.
    partial = zarr.open_group(write_ome(tmp_path / "partial.zarr", np.abs(reference)), mode="r+")
    partial["0"][3:6] = np.nan
    with pytest.raises(ValueError, match=r"partial\.zarr.*NaN"):
        ev.evaluate(tmp_path / "partial.zarr", scan)
    np.save(tmp_path / "m.npy", np.ones((13, 20, 21), bool))
    with pytest.raises(ValueError, match=r"m\.npy"):
        ev.evaluate(out, scan, mask=tmp_path / "m.npy")


def test_cli(tmp_path, out, scan, recon, reference, capsys):
    parser = argparse.ArgumentParser(prog="recon3d")
    evaluate_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", out, "--reference", scan, "--json", str(tmp_path / "m.json"),
                              "--mask", "object", "--data-range", "1.5"])
    assert evaluate_cli.run_cli(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())
    for key in ("psnr", "ssim", "nmse"):
        assert key.upper() in printed
    assert f"{saved['psnr']:.4f}" in printed and f"{saved['ssim']:.5f}" in printed
    mag = _mag(reference)
    m = _torch(mag > 0.1 * mag.max())
    assert saved["psnr"] == pytest.approx(psnr(_torch(recon), _torch(reference), mask=m, data_range=1.5), rel=1e-12)
    assert saved["data_range"] == 1.5 and saved["mask"] == "object"


def test_cli_reports_the_object_next_to_the_volume(tmp_path, out, scan, capsys):
    """Without --mask the command reports the whole volume and the object (the support mask),
    each with its data range; --no-object reports the volume only."""
    parser = argparse.ArgumentParser(prog="recon3d")
    evaluate_cli.add_parser(parser.add_subparsers(dest="command"))
    assert evaluate_cli.run_cli(parser.parse_args(["evaluate", out, "--reference", scan, "--json", str(tmp_path / "m.json")])) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "m.json").read_text())
    whole, obj = ev.evaluate(out, scan), ev.evaluate(out, scan, mask="object")
    assert saved["psnr"] == whole["psnr"] and saved["mask"] is None
    assert saved["object"]["psnr"] == obj["psnr"] and saved["object"]["mask_voxels"] == obj["mask_voxels"]
    assert obj["mask_voxels"] < whole["mask_voxels"]
    lines = [line for line in printed.splitlines() if "PSNR" in line]
    assert len(lines) == 2 and lines[0].lstrip().startswith("volume:") and lines[1].lstrip().startswith("object (")
    assert f"{obj['psnr']:.4f}" in lines[1] and all("R = " in line for line in lines)
    assert evaluate_cli.run_cli(parser.parse_args(["evaluate", out, "--reference", scan, "--no-object"])) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if "PSNR" in line]) == 1
