"""Issue 13's table: bad command-line values and paths with spaces.

Every bad value ends with exit status 2 and one line ``recon3d COMMAND: error: ...`` that names
what to change (never a traceback), and nothing is written; a whole chain of commands works in
folders whose names hold spaces.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[2]
CT = "simulate ct --shape 8 16 16 --angles 8 --seed 0 --no-progress"
BAD = [
    ("simulate ct --shape 0 16 16 --angles 8 --out x.zarr", "positive sizes"),
    ("simulate ct --shape 8 16 16 --angles -3 --out x.zarr", "--angles"),
    ("simulate ct --shape 8 16 16 --angles 8 --chunk-depth 0 --out x.zarr", "--chunk-depth"),
    ("simulate ct --shape 8 16 16 --angles 8 --photons -1 --out x.zarr", "--photons"),
    ("simulate ct --shape 8 16 16 --angles 8 --clevel 42 --out x.zarr", "clevel"),
    ("simulate mri --shape 8 16 16 --acceleration 0.5 --out x.zarr", "--acceleration"),
    ("inspect missing.zarr", "missing.zarr"),
    ("reconstruct --method fbp --scan missing.zarr --out o.ome.zarr", "missing.zarr"),
    ("reconstruct --method fbp --scan SCAN --out o.ome.zarr --pyramid -1", "--pyramid"),
    ("reconstruct --method sense --scan SCAN --out o.ome.zarr", "for MRI scans"),
    ("reconstruct --model missing_run --scan SCAN --out o.ome.zarr", "missing_run"),
    ("evaluate missing.ome.zarr --reference SCAN", "missing.ome.zarr"),
    ("evaluate SCAN --reference SCAN", "not an OME-Zarr image"),
    ("train missing.yaml", "missing.yaml"),
    (f"train {ROOT}/launch/configs/ct_n2i.yaml --set data.slab_thickness=-1", "data.slab_thickness"),
    (f"train {ROOT}/launch/configs/ct_n2i.yaml --set optimizer.lr", "key.path=value"),
    (f"train {ROOT}/launch/configs/ct_n2i.yaml --set optimizer.nonsense=1", "optimizer.nonsense"),
    ("export missing_run", "missing_run"),
    ("report missing", "missing"),
]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad values") / "a scan.zarr"
    assert main([*shlex.split(CT), "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("command, names", BAD, ids=[c.split(" --out")[0][:60] for c, _ in BAD])
def test_bad_value_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, scan, command, names):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECON3D_DEBUG", raising=False)
    argv = [str(scan) if word == "SCAN" else word for word in shlex.split(command)]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"recon3d {argv[0]}: error: "), err
    assert names in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_chain_in_folders_with_spaces(tmp_path, capsys):
    base = tmp_path / "my scans" / "sample 1"
    scan, out, report = base / "a scan.zarr", base / "fbp out.ome.zarr", base / "the report"
    assert main([*shlex.split(CT), "--out", str(scan)]) == 0
    assert main(["inspect", str(scan), "--check"]) == 0
    assert main(["reconstruct", "--method", "fbp", "--scan", str(scan), "--out", str(out), "--no-progress"]) == 0
    assert main(["evaluate", str(out), "--reference", str(scan)]) == 0
    assert main(["report", str(out), "--out", str(report)]) == 0
    assert (report / "report.md").is_file()
    assert "PSNR" in capsys.readouterr().out
