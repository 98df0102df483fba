"""A rerun never silently restarts (issue 13, point 6): ``recon3d train`` on a run directory that
holds checkpoints is refused unless ``--resume auto`` (continue) or ``--restart`` (start over,
the old checkpoints kept under another name); a resume that changes the schedule says so.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
from reliability_helpers import reset_deepspeed_groups as _reset_deepspeed_groups, scan, tiny_config, train_fixtures, write_config  # noqa: F401



def _cli(*args: str) -> int:
    from pipeline.cli import main

    _reset_deepspeed_groups()
    try:
        return main(["train", *args])
    finally:
        _reset_deepspeed_groups()


def _snapshot(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}


@pytest.fixture
def trained(tmp_path, scan) -> tuple[Path, Path]:
    """A run directory holding checkpoints at steps 3 and 6, and its config."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scan, schedule={"name": "cosine"}))
    run = tmp_path / "run"
    assert _cli(str(cfg), "--run-dir", str(run)) == 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    return run, cfg


def test_rerun_without_resume_is_refused(trained, capsys):
    run, cfg = trained
    before = _snapshot(run)
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _cli(str(cfg), "--run-dir", str(run), "--set", "run.max_steps=9") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"{run} holds checkpoints up to step 6" in err and "--resume auto" in err and "--run-dir" in err
    assert _snapshot(run) == before  # nothing rewritten, not even the log
    assert (run / "metrics.jsonl").read_text() == metrics


def test_refusal_counts_an_interrupted_save(tmp_path, scan):
    """Only a save without its manifest (killed mid-save) is there: still a run's work, refused."""
    from pipeline.errors import InputError
    from pipeline.train import load_config
    from pipeline.train.loop import train

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004" / "recon3d").mkdir(parents=True)
    with pytest.raises(InputError, match="holds checkpoints up to step 4"):
        train(load_config(tiny_config(scan)), run)


def test_restart_moves_the_old_run_aside(trained, capsys):
    run, cfg = trained
    old_manifest = (run / "checkpoints" / "step_00000006" / "recon3d" / "manifest.json").read_text()
    assert _cli(str(cfg), "--run-dir", str(run), "--restart", "--set", "run.max_steps=3") == 0
    assert "--restart: moved" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not (run / "checkpoints" / "step_00000006").exists()
    aside = list(run.glob("checkpoints.replaced-*"))
    assert len(aside) == 1
    assert (aside[0] / "step_00000006" / "recon3d" / "manifest.json").read_text() == old_manifest
    assert len(list(run.glob("metrics.replaced-*.jsonl"))) == 1
    from pipeline.train import read_metrics

    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert _cli(str(cfg), "--run-dir", str(run), "--restart", "--resume", "auto") == 2


def test_resume_with_a_longer_schedule_says_what_changes(trained, capsys):
    run, cfg = trained
    capsys.readouterr()
    assert _cli(str(cfg), "--run-dir", str(run), "--resume", "auto", "--set", "run.max_steps=12") == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "changed settings" in x)
    # Cosine over 6 steps had reached its minimum (0) at step 6; over 12 it is half-way.
    assert "run.max_steps 6 → 12" in line and "decays to 0 at step 12" in line
    assert "lr at step 6 is 0.000429 (was 0)" in line, line
    from pipeline.train import read_metrics

    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))


def test_resume_from_another_run_into_this_one_is_refused(trained, tmp_path, capsys):
    """--resume PATH of another run on top of this run's checkpoints would mix two runs."""
    run, cfg = trained
    other = tmp_path / "other"
    assert _cli(str(cfg), "--run-dir", str(other), "--set", "run.max_steps=3") == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert _cli(str(cfg), "--run-dir", str(run), "--resume", str(other / "checkpoints")) == 2
    assert "another run's checkpoint" in capsys.readouterr().err
    assert _snapshot(run) == before
    # A step of this run itself is allowed: an explicit rewind to step 3, trained on to step 4.
    assert _cli(str(cfg), "--run-dir", str(run), "--resume", str(run / "checkpoints" / "step_00000003"),
                "--set", "run.max_steps=4") == 0
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
