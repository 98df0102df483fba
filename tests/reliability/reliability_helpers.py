"""Shared by the cases of ``tests/reliability``: the environment of a ``recon3d`` subprocess, the
tiny-config helpers of ``tests/pipeline/train/conftest.py``, a tiny MRI scan, and DeepSpeed's
cached process groups put back between in-process runs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("train_fixtures", ROOT / "tests/pipeline/train/conftest.py")
train_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_fixtures)
tiny_config, write_config = train_fixtures.tiny_config, train_fixtures.write_config

def cli_env() -> dict[str, str]:
    """The environment of a ``python -m pipeline.cli`` child: this checkout first on the path,
    one thread, and no torchrun variables leaking in from a launcher."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


_GROUPS_INITIAL: dict = {}


def reset_deepspeed_groups() -> None:
    """Several DeepSpeed engines in one process: DeepSpeed caches its process groups in module
    globals, which point at a destroyed group once a run has called ``destroy_process_group``;
    put them back as they were before any engine."""
    from deepspeed.utils import groups

    if not _GROUPS_INITIAL:
        _GROUPS_INITIAL.update({k: v for k, v in vars(groups).items() if k.startswith("_") and k[1:2].isupper()
                                and (v is None or v == {})})
    for k, v in _GROUPS_INITIAL.items():
        setattr(groups, k, {} if isinstance(v, dict) else v)


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    """An 8×16×16 MRI scan, 2 coils, chunks of 2 slices."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    out = tmp_path_factory.mktemp("scans") / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=(8, 16, 16), coils=2, acceleration=4, calibration=4, chunk_depth=2,
                                   seed=0, noise_sigma=0.01, out=str(out), progress=False))
    return str(out)
