"""Fixtures of the training tests: a tiny simulated MRI scan, configs, and launchers.

Multi-process runs go through ``torchrun --standalone`` (a free port of its own choosing), as
users launch them; single-process runs through ``python -m pipeline.cli``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


@pytest.fixture(scope="session")
def tiny_mri(tmp_path_factory) -> str:
    """An 8×32×32 MRI scan, 4 coils, chunks of 2 slices."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scans") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=(8, 32, 32), coils=4, acceleration=4, calibration=8,
                                   chunk_depth=2, seed=0, noise_sigma=0.01, out=str(out),
                                   progress=False))
    return str(out)


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> str:
    """An 8×24×24 parallel-beam CT scan, 24 angles, Gaussian noise, chunks of 2 rows."""
    from pipeline.data import SimulateCTConfig, simulate_ct

    out = tmp_path_factory.mktemp("scans") / "ct.zarr"
    simulate_ct(SimulateCTConfig(shape=(8, 24, 24), angles=24, phantom="foam", noise_sigma=0.01,
                                 chunk_depth=2, seed=0, out=str(out), progress=False))
    return str(out)


def tiny_config(scan: str, **sections) -> dict:
    """A config that trains a 2-level U-Net of widths [4, 8] with MC + EI for 6 steps."""
    cfg = {
        "run": {"max_steps": 6, "seed": 0, "threads": 1},
        "data": {"scans": [scan], "slab_thickness": 2, "num_workers": 0},
        "model": {"widths": [4, 8]},
        "loss": {"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate90"}]},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": 2, "stage3_param_persistence_threshold": 0},
        "checkpoint": {"every": 3, "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_job(nproc: int, args: list[str], *, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    """``recon3d ARGS`` on ``nproc`` ranks (torchrun when ``nproc`` > 1)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=0", "-m", "pipeline.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-6000:]}")
    return proc


def run_driver(nproc: int, args: list[str], *, timeout: float = 240) -> None:
    """The test driver (``_driver.py``) on ``nproc`` ranks."""
    driver = str(HERE / "_driver.py")
    if nproc == 1:
        cmd = [sys.executable, driver, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=0", driver, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-6000:]}")
