"""Chatter goes to stderr as whole lines (a log file is never wrapped at 80 columns), results to
stdout, and redirections made after the first message still see the next ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.log import say

ROOT = Path(__file__).resolve().parents[2]


def test_a_long_message_is_one_line_on_stderr(capsys):
    message = "recon3d " + "x" * 300
    say(message)
    out, err = capsys.readouterr()
    assert out == "" and err == message + "\n"
    say("again")  # a new capture (another sys.stderr) still receives it
    assert capsys.readouterr().err == "again\n"


def test_a_command_in_a_log_file_writes_unwrapped_lines(tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "scan.zarr"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "simulate", "ct", "--shape", "2", "16", "16",
                           "--angles", "8", "--no-progress", "--out", str(deep)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if str(deep) in line]
    assert len(lines) == 1 and len(lines[0]) > 120, proc.stderr
