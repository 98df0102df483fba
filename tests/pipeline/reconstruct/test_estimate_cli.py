"""``recon3d evaluate OUT --estimate``: a reference-free error estimate of a written
reconstruction (classical or a model), its JSON keys, seeding, and its refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.reconstruct import ReconstructConfig, reconstruct
from reconstruct_helpers import save_model

KEYS = ("estimated_psnr", "estimated_psnr_low", "estimated_psnr_high", "estimator")
FAST = ["--draws", "2", "--folds", "2", "--estimate-slices", "4", "--estimate-blocks", "2"]


def _recon(scan: str, out, **kw) -> str:
    reconstruct(ReconstructConfig(scan=scan, out=str(out), chunks=(2, 8, 8), progress=False, scheduler="sync", **kw))
    return str(out)


def _estimate(tmp_path, out: str, *extra: str, name: str = "e.json") -> dict:
    path = tmp_path / name
    assert main(["evaluate", out, "--estimate", "--json", str(path), *FAST, *extra]) == 0
    return json.loads(path.read_text())


def test_estimate_of_a_classical_output_is_reproducible_and_reports_its_keys(tmp_path, ct_scan):
    out = _recon(ct_scan, tmp_path / "fbp", method="fbp")
    a = _estimate(tmp_path, out, name="a.json")
    b = _estimate(tmp_path, out, name="b.json")
    c = _estimate(tmp_path, out, "--seed", "1", name="c.json")
    for key in KEYS:
        assert key in a
    assert a["estimator"] == "bootstrap-calibrated cross-validation"
    assert a["estimated_psnr_low"] <= a["estimated_psnr"] <= a["estimated_psnr_high"]
    assert all(math.isfinite(a[k]) for k in KEYS[:3])
    assert a["reconstruction"]["method"] == "fbp" and set(a["reconstruction"]["parameters"]) == {"filter", "cutoff"}
    assert [blk["d"] for blk in a["blocks"]] == [[1, 5], [7, 11]]  # 2 evenly spaced blocks of 4 of 12 slices
    assert a["data_range_source"] == "max |reconstruction|"
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert drop(a) == drop(b)  # seeded: the same draws and held-out parts
    assert c["estimated_mse"] != a["estimated_mse"]


def test_estimate_of_a_model_output_beside_the_true_metrics(tmp_path, mri_scan):
    weights = save_model(tmp_path / "m.pt", "mri", widths=[4, 8])
    out = _recon(mri_scan, tmp_path / "net", model=str(weights))
    path = tmp_path / "both.json"
    assert main(["evaluate", out, "--reference", mri_scan, "--no-object", "--estimate", "--json", str(path), *FAST]) == 0
    result = json.loads(path.read_text())
    est = result["estimate"]
    assert est["reconstruction"]["model"] == str(weights)
    assert est["data_range"] == result["data_range"] and est["data_range_source"] == "given"
    assert est["of"] == "the complex image"
    assert math.isfinite(est["true_psnr_complex"])  # the truth of what is estimated, beside the magnitude's
    assert np.isfinite([est[k] for k in KEYS[:3]]).all() and math.isfinite(result["psnr"])


def test_estimate_refuses_a_scan_without_a_noise_model(tmp_path, capsys):
    from pipeline.data import IngestCTConfig, ingest_ct

    p = np.random.default_rng(0).uniform(0, 1, size=(8, 6, 10)).astype(np.float32)  # (angles, D, U)
    np.save(tmp_path / "p.npy", p)
    scan = str(tmp_path / "ct.zarr")
    ingest_ct(IngestCTConfig(source=str(tmp_path / "p.npy"), out=scan, log=False, chunk_depth=2, workers=1,
                             scheduler="sync", progress=False))
    out = _recon(scan, tmp_path / "fbp", method="fbp", filter="hann")
    capsys.readouterr()
    assert main(["evaluate", out, "--estimate"]) == 2
    err = capsys.readouterr().err
    assert "records no noise model" in err and "--photons I0" in err


def test_evaluate_needs_a_reference_or_the_estimate(tmp_path, ct_scan, capsys):
    out = _recon(ct_scan, tmp_path / "bp", method="adjoint")
    capsys.readouterr()
    assert main(["evaluate", out]) == 2
    assert "--reference SCAN, or --estimate" in capsys.readouterr().err


def test_an_object_cut_by_the_field_of_view_is_flagged_not_silently_estimated(tmp_path, ct_scan, capsys):
    """The bootstrap's rotations keep the slices' inscribed circle: an object reaching outside it
    (cut by the field of view) is assessed on part of itself, and the output says so."""
    inside = _estimate(tmp_path, _recon(ct_scan, tmp_path / "in", method="fbp"), name="in.json")
    assert inside["cautions"] == [] and all(abs(b["outside_ratio"]) < 0.1 for b in inside["blocks"])

    cut = str(tmp_path / "cut.zarr")
    assert main(["simulate", "ct", "--shape", "4", "32", "32", "--angles", "24", "--phantom", "industrial-crop",
                 "--photons", "1e4", "--chunk-depth", "2", "--seed", "3", "--no-progress", "--workers", "1",
                 "--out", cut]) == 0
    out = _recon(cut, tmp_path / "cut_fbp", method="fbp")
    flagged = _estimate(tmp_path, out, name="cut.json")
    assert len(flagged["cautions"]) == 1 and "cut by the field of view" in flagged["cautions"][0]
    assert max(b["outside_ratio"] for b in flagged["blocks"]) > 0.3
    capsys.readouterr()
    assert main(["evaluate", out, "--estimate", *FAST]) == 0
    assert "caution: the object reaches outside the inscribed circle" in capsys.readouterr().out
