"""Reference-free classical parameters (issue 14.3): the calibration is recorded and reused,
explicit values override it, its criteria track the true error, and TV beats FBP (the
gradient's adjoint and the solvers' derivatives: tests/operators3d/test_tv.py)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import zarr

from pipeline.data import open_scan
from pipeline.reconstruct import ReconstructConfig, ReconstructResult, completion_records, open_ome, reconstruct
from pipeline.reconstruct.adapters import _Classical

# The driver module: where the job looks up the slab writer, so where a test replaces it.
module = importlib.import_module("pipeline.reconstruct.reconstruct")
classical = importlib.import_module("pipeline.classical.select")


def _run(scan, out, **kw) -> ReconstructResult:
    kw.setdefault("chunks", (2, 48, 48))
    kw.setdefault("progress", False)
    kw.setdefault("scheduler", "sync")
    return reconstruct(ReconstructConfig(scan=scan, out=str(out), **kw))


def _info(out) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]


def _level(out) -> torch.Tensor:
    return torch.from_numpy(np.asarray(open_ome(str(out), 0)[:]))


@pytest.fixture(scope="module")
def noisy_ct(tmp_path_factory) -> str:
    """4×48×48 ellipsoids, 30 angles, 10⁴ photons (transmission noise), chunks of 2 slices."""
    from pipeline.data import SimulateCTConfig, simulate_ct

    out = tmp_path_factory.mktemp("scans") / "ct.zarr"
    simulate_ct(SimulateCTConfig(out=str(out), shape=(4, 48, 48), angles=30, phantom="ellipsoids", photons=1e4,
                                 chunk_depth=2, seed=3, workers=1, scheduler="sync", progress=False))
    return str(out)


@pytest.fixture(scope="module")
def noisy_mri(tmp_path_factory) -> str:
    """4×48×48 ellipsoids, 4 coils, 4× Poisson disc, σ = 0.02, chunks of 2 slices."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scans") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(out=str(out), shape=(4, 48, 48), coils=4, acceleration=4.0, calibration=10,
                                   phantom="ellipsoids", noise_sigma=0.02, chunk_depth=2, seed=3, workers=1,
                                   scheduler="sync", progress=False))
    return str(out)


def _psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.abs() if x.is_complex() else x, ref.abs() if ref.is_complex() else ref
    return 10 * math.log10(float(ref.abs().max()) ** 2 / float((x - ref).square().mean()))


def _data(scan_path: str, thickness: int = 2):
    scan = open_scan(scan_path)
    blocks = classical.calibration_blocks(scan.metadata.volume_shape[0], 2, thickness)
    data = classical.calibration_data(scan, lambda a, b: scan.slab(slice(a, b)), blocks, torch.device("cpu"))
    ref = torch.cat([scan.reference.read_torch(slice(a, b)) for a, b in blocks], dim=0)
    return scan, data, ref


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------- criteria
def test_fbp_sure_tracks_the_true_measurement_error(noisy_ct):
    scan, data, ref = _data(noisy_ct)
    record = classical.select_fbp(data, scan.metadata.noise())
    clean = data.op(ref)
    from operators3d.ct import fbp

    truth = []
    for row in record["candidates"]:
        x = fbp(data.y, data.op, filter=row["filter"], cutoff=row["cutoff"])
        truth.append(float((data.op(x) - clean).square().mean()))
    values = [r["value"] for r in record["candidates"]]
    assert _spearman(values, truth) > 0.9  # a constant (or random) criterion fails here
    chosen = values.index(min(values))
    assert truth[chosen] <= 1.05 * min(truth)
    assert max(truth) > 2 * min(truth)  # the candidates differ: the test can tell


def test_sense_gsure_is_minimised_near_the_oracle(noisy_mri):
    from operators3d import sense_cg

    scan, data, ref = _data(noisy_mri, thickness=1)
    record = classical.select_sense(data, scan.metadata.noise())
    rows = record["candidates"]
    errors = [float((sense_cg(data.y, data.op, l2_weight=r["l2_weight"], num_iters=r["iterations"], tol=0)
                     - ref).abs().square().mean()) for r in rows]
    values = [r["value"] for r in rows]
    assert _spearman(values, errors) > 0.8
    chosen = values.index(min(values))
    assert 10 * math.log10(errors[chosen] / min(errors)) < 0.5  # within 0.5 dB of the grid's best
    assert max(errors) > 3 * min(errors)


