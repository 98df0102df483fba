"""Workers notice a dead torchrun agent (issue 13, point 8): SIGKILL of the agent alone makes
both workers save at the next step boundary and exit, and ``--resume auto`` continues from that
save (so a retry launcher never finds two jobs in one run directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
from reliability_helpers import scan, tiny_config, train_fixtures, write_config  # noqa: F401



def _steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "event" not in rec:
            out.append(rec["step"])
    return out


def _workers(agent: psutil.Process) -> list[psutil.Process]:
    try:
        return agent.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_sigkill_of_the_agent_stops_the_workers_after_a_save(tmp_path, scan):
    from pipeline.train.checkpoint import read_checkpoint

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scan, run={"max_steps": 100000},
                                                        checkpoint={"every": 100000}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "-m", "pipeline.cli", "train", str(cfg), "--run-dir", str(run)]
    log = open(tmp_path / "job.log", "w")
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=train_fixtures._env(), cwd=ROOT,
                             start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while len(_steps(run / "metrics.jsonl")) < 3:
            assert agent.poll() is None, (tmp_path / "job.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no training steps within 90 s"
            time.sleep(0.2)
        workers = _workers(psutil.Process(agent.pid))
        assert len(workers) == 2, workers
        assert not (run / "checkpoints").exists()  # nothing saved before the kill
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers still running 30 s after the agent died: {alive}"
        text = (tmp_path / "job.log").read_text()
        assert "torchrun agent" in text, text[-4000:]
        info = read_checkpoint(run / "checkpoints")  # complete: manifest and `latest` written
        assert info.step >= 3 and info.world_size == 2
        assert any('"event": "stop"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    finally:
        # Never leave a training job behind, whatever failed above.
        extra = _workers(psutil.Process(agent.pid)) if agent.poll() is None else []
        for p in [*workers, *extra]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
        log.close()

    # ... and the run continues from that save.
    proc = train_fixtures.run_job(2, ["train", str(cfg), "--run-dir", str(run), "--resume", "auto",
                                      "--set", f"run.max_steps={info.step + 1}"], timeout=120)
    assert f"resumed from {info.path}" in proc.stderr
    assert _steps(run / "metrics.jsonl") == list(range(1, info.step + 2))
