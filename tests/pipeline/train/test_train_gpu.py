"""The CUDA path of training and reconstruction: NCCL process group, bf16 under DeepSpeed,
checkpoint and resume on the GPU, export read back on the CPU, a whole-scan reconstruction on
the GPU equal to the CPU one. Skipped where no CUDA device is present (``gpu`` marker)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_job, tiny_config, write_config

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_training_checkpoints_resumes_and_exports(tmp_path, tiny_mri, precision):
    from pipeline.data import open_scan
    from pipeline.train import load_exported, read_metrics

    cfg = tiny_config(tiny_mri, run={"device": "cuda", "max_steps": 6},
                      deepspeed={"precision": precision})
    path = write_config(tmp_path / "c.yaml", cfg)
    run = tmp_path / "run"
    # Three steps, then a resumed job to six: the step counter and the stream continue.
    run_job(1, ["train", str(path), "--run-dir", str(run), "--set", "run.max_steps=3"])
    run_job(1, ["train", str(path), "--run-dir", str(run), "--resume", "auto"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in events if e.get("event") == "start"]
    assert len(starts) == 2 and all(e["backend"] == "nccl" and e["device"].startswith("cuda")
                                    and e["precision"] == precision for e in starts)
    assert any(e.get("event") == "resume" for e in events)
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps[-1] == 6 and sorted(set(steps)) == list(range(1, 7))
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert all(torch.isfinite(torch.tensor(losses)))
    resolved = (run / "config.resolved.yaml").read_text()
    assert "cuda" in resolved

    run_job(1, ["export", str(run)])
    model = load_exported(run / "export" / "model.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    y, op = open_scan(tiny_mri).slab(slice(0, 2))
    with torch.no_grad():
        cpu = model(y[None], op)
        gpu = model.cuda()(y[None].cuda(), op.to("cuda")).cpu()
    assert torch.allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * float(cpu.abs().max()))


def test_cuda_reconstruction_equals_cpu(tmp_path, tiny_mri):
    import numpy as np
    import zarr

    cfg = tiny_config(tiny_mri, run={"device": "cuda", "max_steps": 2})
    run = tmp_path / "run"
    run_job(1, ["train", str(write_config(tmp_path / "c.yaml", cfg)), "--run-dir", str(run)])
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.ome.zarr"
        run_job(1, ["reconstruct", "--model", str(run), "--scan", tiny_mri, "--out", str(out),
                    "--device", device])
        outs[device] = np.asarray(zarr.open_group(str(out), mode="r")["0"][...])
    scale = float(np.abs(outs["cpu"]).max())
    assert np.allclose(outs["cuda"], outs["cpu"], rtol=1e-3, atol=1e-4 * scale)
    report = run_job(1, ["evaluate", str(tmp_path / "cuda.ome.zarr"), "--reference", tiny_mri])
    assert "psnr" in report.stdout.lower()
    json.dumps(report.stdout)
