"""``recon3d report``: figures and report.md for a run directory and for an OME-Zarr image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.reconstruct import report as rp
from pipeline.reconstruct.ome_image import OmeImage
from test_evaluate import write_ome  # the OME-Zarr 0.5 writer of the evaluate tests

SHAPE = (12, 24, 20)
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _write_run(run_dir: Path, steps: int = 40) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        loss = 1.0 / s + 0.01 * np.sin(s)
        lines.append({"step": s, "loss": loss, "loss_rank0": loss, "parts": {"mc": 0.6 * loss, "ei": 0.4 * loss},
                      "lr": 1e-3 * min(1.0, s / 10), "step_s": 0.5, "voxels_per_s": 1e5 + s,
                      "data_wait_fraction": 0.1})
        if s % 10 == 0:
            lines.append({"event": "validation", "step": s, "time": "t", "loss": 0.5 / s,
                          "psnr": 20 + s / 10 - (2 if s == 40 else 0), "ssim": 0.5 + s / 100})
            lines.append({"event": "checkpoint", "step": s, "time": "t", "path": f"{run_dir}/checkpoints/step_{s}",
                          "seconds": 0.1, "bytes": 10, "reason": "every"})
        if s == 20:
            lines.append({"event": "resume", "step": 20, "time": "t", "path": "x", "seconds": 0.2})
    text = "".join(json.dumps(rec) + "\n" for rec in lines)
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 41, "loss": 0.0')  # a line cut by a kill


def test_run_report(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    result = rp.report(run)
    assert result.kind == "run" and result.out_dir == run / "report"
    assert [p.name for p in result.figures] == ["training.png", "validation.png"]
    assert all(_is_png(p) for p in result.figures)
    md = result.markdown.read_text()
    final = 1.0 / 40 + 0.01 * np.sin(40)
    losses = [1.0 / s + 0.01 * np.sin(s) for s in range(1, 41)]
    best_step = int(np.argmin(losses)) + 1
    assert f"{final:.4g} (step 40)" in md
    assert f"{min(losses):.4g} (step {best_step})" in md
    # Validation: final PSNR 22 at step 40, best 23 at step 30; SSIM best at 40.
    assert "| PSNR (dB) | 22 (step 40) | 23 (step 30) |" in md
    assert "| SSIM | 0.9 (step 40) | 0.9 (step 40) |" in md
    assert "1 unreadable line" in md and "4 checkpoint(s)" in md and "resumed 1 time(s)" in md
    assert "![training](training.png)" in md and "![validation](validation.png)" in md
    assert result.summary["best_validation_psnr"] == pytest.approx(23.0)
    assert result.summary["final_loss"] == pytest.approx(final)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scan") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=SHAPE, coils=2, acceleration=2, calibration=6, chunk_depth=4,
                                   seed=0, noise_sigma=0.01, out=str(out), progress=False))
    return str(out)


@pytest.fixture(scope="module")
def magnitude(scan) -> np.ndarray:
    from pipeline.data import open_scan

    return torch.from_numpy(open_scan(scan).reference.read()).abs().double().numpy()


def test_image_report_with_baseline(tmp_path, scan, magnitude, monkeypatch):
    from pipeline.data import ScanArray
    from pipeline.metrics import nmse, psnr, ssim

    rng = np.random.default_rng(0)
    good = write_ome(tmp_path / "model.zarr", magnitude + 0.01 * rng.standard_normal(SHAPE), chunk_depth=3,
                     scan=scan, method="model", scale=(2.0, 1.0, 1.0))
    base = write_ome(tmp_path / "adjoint.zarr", 0.7 * magnitude, chunk_depth=5, scan=scan, method="adjoint")

    # The figure reads planes only: no slab of OUT, and the reference at most a chunk at a time.
    reads = []
    scan_read = ScanArray.read
    monkeypatch.setattr(ScanArray, "read", lambda self, d=None, **kw: (reads.append(d), scan_read(self, d, **kw))[1])
    monkeypatch.setattr(OmeImage, "read", lambda *a: pytest.fail("the report read a slab of OUT"))
    result = rp.report(good, baselines=[base], metrics=False)
    assert reads and all(d is not None and d.stop - d.start <= 4 for d in reads)
    assert result.metrics == [] and _is_png(result.figures[0])
    monkeypatch.undo()

    out_dir = tmp_path / "rep"
    result = rp.report(good, out_dir, baselines=[base])
    assert result.out_dir == out_dir and result.figures == [out_dir / "slices.png"]
    assert _is_png(out_dir / "slices.png")
    md = result.markdown.read_text()
    assert [m["volume"] for m in result.metrics] == ["model", "adjoint"]
    ref = torch.from_numpy(magnitude)
    for m, path in zip(result.metrics, (good, base)):
        from pipeline.reconstruct.ome_image import open_ome_image

        x = torch.from_numpy(open_ome_image(path).read(0, SHAPE[0]))
        assert m["psnr"] == pytest.approx(psnr(x, ref), rel=1e-12)
        assert m["ssim"] == pytest.approx(ssim(x, ref), rel=1e-10)
        assert m["nmse"] == pytest.approx(nmse(x, ref), rel=1e-12)
        assert f"| {m['volume']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['nmse']:.4g} |" in md
    assert result.metrics[0]["psnr"] > result.metrics[1]["psnr"]
    assert json.loads((out_dir / "metrics.json").read_text())[1]["volume"] == "adjoint"
    assert "2 × 1 × 1 millimeter" in md and "![slices](slices.png)" in md


def test_image_report_without_reference(tmp_path, magnitude):
    out = write_ome(tmp_path / "out.zarr", magnitude, scan=None)
    result = rp.report(out)
    # Beside the image, not inside the zarr hierarchy (zarr would warn about a foreign folder).
    assert result.out_dir == Path(out).parent / "out.report" and _is_png(result.figures[0])
    assert not (Path(out) / "report").exists()
    assert result.metrics == [] and "no reference" in result.markdown.read_text()


def test_errors(tmp_path, scan, magnitude):
    with pytest.raises(FileNotFoundError, match="missing"):
        rp.report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*neither a run directory"):
        rp.report(tmp_path / "empty")
    out = write_ome(tmp_path / "a.zarr", magnitude, scan=scan)
    other = write_ome(tmp_path / "b.zarr", magnitude[:, :, :10])
    with pytest.raises(ValueError, match=r"b\.zarr.*\(12, 24, 10\)"):
        rp.report(out, baselines=[other])


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, steps=10)
    parser = argparse.ArgumentParser(prog="recon3d")
    rp.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), "--out", str(tmp_path / "r")])
    assert rp.run_cli(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.md")
    assert _is_png(tmp_path / "r" / "training.png") and _is_png(tmp_path / "r" / "validation.png")


def test_unfinished_reconstruction_is_reported_not_fatal(tmp_path, scan, magnitude):
    import zarr

    out = write_ome(tmp_path / "partial.zarr", magnitude, chunk_depth=4, scan=scan)
    group = zarr.open_group(out, mode="r+")
    group["0"][4:8] = np.nan  # a chunk never written reads as NaN
    group.attrs["recon3d"] = {**group.attrs["recon3d"], "complete": False}
    base = write_ome(tmp_path / "base.zarr", 0.5 * magnitude, scan=scan, method="adjoint")
    result = rp.report(out, baselines=[base])
    md = result.markdown.read_text()
    assert _is_png(result.figures[0])
    assert "is not complete" in md and "No metrics for model" in md and "NaN" in md
    assert [m["volume"] for m in result.metrics] == ["adjoint"]
