"""Issue 13: ``kill -9`` at any point of a writing command, then the same command again.

Each command runs as its own process and is SIGKILLed at two points — as soon as the first chunk
of its output exists, and when about half of them exist — then rerun unchanged. The rerun must
finish (exit 0) and produce exactly the arrays of an uninterrupted run; a scan must pass
``inspect --check``. Training (``tests/launch/test_launch_dist.py``) and reconstruction under
torchrun (``tests/pipeline/reconstruct/test_reconstruct_dist.py``) have their own kill tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.data import check_scan
from reliability_helpers import cli_env

SIM = ["simulate", "ct", "--shape", "24", "48", "48", "--angles", "48", "--chunk-depth", "2", "--seed", "0",
       "--no-progress", "--workers", "1"]
NUM_CHUNKS = 12  # 24 slices in chunks of 2


def _chunks(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and "c" in p.relative_to(folder).parts[:1]) \
        if folder.is_dir() else 0


def _kill_when(args: list[str], chunk_folder: Path, at_least: int, cwd: Path, timeout_s: float = 120.0) -> bool:
    """Run ``recon3d ARGS``; SIGKILL it once ``chunk_folder`` holds ``at_least`` chunks.

    Returns whether the process was killed (False: it finished first).
    """
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _chunks(chunk_folder) >= at_least:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rerun(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _arrays(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][...]) for name in names}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted simulation, its FBP preprocessing and its FBP reconstruction."""
    base = tmp_path_factory.mktemp("reference")
    assert main([*SIM, "--out", str(base / "scan.zarr")]) == 0
    shutil.copytree(base / "scan.zarr", base / "pre.zarr")
    assert main(["preprocess", str(base / "pre.zarr"), "--outputs", "fbp", "--no-progress", "--workers", "1"]) == 0
    assert main(["reconstruct", "--method", "fbp", "--scan", str(base / "scan.zarr"), "--out",
                 str(base / "fbp.ome.zarr"), "--no-progress"]) == 0
    return base


@pytest.mark.parametrize("point", ["first chunk", "half the chunks"])
def test_kill9_simulate_then_rerun(tmp_path, reference, point):
    args = [*SIM, "--out", "scan.zarr"]
    at_least = 1 if point == "first chunk" else NUM_CHUNKS // 2
    killed = _kill_when(args, tmp_path / "scan.zarr" / "measurements", at_least, tmp_path)
    if killed:
        assert not check_scan(tmp_path / "scan.zarr").ok  # never looks complete after a kill
    _rerun(args, tmp_path)
    assert check_scan(tmp_path / "scan.zarr").ok
    names = ["measurements", "reference", "angles"]
    _same(_arrays(tmp_path / "scan.zarr", names), _arrays(reference / "scan.zarr", names))


@pytest.mark.parametrize("point", ["first chunk", "half the chunks"])
def test_kill9_preprocess_then_rerun(tmp_path, reference, point):
    shutil.copytree(reference / "scan.zarr", tmp_path / "scan.zarr")
    args = ["preprocess", "scan.zarr", "--outputs", "fbp", "--no-progress", "--workers", "1"]
    at_least = 1 if point == "first chunk" else NUM_CHUNKS // 2
    _kill_when(args, tmp_path / "scan.zarr" / "derived" / "fbp", at_least, tmp_path)
    _rerun(args, tmp_path)
    assert check_scan(tmp_path / "scan.zarr").ok
    names = ["measurements", "derived/fbp"]
    _same(_arrays(tmp_path / "scan.zarr", names), _arrays(reference / "pre.zarr", names))


@pytest.mark.parametrize("point", ["first chunk", "half the chunks"])
def test_kill9_reconstruct_then_rerun(tmp_path, reference, point):
    args = ["reconstruct", "--method", "fbp", "--scan", str(reference / "scan.zarr"), "--out", "fbp.ome.zarr",
            "--no-progress"]
    at_least = 1 if point == "first chunk" else 3
    _kill_when(args, tmp_path / "fbp.ome.zarr" / "0", at_least, tmp_path)
    _rerun(args, tmp_path)
    _same(_arrays(tmp_path / "fbp.ome.zarr", ["0"]), _arrays(reference / "fbp.ome.zarr", ["0"]))
    got = zarr.open_group(str(tmp_path / "fbp.ome.zarr"), mode="r").attrs.asdict()
    want = zarr.open_group(str(reference / "fbp.ome.zarr"), mode="r").attrs.asdict()
    assert got["ome"] == want["ome"]
    assert got["recon3d"]["fingerprint"] == want["recon3d"]["fingerprint"]
    assert got["recon3d"]["complete"] and want["recon3d"]["complete"]
