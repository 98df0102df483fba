"""A run without torchrun makes its one-rank process group on a file store in the temp folder;
leaving the group must remove that file (a long-lived machine otherwise collects one per run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

_CHILD = """
import glob, os, tempfile
from pipeline.train.distributed import init_distributed, shutdown_distributed
ctx = init_distributed("cpu")
assert ctx.world_size == 1 and ctx.rank == 0, ctx
made = glob.glob(os.path.join(tempfile.gettempdir(), "recon3d-pg-*"))
assert len(made) == 1, made
shutdown_distributed()
print("LEFT", len(glob.glob(os.path.join(tempfile.gettempdir(), "recon3d-pg-*"))))
"""


def test_one_rank_group_leaves_no_store_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                           "LOCAL_RANK")}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LEFT 0" in out.stdout, out.stdout
    assert not list(tmp_path.glob("recon3d-pg-*"))
