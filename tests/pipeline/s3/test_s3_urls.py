"""URLs against a real S3 server (moto on 127.0.0.1, started by the tests): the commands that
read and write scans and images give on ``s3://`` what they give on a local disk, with
``--storage-options`` or ``$RECON3D_STORAGE_OPTIONS``; ``reconstruct --model s3://…`` fetches an
exported weights file; the local-only arguments refuse an ``s3://`` URL and write nothing,
neither in the working folder nor in the bucket."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("reconstruct_helpers",
                                               ROOT / "tests/pipeline/reconstruct/reconstruct_helpers.py")
reconstruct_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reconstruct_helpers)

SIMULATE = ["simulate", "ct", "--shape", "4", "24", "24", "--angles", "12", "--photons", "1e4",
            "--phantom", "shepp-logan", "--workers", "1", "--no-progress"]
RECONSTRUCT = ["reconstruct", "--workers", "1", "--no-progress"]
# zarr meets nothing it does not know in a scan or an image (the completion records are groups)
pytestmark = pytest.mark.filterwarnings("error:Object at .* is not recognized as a component:UserWarning")
# what differs between the metrics of two runs besides their values: the paths, the time taken
_NOT_VALUES = ("out", "reference", "seconds")


def _arrays(target: str, options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Every array of a zarr group (a scan, an OME-Zarr image), by path."""
    group = zarr.open_group(target, mode="r", storage_options=options)
    return {name: np.asarray(a[...]) for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def _assert_same_arrays(remote: dict[str, np.ndarray], local: dict[str, np.ndarray]) -> None:
    assert local and sorted(remote) == sorted(local)
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)


def _commands(scan: str, out: str, metrics: Path, capsys, extra: list[str]) -> dict[str, Any]:
    """simulate, inspect, reconstruct (FBP) and evaluate on ``scan`` and ``out``, each with the
    arguments ``extra``: the inspect text (paths and time left out) and the metrics (likewise)."""
    assert main([*SIMULATE, "--out", scan, *extra]) == 0
    capsys.readouterr()
    assert main(["inspect", scan, *extra]) == 0
    text = capsys.readouterr().out.replace(scan, "SCAN")
    assert main([*RECONSTRUCT, "--method", "fbp", "--scan", scan, "--out", out, *extra]) == 0
    assert main(["evaluate", out, "--reference", scan, "--workers", "1", "--json", str(metrics), *extra]) == 0
    values = {k: v for k, v in json.loads(metrics.read_text()).items() if k not in _NOT_VALUES}
    return {"inspect": [line for line in text.splitlines() if "made_by" not in line], "metrics": values}


@pytest.mark.parametrize("given", ["flag", "environment"])
def test_commands_on_s3_equal_a_local_disk(given, s3, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RECON3D_STORAGE_OPTIONS", raising=False)
    local = _commands(str(tmp_path / "scan.zarr"), str(tmp_path / "out.zarr"), tmp_path / "local.json", capsys, [])
    if given == "flag":
        extra = ["--storage-options", s3.options_json]
    else:
        extra = []
        monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    scan, out = s3.url("scan.zarr"), s3.url("out.zarr")
    remote = _commands(scan, out, tmp_path / "remote.json", capsys, extra)

    assert remote == local
    assert remote["metrics"]["psnr"] > 10 and "measurements" in "\n".join(remote["inspect"])
    _assert_same_arrays(_arrays(scan, s3.options), _arrays(str(tmp_path / "scan.zarr")))
    _assert_same_arrays(_arrays(out, s3.options), _arrays(str(tmp_path / "out.zarr")))
    assert not (tmp_path / "s3:").exists()


def test_model_url_on_s3_equals_the_local_file(s3, tmp_path, monkeypatch):
    monkeypatch.delenv("RECON3D_STORAGE_OPTIONS", raising=False)
    scan = str(tmp_path / "scan.zarr")
    assert main([*SIMULATE, "--out", scan]) == 0
    weights = reconstruct_helpers.save_model(tmp_path / "model.pt", "ct", widths=[4, 8], initial="fbp")
    s3.fs.put_file(str(weights), f"{s3.name}/model.pt")
    local, remote = str(tmp_path / "local.ome.zarr"), str(tmp_path / "remote.ome.zarr")
    assert main([*RECONSTRUCT, "--model", str(weights), "--scan", scan, "--out", local]) == 0
    assert main([*RECONSTRUCT, "--model", s3.url("model.pt"), "--scan", scan, "--out", remote,
                 "--storage-options", s3.options_json]) == 0
    _assert_same_arrays(_arrays(remote), _arrays(local))
    assert s3.keys() == [f"{s3.name}/model.pt"]


@pytest.mark.parametrize("argv, named", [
    (["train", "CONFIG", "--run-dir", "s3://BUCKET/run"], "train --run-dir"),
    (["export", "run", "--out", "s3://BUCKET/model.pt"], "export --out"),
    (["report", "s3://BUCKET/out.zarr", "--out", "s3://BUCKET/report"], "report --out"),
    (["evaluate", "s3://BUCKET/out.zarr", "--reference", "s3://BUCKET/scan.zarr", "--json",
      "s3://BUCKET/metrics.json"], "evaluate --json"),
    (["ingest", "mri", "s3://BUCKET/kspace.dat", "--out", "s3://BUCKET/scan.zarr"], "ingest SOURCE"),
])
def test_local_only_arguments_refuse_s3_and_write_nothing(argv, named, s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = ROOT / "launch" / "configs" / "ct_rei.yaml"
    argv = [str(config) if a == "CONFIG" else a.replace("BUCKET", s3.name) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--storage-options", s3.options_json])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "must be a local path" in err and f"got the URL 's3://{s3.name}/" in err
    assert not list(tmp_path.iterdir()), "a refused URL left something in the working folder"
    assert s3.keys() == [], "a refused command wrote in the bucket"
