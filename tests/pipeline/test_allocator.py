"""pipeline.allocator: the glibc settings of training and reconstruction jobs, each checked in
its own process (they are process-wide) by what happens to the RSS when a large tensor is
freed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from pipeline import allocator

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

took = getattr(allocator, sys.argv[1])() if sys.argv[1] != "none" else None
before = rss()
x = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB, touched
held = rss() - before
del x
kept = rss() - before
print(json.dumps({"took": took, "held": held, "kept": kept}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")


def _child(mode: str, **env) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_keeps_freed_blocks_reconstruction_returns_them():
    mib = 1 << 20
    keep = _child("keep_freed_memory")
    assert keep["took"] is True and keep["held"] > 90 * mib
    assert keep["kept"] > 90 * mib  # still resident: the next step reuses it without faults
    lean = _child("return_freed_memory_to_os")
    assert lean["took"] is True and lean["held"] > 90 * mib
    assert lean["kept"] < 8 * mib  # unmapped at once
    default = _child("keep_freed_memory", RECON3D_MALLOC="default")
    assert default["took"] is False and default["kept"] < 8 * mib  # glibc's default: mmap'd, returned
