"""``recon3d preprocess`` outputs and resume, and the data sub-commands end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data import PreprocessConfig, ScanError, check_scan, open_scan, preprocess


def _pre(path, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("scheduler", "sync")
    return preprocess(PreprocessConfig(scan=path, progress=False, **kw))


def test_mri_adjoint_and_sense(copy_scan, mri_scan):
    path = copy_scan(mri_scan)
    assert _pre(path, outputs=("adjoint", "sense"), sense_iters=3) == {"adjoint": "created", "sense": "created"}
    scan = open_scan(path)
    y, op = scan.slab(slice(4, 6))
    assert torch.allclose(scan.derived("adjoint").read_torch(slice(4, 6)), op.adjoint(y), atol=1e-6)
    assert scan.derived("sense").dtype == np.complex64
    assert _pre(path, outputs=("adjoint",)) == {"adjoint": "already complete"}
    with pytest.raises(ScanError, match="other parameters"):
        _pre(path, outputs=("sense",), sense_iters=4)
    with pytest.raises(ScanError, match="not one of"):
        _pre(path, outputs=("fbp",))


def test_ct_fbp_and_n2i_match_the_operators(copy_scan, ct_scan):
    from operators3d.ct import fbp

    path = copy_scan(ct_scan)
    _pre(path, n2i_splits=3)
    scan = open_scan(path)
    y, op = scan.slab(slice(2, 4))
    assert torch.allclose(scan.derived("fbp").read_torch(slice(2, 4)), fbp(y, op), atol=1e-5)
    n2i = scan.derived("n2i").read_torch(slice(2, 4))
    assert n2i.shape == (3, 2, 20, 20)
    assert torch.allclose(n2i[1], fbp(y[:, 1::3], op.subset(slice(1, None, 3))), atol=1e-5)


def test_interrupted_preprocess_is_reported_and_resumes(copy_scan, mri_scan, monkeypatch):
    from operators3d import MultiCoilMRI

    path = copy_scan(mri_scan)
    original = MultiCoilMRI.adjoint
    calls = {"n": 0}

    def flaky(self, y):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, y)

    monkeypatch.setattr(MultiCoilMRI, "adjoint", flaky)
    with pytest.raises(KeyboardInterrupt):
        _pre(path)
    problems = check_scan(path).problems
    assert any("derived/adjoint': incomplete" in p for p in problems), problems
    assert open_scan(path).derived_names() == []
    monkeypatch.setattr(MultiCoilMRI, "adjoint", original)
    assert _pre(path) == {"adjoint": "resumed"}
    assert check_scan(path).ok and open_scan(path).derived_names() == ["adjoint"]


def test_cli_simulate_inspect_preprocess(tmp_path, capsys):
    ct = str(tmp_path / "ct.zarr")
    rc = main(["simulate", "ct", "--shape", "4", "16", "16", "--angles", "12", "--phantom", "foam",
               "--photons", "1e4", "--seed", "3", "--out", ct, "--no-progress", "--chunk-depth", "2"])
    assert rc == 0, capsys.readouterr().err
    mri = str(tmp_path / "mri.zarr")
    rc = main(["simulate", "mri", "--shape", "4", "16", "16", "--coils", "2", "--acceleration", "2",
               "--calibration", "6", "--phantom", "ellipsoids", "--noise-sigma", "0.01", "--seed", "0",
               "--out", mri, "--no-progress", "--codec", "lz4", "--checksum"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["inspect", ct, "--check", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "parallel beam, 12 angles" in out and "transmission_poisson" in out
    assert main(["inspect", mri, "--json"]) == 0
    assert '"acceleration"' in capsys.readouterr().out
    assert main(["preprocess", ct, "--outputs", "fbp", "--no-progress"]) == 0
    assert main(["preprocess", mri, "--no-progress"]) == 0
    assert open_scan(ct).derived_names() == ["fbp"] and open_scan(mri).derived_names() == ["adjoint"]
    assert main(["simulate", "mri", "--shape", "4", "16", "16", "--acceleration", "0.5", "--out",
                 str(tmp_path / "bad.zarr"), "--no-progress"]) == 2
    assert "--acceleration must be >= 1" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.zarr")]) == 2
