"""Ctrl-C (SIGINT) on a training run saves it at the next step and exits 0, like SIGTERM: a new
user's interrupt of a long CPU job loses nothing, and the stop is reported with a real time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, _env, tiny_config, write_config


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def test_ctrl_c_saves_at_the_next_step_and_exits_zero(tmp_path, tiny_mri):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tiny_mri, run={"max_steps": 500},
                                                        checkpoint={"every": 1000, "keep_last": 2}))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--run-dir", str(run)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not any(r.get("step", 0) >= 2 and "loss" in r for r in _records(run)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGINT" in err and "nan s" not in err, err[-3000:]
    stop = [r for r in _records(run) if r.get("event") == "stop"]
    assert len(stop) == 1 and 0 <= stop[0]["seconds_after_signal"] < 60
    step = stop[0]["step"]
    assert 2 <= step < 500
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
