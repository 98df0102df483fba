"""Issue 13, point 7: one place maps errors to exit codes and one-line messages.

0 ok, 1 failure, 2 usage or input error; ``--debug`` / ``RECON3D_DEBUG=1`` show the traceback;
a ``--set`` value or a config file with a ``!!python`` tag is refused in one line before
anything runs; a closed output pipe ends the command quietly.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.errors import (InputError, OutputConflictError, Recon3dError, StorageFullError,
                             UntrustedFileError, exit_code, storage_error)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "launch" / "configs" / "ct_n2i.yaml"


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_set_with_python_tag_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    value = f"optimizer.lr=!!python/object/apply:os.system ['touch {marker}']"
    rc = cli.main(["train", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--set", value])
    err = capsys.readouterr().err
    assert rc == 2
    assert not marker.exists()
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert "optimizer.lr" in lines[0] and "!!python/object/apply:os.system" in lines[0]
    assert "not allowed" in lines[0]
    assert not (tmp_path / "run").exists()


def test_config_file_with_python_tag_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad config.yaml"  # a space in the path, too
    bad.write_text(f"run:\n  max_steps: !!python/object/apply:os.system ['touch {marker}']\n")
    rc = cli.main(["train", str(bad), "--run-dir", str(tmp_path / "run")])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and not marker.exists()
    assert len(lines) == 1 and str(bad) in lines[0] and "!!python" in lines[0]


def test_broken_yaml_in_set_names_the_key_and_the_place(tmp_path, capsys):
    rc = cli.main(["train", str(CONFIG), "--run-dir", str(tmp_path / "run"), "--set", "run.max_steps=[1, 2"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1
    assert "run.max_steps" in lines[0] and "line 1" in lines[0]


@pytest.mark.parametrize("how", ["flag", "env", "none"])
def test_unexpected_failure_exit_1_and_traceback_only_when_asked(monkeypatch, capsys, how):
    def boom(args):
        raise RuntimeError("the projector kernel\nfailed")

    monkeypatch.setattr(cli, "_export", boom)
    monkeypatch.delenv("RECON3D_DEBUG", raising=False)
    argv = ["export", "some/run"]
    if how == "flag":
        argv = ["--debug", *argv]
    elif how == "env":
        monkeypatch.setenv("RECON3D_DEBUG", "1")
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    if how == "none":
        lines = _error_lines(err)
        assert lines == ["recon3d export: error: the projector kernel failed "
                         "(--debug or RECON3D_DEBUG=1 shows the traceback)"]
    else:
        assert "Traceback (most recent call last)" in err and "RuntimeError" in err


def test_input_errors_exit_2_without_a_debug_hint(monkeypatch, capsys):
    def refuse(args):
        raise OutputConflictError("out.ome.zarr is a recon3d scan; choose another --out")

    monkeypatch.setattr(cli, "_export", refuse)
    monkeypatch.delenv("RECON3D_DEBUG", raising=False)
    assert cli.main(["export", "r"]) == 2
    assert _error_lines(capsys.readouterr().err) == [
        "recon3d export: error: out.ome.zarr is a recon3d scan; choose another --out"]


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_export", interrupted)
    assert cli.main(["export", "r"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_exit_code_table():
    assert exit_code(InputError("x")) == 2
    assert exit_code(UntrustedFileError("x")) == 2
    assert exit_code(OutputConflictError("x")) == 2
    assert exit_code(ValueError("x")) == 2 and exit_code(FileNotFoundError("x")) == 2
    assert exit_code(Recon3dError("x")) == 1
    assert exit_code(RuntimeError("x")) == 1 and exit_code(OSError("x")) == 1
    full = storage_error(OSError(errno.ENOSPC, "No space left on device"), "/nonexistent/dir/x.pt", 4096)
    assert isinstance(full, StorageFullError) and exit_code(full) == 1
    assert "/nonexistent/dir/x.pt" in str(full) and "4096 bytes needed" in str(full)
    other = OSError(errno.EACCES, "Permission denied")
    assert storage_error(other, "/x") is other


def test_closed_pipe_ends_quietly(tmp_path):
    """``recon3d inspect SCAN | head`` (the reader gone before the writer): no traceback."""
    scan = tmp_path / "scan.zarr"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "simulate", "ct", "--shape", "8", "16", "16",
                    "--angles", "8", "--seed", "0", "--out", str(scan), "--no-progress"],
                   check=True, capture_output=True, env=env, cwd=tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(scan)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode in (0, 141)


def test_debug_reaches_sub_commands_and_leaves_the_environment_as_it_was(tmp_path, monkeypatch, capsys):
    """``--debug`` also shows the traceback of errors a sub-command reports itself (reconstruct,
    the data commands), and ``main()`` called from Python does not leave RECON3D_DEBUG set."""
    monkeypatch.delenv("RECON3D_DEBUG", raising=False)
    rc = cli.main(["--debug", "inspect", str(tmp_path / "missing.zarr")])
    assert rc == 2 and "Traceback (most recent call last)" in capsys.readouterr().err
    assert "RECON3D_DEBUG" not in os.environ
    assert cli.main(["inspect", str(tmp_path / "missing.zarr")]) == 2
    assert "Traceback" not in capsys.readouterr().err
