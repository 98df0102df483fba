"""``recon3d reconstruct`` in several processes: two ranks (RANK/WORLD_SIZE, as torchrun sets
them) equal the whole volume; a SIGKILL mid-run, then a rerun, equals an uninterrupted run."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.reconstruct import ReconstructConfig, completion_records, open_ome, reconstruct, validate_ome
from reconstruct_helpers import MRI_SHAPE, ROOT, command, env, save_model, whole_volume

UNET = dict(widths=[4, 8])


def _args(scan: str, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["--model", str(weights), "--scan", scan, "--out", str(out), "--slab", "4", "--chunks", "2", "8", "8",
            "--pyramid", "2", "--scheduler", "sync", "--no-progress", *extra]


def test_two_ranks_equal_the_whole_volume(tmp_path, mri_scan):
    weights = save_model(tmp_path / "m.pt", "mri", **UNET)
    out = tmp_path / "two.ome.zarr"
    procs = []
    for rank in (1, 0):  # rank 1 first: it must wait for rank 0 to prepare the output
        e = env()
        e.update(RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen(command(_args(mri_scan, out, weights)), env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-4000:]
    records = completion_records(str(out))
    assert sorted(records) == list(range(6))
    assert {i: r["rank"] for i, r in records.items()} == {i: i % 2 for i in range(6)}
    got = torch.from_numpy(np.asarray(open_ome(str(out))[:]))
    torch.testing.assert_close(got, whole_volume(weights, mri_scan).abs(), rtol=1e-5, atol=1e-6)
    assert validate_ome(str(out)) == []
    assert dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]["complete"] is True


def _chunk_files(out: Path) -> dict[str, tuple[int, int]]:
    files = {}
    for name in ("0", "complex"):
        for f in (out / name / "c").rglob("*"):
            if f.is_file():
                st = f.stat()
                files[str(f.relative_to(out))] = (st.st_ino, st.st_mtime_ns)
    return files


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, mri_scan):
    weights = save_model(tmp_path / "m.pt", "mri", **UNET)
    out = tmp_path / "k.ome.zarr"
    # Killed while about to record its third slab: two slabs recorded, the third's chunks
    # written but not recorded.
    proc = subprocess.run(command(_args(mri_scan, out, weights), driver=["2"]), env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    before = completion_records(str(out))
    assert len(before) == 2
    files_before = _chunk_files(out)
    rows = {z // 2 for r in before.values() for z in range(*r["d"])}  # chunk rows of recorded slabs
    recorded = {k for k in files_before if int(k.split("/")[2]) in rows}
    assert len(recorded) == 2 * 4 * 2 * 2  # 2 arrays x 4 chunk rows x (2 x 2) chunks in (y, x)
    assert dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]["complete"] is False

    result = reconstruct(ReconstructConfig(scan=mri_scan, out=str(out), model=str(weights), slab=4,
                                           chunks=(2, 8, 8), pyramid=2, scheduler="sync", progress=False))
    assert result.state == "resumed" and result.slabs_run == 4
    after = completion_records(str(out))
    assert sorted(after) == list(range(6))
    assert all(after[i] == before[i] for i in before)  # recorded slabs were not run again
    files_after = _chunk_files(out)
    assert all(files_after[k] == files_before[k] for k in recorded)  # nor their chunks rewritten
    assert len(files_after) == 2 * (MRI_SHAPE[0] // 2) * 2 * 2  # every chunk exists
    got = torch.from_numpy(np.asarray(open_ome(str(out))[:]))
    torch.testing.assert_close(got, whole_volume(weights, mri_scan).abs(), rtol=1e-5, atol=1e-6)
    assert validate_ome(str(out)) == []


def test_dask_distributed_workers_equal_the_threaded_run(tmp_path, mri_scan):
    """--scheduler distributed: slabs run in worker processes of the active dask client (the
    model, the scan's intensity scale and the output store travel to them)."""
    from distributed import Client, LocalCluster

    weights = save_model(tmp_path / "m.pt", "mri", **UNET)
    common = dict(scan=mri_scan, model=str(weights), slab=4, chunks=(2, 8, 8), pyramid=2, progress=False)
    reconstruct(ReconstructConfig(out=str(tmp_path / "threads"), scheduler="threads", workers=2, **common))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        result = reconstruct(ReconstructConfig(out=str(tmp_path / "dist"), scheduler="distributed", **common))
    assert result.complete and result.slabs_run == 6
    for level in (0, 1):
        np.testing.assert_array_equal(open_ome(str(tmp_path / "dist"), level)[:],
                                      open_ome(str(tmp_path / "threads"), level)[:])
    assert {r["rank"] for r in completion_records(str(tmp_path / "dist")).values()} == {0}
