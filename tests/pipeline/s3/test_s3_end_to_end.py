"""Object storage end to end, against a local S3 server (moto on 127.0.0.1, started by the tests):
simulate → train on 2 ranks (torchrun; scans and validation scans on s3://, checkpoints mirrored
to s3://) → export → reconstruct --model s3://…/model.pt → evaluate, every scan and output on
s3://; the run directory is the only local folder (DeepSpeed's)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.train.checkpoint import tag_of

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


def _recon3d(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """``recon3d ARGS`` in a child process (torchrun on ``nproc`` ranks), the environment (AWS
    variables, ``RECON3D_STORAGE_OPTIONS``) passed on."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=0", "-m", "pipeline.cli", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="training needs deepspeed")
def test_simulate_train_export_reconstruct_evaluate_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    scan, held_out = s3.url("scans/train.zarr"), s3.url("scans/val.zarr")
    for url, seed in ((scan, 0), (held_out, 1)):
        _recon3d(["simulate", "mri", "--shape", "8", "32", "32", "--coils", "4", "--acceleration", "4",
                  "--calibration", "8", "--chunk-depth", "2", "--seed", str(seed), "--noise-sigma", "0.01",
                  "--workers", "1", "--no-progress", "--out", url])
    mirror = s3.url("run-mirror")
    config = {
        "run": {"max_steps": 4, "seed": 0},
        "data": {"scans": [scan], "slab_thickness": 2, "num_workers": 0},
        "validation": {"scans": [held_out], "every": 2, "max_slabs": 1},
        "model": {"widths": [4, 8]},
        "loss": {"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate90"}]},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every": 2, "keep_last": 1, "mirror": mirror},
        "logging": {"progress": False, "tensorboard": False},
    }
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    _recon3d(["train", str(tmp_path / "experiment.yaml"), "--run-dir", str(run)], nproc=2)

    # the mirror: `latest` names the last save, whose folder is whole; older copies pruned
    last = tag_of(4)
    assert s3.fs.cat_file(f"{s3.name}/run-mirror/latest").decode() == last
    mirrored = {k.split("/", 2)[2] for k in s3.keys() if k.startswith(f"{s3.name}/run-mirror/")}
    local = {p.relative_to(run / "checkpoints").as_posix() for p in (run / "checkpoints" / last).rglob("*")
             if p.is_file()}
    assert local and {f"{last}/{p.split('/', 1)[1]}" for p in local} <= mirrored
    assert not any(k.startswith(tag_of(2)) for k in mirrored) and "latest" in mirrored
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("what") == "checkpoint_mirror"]

    _recon3d(["export", str(run), "--out", str(tmp_path / "model.pt")])
    s3.fs.put_file(str(tmp_path / "model.pt"), f"{s3.name}/models/model.pt")
    out = s3.url("recon/val.ome.zarr")
    _recon3d(["reconstruct", "--model", s3.url("models/model.pt"), "--scan", held_out, "--out", out,
              "--workers", "1", "--no-progress"])
    _recon3d(["evaluate", out, "--reference", held_out, "--workers", "1", "--json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["psnr"] > 5 and metrics["ssim"] > 0
    assert f"{s3.name}/recon/val.ome.zarr/zarr.json" in s3.keys()
    assert not (tmp_path / "s3:").exists() and not (ROOT / "s3:").exists()
