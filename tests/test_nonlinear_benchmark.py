"""benchmarks/nonlinear.py (issue 18.2): the detector's level is set from the linear scan, the
networks are trained through the detector and with the linear model, and the tables, the JSON and
the targets agree."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_targets_and_best_scale():
    import nonlinear

    methods = {"network, aware": {"psnr": 26.0}, "network, linear model": {"psnr": 22.5}, "fbp": {"psnr": 25.0}}
    t = nonlinear.targets(methods, one_bit=False)
    assert t["gain_db"] == pytest.approx(3.5) and t["gain_met"] and t["above_fbp"]
    methods["network, linear model"]["psnr"] = 23.5
    assert not nonlinear.targets(methods, one_bit=False)["gain_met"]
    one = {"network, aware": {"psnr": 9.0, "psnr_scaled": 16.0}, "network, linear model": {"psnr_scaled": 12.0},
           "fbp": {"psnr_scaled": 12.5}, "normalised back-projection": {"psnr_scaled": 17.0}}
    t = nonlinear.targets(one, one_bit=True)
    assert t["gain_met"] and t["above_fbp"] and not t["above_back_projection"]

    class V:  # a volume with a reference
        reference = torch.tensor([1.0, 2.0, 3.0])

    torch.testing.assert_close(nonlinear.best_scaled(torch.tensor([2.0, 4.0, 6.0]), V), V.reference)


def test_whitening_is_a_radial_reweighting_that_one_bit_fourier_data_barely_see():
    import nonlinear
    from operators3d import MultiCoilMRI, poisson_disc_mask, simulate_coil_maps
    from operators3d.nonlinear import sign_values

    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 8, 8), 2.0 + 1.0j, dtype=torch.complex128)  # DC only: gain 1
    torch.testing.assert_close(nonlinear.whitened(flat), flat)
    assert nonlinear._radial_index((6, 5), "cpu")[3, 2] == 0 and nonlinear._radial_index((6, 5), "cpu")[0, 0] == 4
    # a smooth complex image: |k|²-whitening changes the image, not most of the bits of A x
    shape = (2, 32, 32)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32, dtype=torch.float64), torch.linspace(-1, 1, 32, dtype=torch.float64),
                            indexing="ij")
    x = ((xx / 0.7) ** 2 + (yy / 0.5) ** 2 < 1).to(torch.float64) + 0.5 * ((xx - 0.2) ** 2 + yy**2 < 0.05)
    x = torch.stack([x, x.flip(-1)]).to(torch.complex128) * torch.exp(0.3j * xx)
    mask = poisson_disc_mask(shape[1:], 3.0, calibration=6, generator=g)
    op = MultiCoilMRI(mask=mask, coil_maps=simulate_coil_maps(4, shape)).to(torch.complex128)
    m = op.measurement_mask()
    w = nonlinear.whitened(x)
    assert float((w - x).abs().norm() / x.abs().norm()) > 1.0
    kept = float((sign_values(torch.view_as_real(op(x)[..., m]), 0.0) == sign_values(torch.view_as_real(op(w)[..., m]), 0.0))
                 .double().mean())
    assert kept > 0.9, kept
    noisy = x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)  # not a reweighting: bits change
    assert float((sign_values(torch.view_as_real(op(x)[..., m]), 0.0) == sign_values(torch.view_as_real(op(noisy)[..., m]), 0.0))
                 .double().mean()) < kept - 0.1


def test_quick_run_reports_consistent_tables(tmp_path):
    out = tmp_path / "n.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nonlinear.py"), "--quick",
                           "--cases", "clip-held-out", "one-bit", "one-bit-mri", "--scratch", str(tmp_path / "scr"),
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    clip, bit, mri = cases["clip-held-out"], cases["one-bit"], cases["one-bit-mri"]
    # the level was set from the linear scan so that the asked share of rays reads the floor
    assert clip["detector"]["model"] == "clip" and clip["detector"]["fraction_at_high"] == pytest.approx(0.12, abs=0.01)
    assert bit["detector"]["model"] == "sign" and bit["detector"]["fraction_at_high"] == pytest.approx(0.25, abs=0.01)
    sections = {sec.splitlines()[0].split(":")[0]: sec for sec in proc.stdout.split("\n## ")[1:]}
    for name, r in cases.items():
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
                for line in sections[name].splitlines()[3:] if line.startswith("| ")}
        assert set(rows) == set(r["methods"])
        for method, m in r["methods"].items():
            assert rows[method][1] == f"{m['psnr']:.2f}" and rows[method][2] == f"{m['ssim']:.4f}"
        t = r["targets"]
        aware, lin = r["methods"]["network, aware"], r["methods"]["network, linear model"]
        key = "psnr_scaled" if name.startswith("one-bit") else "psnr"
        assert t["gain_db"] == pytest.approx(aware[key] - lin[key])
        assert f"{t['gain_db']:+.2f} dB" in proc.stdout
    assert "normalised back-projection" in bit["methods"] and "psnr_scaled" in bit["methods"]["fbp"]
    # one-bit MRI: the sign of each part of each sampled value, about half of them +1
    assert mri["detector"]["model"] == "sign" and mri["detector"]["threshold"] == 0.0
    assert 0.35 < mri["detector"]["fraction_at_high"] < 0.65
    assert {"zero-filled Aᴴy (linear scan)", "normalised back-projection"} <= set(mri["methods"])
    assert "above_fbp" not in mri["targets"] and "mri_ei.yaml" in mri["methods"]["network, aware"]["label"]
    # the envelope oracles: the bits barely see a radial reweighting, the true envelope helps Aᴴy
    env = mri["envelope"]
    assert env["whitened_bits_kept"] > 0.9 and 0.0 < env["bits_flipped_by_noise"] < 0.5
    oracle = mri["methods"]["Aᴴ(W y), reference envelope (oracle)"]
    assert oracle["psnr_scaled"] > mri["methods"]["normalised back-projection"]["psnr_scaled"] + 1.0
    assert "spectral envelope: whitening the reference" in proc.stdout
    assert "loss.detector: auto" in clip["methods"]["network, aware"]["label"]
    assert "clipped FBP" in clip["methods"]["aware classical iteration"]["label"]
    assert "model.initial_detector: auto" in clip["methods"]["network, aware"]["label"]
    assert "model.initial_detector: ignore" in clip["methods"]["network, linear model"]["label"]
    assert "every ray an equality" in clip["methods"]["classical iteration, linear model"]["label"]
    assert clip["targets"]["above_aware_classical"] == (
        clip["methods"]["network, aware"]["psnr"] > clip["methods"]["aware classical iteration"]["psnr"])
    assert "loss.detector: ignore" in clip["methods"]["network, linear model"]["label"]


def test_quick_dithered_one_bit_mri_sets_the_dither_from_the_linear_scan(tmp_path):
    out, scratch = tmp_path / "d.json", tmp_path / "scr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nonlinear.py"), "--quick", "--networks", "auto",
                           "--cases", "one-bit-mri-dither", "--scratch", str(scratch), "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["cases"]["one-bit-mri-dither"]
    d = r["detector"]
    assert d["model"] == "sign" and d["threshold"] == 0.0 and set(d["dither"]) == {"amplitude", "seed"}
    # Δ is the 99 % quantile of |parts| of the linear scan's sampled values
    from pipeline.data import open_scan

    (linear,) = scratch.glob("mri_anatomy_*_linear.zarr")
    scan = open_scan(str(linear))
    y = scan.measurements.read()
    sampled = np.broadcast_to(scan.mask.read() != 0, y.shape)
    parts = np.abs(np.concatenate([np.real(y)[sampled], np.imag(y)[sampled]]))
    assert d["dither"]["amplitude"] == pytest.approx(float(np.quantile(parts.astype(np.float64), 0.99)), rel=1e-5)
    assert 0.4 < d["fraction_at_high"] < 0.6 and "envelope" not in r  # the envelope check assumes threshold 0
    assert f"dither ±{d['dither']['amplitude']:.4g}" in proc.stdout
    assert "psnr_scaled" in r["methods"]["network, aware"]


def test_quick_pretrained_networks_use_earlier_scans_through_the_same_detector(tmp_path):
    out, scratch = tmp_path / "p.json", tmp_path / "scr"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "nonlinear.py"), "--quick", "--cases", "clip-held-out",
           "--held-out-seed", "303", "--pretrain-volumes", "2", "--pretrain-steps", "3", "--scratch", str(scratch),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())["cases"]["clip-held-out"]
    assert r["scan"] == {"phantom": "anatomy", "seed": 303} and "anatomy seed 303" in proc.stdout
    from pipeline.data import open_scan

    # the earlier scans (seeds 401, 402) went through the new scan's detector: the same level
    new = open_scan(str(next(scratch.glob("anatomy_*_303_floor*.zarr")))).metadata.detector
    earlier = sorted(scratch.glob("anatomy_*_40[12]_floor*.zarr"))
    assert len(earlier) == 2
    for path in earlier:
        assert open_scan(str(path)).metadata.detector["high"] == new["high"]
    for name in ("network, aware", "network, linear model"):
        m, zs = r["methods"][name], r["methods"][name + ", pretrained (zero-shot)"]
        assert "seeds 401–402" in m["label"] and "fine-tuned 6 steps at lr 0.0001" in m["label"]
        # the curve starts at the pretrained network as is and ends at the fine-tuned one
        assert [c["step"] for c in m["curve"]] == [0, 1, 3, 6]
        assert m["curve"][0]["psnr"] == zs["psnr"] and m["curve"][-1]["psnr"] == m["psnr"]
    assert len(list(scratch.glob("pretrained_clip-held-out_*.pt"))) == 2
    # a second run reuses both pretrained networks and repeats the fine-tuned figures
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and again.stdout.count("reusing pretrained_clip-held-out_") == 2
    r2 = json.loads(out.read_text())["cases"]["clip-held-out"]
    assert r2["methods"]["network, aware"]["psnr"] == r["methods"]["network, aware"]["psnr"]
    # one bit has no pretrained path
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nonlinear.py"), "--quick", "--cases", "one-bit",
                          "--pretrain-volumes", "1", "--scratch", str(scratch)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "count-floor cases" in bad.stderr


def test_quick_saturation_clips_the_least_attenuated_rays(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nonlinear.py"), "--quick", "--cases", "clip-held-out",
                           "--clip-side", "saturation", "--networks", "none", "--scratch", str(tmp_path / "scr"),
                           "--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())["cases"]["clip-held-out"]["detector"]
    assert d["fraction_at_low"] == pytest.approx(0.12, abs=0.01) and d["fraction_at_high"] < 0.01
    assert f"saturation, line integrals clipped at {d['low']:.4g}" in proc.stdout