# ----------------------------------------------------------------------------- the job
def test_auto_choices_are_recorded_and_explicit_values_override(tmp_path, noisy_ct):
    from operators3d.ct import fbp

    result = _run(noisy_ct, tmp_path / "auto", method="fbp")
    info = _info(tmp_path / "auto")
    cal = info["calibration"]
    assert cal["criterion"] == "sure-measurement" and cal["slabs"] and len(cal["candidates"]) == 20
    assert info["parameters"] == {"filter": cal["chosen"]["filter"], "cutoff": cal["chosen"]["cutoff"]}
    assert info["settings"]["reconstructor"]["filter"] == "auto"  # what is hashed: the setting as given
    scan = open_scan(noisy_ct)
    y, op = scan.slab(slice(0, 4))
    want = fbp(y, op, filter=cal["chosen"]["filter"], cutoff=cal["chosen"]["cutoff"])
    torch.testing.assert_close(_level(tmp_path / "auto"), want, rtol=1e-5, atol=1e-6)

    fixed = _run(noisy_ct, tmp_path / "fixed", method="fbp", filter="hann", filter_cutoff=0.6)
    info = _info(tmp_path / "fixed")
    assert info["calibration"] is None and info["parameters"] == {"filter": "hann", "cutoff": 0.6}
    assert fixed.fingerprint != result.fingerprint
    torch.testing.assert_close(_level(tmp_path / "fixed"), fbp(y, op, filter="hann", cutoff=0.6), rtol=1e-5,
                               atol=1e-6)
    _run(noisy_ct, tmp_path / "window", method="fbp", filter="cosine")  # cutoff 1 with a given window
    assert _info(tmp_path / "window")["parameters"] == {"filter": "cosine", "cutoff": 1.0}


def test_sense_auto_and_half_given(tmp_path, noisy_mri):
    _run(noisy_mri, tmp_path / "s", method="sense")
    info = _info(tmp_path / "s")
    assert info["calibration"]["criterion"] == "gsure-image"
    assert set(info["parameters"]) == {"l2_weight", "iterations"}
    _run(noisy_mri, tmp_path / "h", method="sense", sense_iters=7)
    info = _info(tmp_path / "h")
    assert info["parameters"]["iterations"] == 7
    assert {r["iterations"] for r in info["calibration"]["candidates"]} == {7}


def test_tv_beats_fbp_on_a_noisy_phantom(tmp_path, noisy_ct):
    scan = open_scan(noisy_ct)
    ref = scan.reference.read_torch(slice(0, 4))
    _run(noisy_ct, tmp_path / "tv", method="tv", chunks=(4, 48, 48))
    _run(noisy_ct, tmp_path / "fbp", method="fbp", chunks=(4, 48, 48))
    info = _info(tmp_path / "tv")
    assert info["calibration"]["method"] == "tv" and info["exact"] is False and info["receptive_radius"] == 2
    tv, fbp = _psnr(_level(tmp_path / "tv"), ref), _psnr(_level(tmp_path / "fbp"), ref)
    assert tv > fbp + 1.0, (tv, fbp)


def test_resumed_tv_job_reuses_the_recorded_parameters(tmp_path, noisy_ct, monkeypatch):
    calls = {"calibrate": 0, "writes": 0}
    original_calibrate, original_write = _Classical.calibrate, module._write_slab

    def counting_calibrate(self, say):
        calls["calibrate"] += 1
        return original_calibrate(self, say)

    def crashing_write(level0, cplx, a, b, x):
        if calls["writes"] == 1 and crash["on"]:
            raise RuntimeError("simulated crash")
        calls["writes"] += 1
        return original_write(level0, cplx, a, b, x)

    crash = {"on": True}
    monkeypatch.setattr(_Classical, "calibrate", counting_calibrate)
    monkeypatch.setattr(module, "_write_slab", crashing_write)
    out = tmp_path / "tv.ome.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(noisy_ct, out, method="tv", tv_iters=25, slab=2)  # weight auto, 2 slabs of 2 slices
    first = _info(out)
    assert calls["calibrate"] == 1 and len(completion_records(str(out))) == 1
    crash["on"] = False
    result = _run(noisy_ct, out, method="tv", tv_iters=25, slab=2)
    assert result.state == "resumed" and result.slabs_run == 1
    assert calls["calibrate"] == 1  # not calibrated again: the recorded choice is used
    assert _info(out)["parameters"] == first["parameters"] and _info(out)["calibration"] == first["calibration"]


def test_noise_free_and_unknown_noise(tmp_path, ct_scan, mri_scan, monkeypatch):
    # A noise-free scan (sigma 0): SURE is the residual alone, the least smoothing wins.
    _run(ct_scan, tmp_path / "f", method="fbp", chunks=(4, 8, 8))
    assert _info(tmp_path / "f")["parameters"] == {"filter": "ram-lak", "cutoff": 1.0}
    # No noise model: the former fixed values, said so; TV needs its weight.
    monkeypatch.setattr(type(open_scan(mri_scan).metadata), "noise", lambda self: None)
    _run(mri_scan, tmp_path / "s", method="sense", chunks=(4, 8, 8))
    cal = _info(tmp_path / "s")["calibration"]
    assert cal["criterion"] == "none" and cal["chosen"] == {"l2_weight": 1e-3, "iterations": 20}
    with pytest.raises(ValueError, match="--tv-weight"):
        _run(mri_scan, tmp_path / "t", method="tv", chunks=(4, 8, 8))


def test_cli_parses_auto_and_numbers(tmp_path, noisy_ct, capsys):
    from pipeline.cli import main

    out = tmp_path / "c.ome.zarr"
    assert main(["reconstruct", "--method", "fbp", "--filter", "shepp-logan", "--filter-cutoff", "0.8",
                 "--scan", noisy_ct, "--out", str(out), "--no-progress", "--scheduler", "sync"]) == 0
    assert _info(out)["parameters"] == {"filter": "shepp-logan", "cutoff": 0.8}
    assert main(["reconstruct", "--method", "fbp", "--filter-cutoff", "1.5", "--scan", noisy_ct, "--out",
                 str(tmp_path / "e"), "--no-progress"]) == 2
    assert "--filter-cutoff must be auto or in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reconstruct", "--method", "sense", "--l2-weight", "lots", "--scan", noisy_ct, "--out", "o"])
    with pytest.raises(ValueError, match="--tv-iters"):
        ReconstructConfig(scan=noisy_ct, out=str(tmp_path / "x"), method="tv", tv_iters=0)


def test_calibration_blocks_never_overlap():
    assert classical.calibration_blocks(64, 3, 4) == [(9, 13), (30, 34), (51, 55)]
    assert classical.calibration_blocks(8, 3, 4) == [(0, 8)]  # too thin for 3 disjoint blocks: the whole
    assert classical.calibration_blocks(4, 2, 2) == [(0, 2), (2, 4)]
    for depth in range(1, 40):
        for count in (1, 2, 3):
            for thickness in (1, 2, 4, 8):
                blocks = classical.calibration_blocks(depth, count, thickness)
                covered = [d for a, b in blocks for d in range(a, b)]
                assert len(covered) == len(set(covered)) and all(0 <= d < depth for d in covered)


def test_close_tv_weights_are_compared_again_with_more_probes():
    # Probe 0 ranks weight 2 first by a hair; three more probes say weight 1 is better on average.
    rows = [{"tv_weight": mu, "iterations": k, "value": v}
            for mu, k, v in [(1.0, 25, 1.02), (1.0, 50, 1.01), (2.0, 25, 1.005), (2.0, 50, 1.00),
                             (4.0, 25, 1.30), (4.0, 50, 1.31)]]
    calls = []

    def sure_rows(mus, seed):
        calls.append((tuple(mus), seed))
        return {(mu, k): (0.95 if mu == 1.0 else 1.03) + (0.001 if k == 25 else 0.0) for mu in mus for k in (25, 50)}

    best = classical._confirm_tv(rows, sure_rows, lambda _: None, margin=0.03, probes=4)
    assert (best["tv_weight"], best["iterations"]) == (1.0, 50)
    assert [c[0] for c in calls] == [(1.0, 2.0)] * 3  # the far weight 4 is not rerun
    assert len({c[1] for c in calls}) == 3  # each further probe is a different one
    assert best["probes"] == 4 and best["value_one_probe"] == 1.01
    assert best["value"] == pytest.approx((1.01 + 3 * 0.95) / 4)
    far = [r for r in rows if r["tv_weight"] == 4.0]
    assert all("probes" not in r for r in far)
    # a single close weight: nothing is rerun, the one-probe choice stands
    calls.clear()
    alone = [dict(r) for r in rows if r["tv_weight"] != 1.0]
    assert classical._confirm_tv(alone, sure_rows, lambda _: None)["tv_weight"] == 2.0 and not calls
