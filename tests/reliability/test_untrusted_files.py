"""Untrusted files never run code (issue 13, point 1): every torch file recon3d reads is read
weights-only, a crafted pickle is refused naming the file, a garbage file gives one line, and
weights with NaN/Inf are refused.

One tiny run (8×16×16 MRI, ZeRO-2, 2 steps) is trained once; each test tampers with a copy.
The crafted pickles would create a marker file if they were ever unpickled normally.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.errors import InputError, UntrustedFileError
from reliability_helpers import cli_env

ROOT = Path(__file__).resolve().parents[2]


class _Marker:
    """A pickle whose unpickling runs ``touch MARKER`` (through ``posix.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _craft(path: Path, marker: Path, *, like: Path | None = None) -> None:
    """Replace ``path`` by a torch file holding what ``like`` held plus a code-running object."""
    body = torch.load(like, weights_only=False) if like is not None else {}
    torch.save({**body, "payload": _Marker(marker)} if isinstance(body, dict) else _Marker(marker), path)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=240, env=cli_env(), cwd=ROOT)


def _error_line(text: str, command: str) -> str:
    """The one error line a command printed (and no traceback)."""
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith(f"recon3d {command}: error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A scan, a config and a 2-step ZeRO-2 run with a complete checkpoint at step 2."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    root = tmp_path_factory.mktemp("untrusted")
    scan = root / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=(8, 16, 16), coils=2, acceleration=4, calibration=4, chunk_depth=2,
                                   seed=0, noise_sigma=0.01, out=str(scan), progress=False))
    cfg = {
        "run": {"max_steps": 2, "seed": 0, "threads": 1},
        "data": {"scans": [str(scan)], "slab_thickness": 2, "num_workers": 0},
        "model": {"widths": [4, 8]},
        "loss": {"terms": [{"name": "mc"}]},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every": 2, "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    cfg["run"]["max_steps"] = 4
    (root / "c4.yaml").write_text(yaml.safe_dump(cfg))
    run = root / "run"
    proc = _cli(["train", str(root / "c.yaml"), "--run-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "scan": str(scan), "run": run, "config": root / "c4.yaml"}


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the trained run."""
    out = tmp_path / "run"
    shutil.copytree(base["run"], out)
    return out


def _step(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_crafted_rank_state_refused_on_resume(base, run, tmp_path):
    """A pickle placed as recon3d/rank_00000.pt: `train --resume auto` refuses it, naming it."""
    marker = tmp_path / "MARKER"
    target = _step(run) / "recon3d" / "rank_00000.pt"
    _craft(target, marker, like=target)
    proc = _cli(["train", str(base["config"]), "--run-dir", str(run), "--resume", "auto"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc.stderr, "train")
    assert f"refusing to load {target}" in line and "'posix.system'" in line
    assert "older" not in line  # the hint for old numpy-pickled rank files is not for this one
    assert not marker.exists()


@pytest.mark.parametrize("command", ["reconstruct", "export", "train"])
def test_crafted_deepspeed_shard_refused(base, run, tmp_path, command, capsys):
    """A pickle placed as DeepSpeed's mp_rank_00_model_states.pt: `reconstruct --model RUN`,
    `export RUN` and `train --resume auto` refuse it (DeepSpeed's own loader included)."""
    from pipeline.cli import main

    marker = tmp_path / "MARKER"
    target = _step(run) / "mp_rank_00_model_states.pt"
    _craft(target, marker, like=target)
    if command == "train":
        proc = _cli(["train", str(base["config"]), "--run-dir", str(run), "--resume", "auto"])
        rc, err = proc.returncode, proc.stderr
    else:
        args = (["export", str(run)] if command == "export" else
                ["reconstruct", "--model", str(run), "--scan", base["scan"], "--out", str(tmp_path / "o.zarr")])
        rc, err = main(args), capsys.readouterr().err
    assert rc == 2, err[-3000:]
    line = _error_line(err, command)
    assert f"refusing to load {target}" in line and "posix.system" in line
    assert not marker.exists()
    assert not (run / "export" / "model.pt").exists()


def test_crafted_universal_file_refused_at_another_world_size(base, run, tmp_path):
    """A pickle placed in the universal checkpoint: resuming at another world size refuses it.

    The run was saved on 1 rank; its manifest is made to say 2, so a 1-rank resume takes the
    universal path (conversion found complete, then DeepSpeed's ``load_universal``) as a real
    2 → 1 resume does, without a 2-process job.
    """
    import json

    from pipeline.train.engine import convert_to_universal

    marker = tmp_path / "MARKER"
    step = _step(run)
    manifest = step / "recon3d" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "world_size": 2}))
    universal = step.with_name(step.name + ".universal")
    convert_to_universal(step, universal / step.name)
    (universal / ".complete").write_text(step.name)
    targets = sorted((universal / step.name / "zero").glob("*/fp32.pt"))
    assert targets
    _craft(targets[0], marker, like=targets[0])
    proc = _cli(["train", str(base["config"]), "--run-dir", str(run), "--resume", "auto"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _error_line(proc.stderr, "train")
    assert f"refusing to load {targets[0]}" in line and "posix.system" in line
    assert not marker.exists()


def test_crafted_export_refused_by_reconstruct(base, tmp_path, capsys):
    """A crafted model.pt: `reconstruct --model FILE` refuses it before building anything."""
    from pipeline.cli import main

    marker = tmp_path / "MARKER"
    model = tmp_path / "model.pt"
    _craft(model, marker)
    rc = main(["reconstruct", "--model", str(model), "--scan", base["scan"], "--out", str(tmp_path / "o.zarr")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"refusing to load {model}" in _error_line(err, "reconstruct")
    assert not marker.exists() and not (tmp_path / "o.zarr").exists()


def _garbage(path: Path, kind: str) -> None:
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a torch file cut in half
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["random", "truncated", "empty"])
def test_garbage_files_give_one_line(base, run, tmp_path, kind, capsys):
    """Garbage as a rank file, a DeepSpeed shard or an export: one line naming the file."""
    from pipeline.cli import main
    from pipeline.train.checkpoint import CheckpointManager, read_checkpoint
    from pipeline.train.distributed import DistContext

    rank_file = _step(run) / "recon3d" / "rank_00000.pt"
    _garbage(rank_file, kind)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    with pytest.raises(UntrustedFileError) as info:
        CheckpointManager(run / "checkpoints", ctx).rank_state(read_checkpoint(run / "checkpoints"), 0)
    text = str(info.value)
    assert f"{rank_file} is not a readable checkpoint" in text and "\n" not in text
    assert "Unsupported operand" not in text

    shard = _step(run) / "mp_rank_00_model_states.pt"
    _garbage(shard, kind)
    assert main(["export", str(run)]) == 2
    line = _error_line(capsys.readouterr().err, "export")
    assert f"{shard} is not a readable checkpoint" in line and "Unsupported operand" not in line

    model = tmp_path / "model.pt"
    _garbage(model, kind)
    assert main(["reconstruct", "--model", str(model), "--scan", base["scan"], "--out", str(tmp_path / "o.zarr")]) == 2
    line = _error_line(capsys.readouterr().err, "reconstruct")
    assert f"{model} is not a readable checkpoint" in line and "Unsupported operand" not in line


def test_nan_weights_refused(base, run, tmp_path, capsys):
    """An export whose weights hold NaN/Inf: reconstruct exits 2 naming the file and parameter;
    load_exported raises InputError."""
    from pipeline.cli import main
    from pipeline.train import export_run, load_exported

    good = export_run(run, tmp_path / "good.pt")
    payload = torch.load(good, weights_only=True)
    name = sorted(k for k, v in payload["state_dict"].items() if v.is_floating_point())[0]
    payload["state_dict"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(InputError, match=name):
        load_exported(bad)
    rc = main(["reconstruct", "--model", str(bad), "--scan", base["scan"], "--out", str(tmp_path / "o.zarr")])
    assert rc == 2
    line = _error_line(capsys.readouterr().err, "reconstruct")
    assert str(bad) in line and name in line and "NaN or Inf" in line
    load_exported(good)  # the finite original still loads


def test_rank_state_round_trip_without_pickle_globals(tmp_path):
    """The per-rank state needs no pickle global and restores every RNG exactly; a rank file
    of the old format (numpy's state tuple pickled) still resumes, and nothing more is allowed."""
    import random

    import numpy as np

    from pipeline.safeload import load
    from pipeline.train.checkpoint import rng_state, set_rng_state

    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    path = tmp_path / "rank.pt"
    torch.save({"rng": state}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    set_rng_state(load(path)["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]

    # A rank file of an older recon3d pickled numpy's state tuple: its arrays (and nothing
    # else) are allowed for rank files, and the state is converted, so old runs still resume.
    from types import SimpleNamespace

    from pipeline.train.checkpoint import OWN, CheckpointManager, CheckpointInfo

    np.random.seed(5)
    np.random.standard_normal()
    legacy = {"step": 4, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                 "python": random.getstate()}}
    folder = tmp_path / "checkpoints" / "step_00000004" / OWN
    folder.mkdir(parents=True)
    torch.save(legacy, folder / "rank_00000.pt")
    manager = CheckpointManager(tmp_path / "checkpoints", SimpleNamespace(rank=0, world_size=1, is_main=True))
    info = CheckpointInfo(tmp_path / "checkpoints", "step_00000004", {"step": 4, "world_size": 1})
    want = np.random.standard_normal(3)
    set_rng_state(manager.rank_state(info, 0)["rng"])
    assert np.array_equal(np.random.standard_normal(3), want)

    # The numpy allowance is only for arrays: an old-looking file that also asks for a
    # callable is refused, naming the file and the global, with the older-recon3d hint.
    class Sneaky:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save(dict(legacy, extra=Sneaky()), folder / "rank_00000.pt")
    with pytest.raises(UntrustedFileError, match="print") as info_err:
        manager.rank_state(info, 0)
    assert "rank_00000.pt" in str(info_err.value)


def test_allow_list_covers_deepspeed_files_and_nothing_runs_code(base):
    """Every global a real ZeRO-2 checkpoint needs is in the allow-list (so resume keeps
    working), and the allow-list names exactly the classes it registers, none of them callable
    in a way that runs code (no functions, no builtins)."""
    import inspect

    from pipeline.safeload import ALLOWED, _allowed, load

    files = sorted(base["run"].rglob("*.pt"))
    assert any("optim_states" in f.name for f in files)
    needed = set()
    for f in files:
        needed |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        load(f)
    assert needed <= set(ALLOWED) and needed
    classes = _allowed()
    assert {f"{c.__module__}.{c.__qualname__}" for c in classes} == set(ALLOWED)
    assert all(inspect.isclass(c) and "__setstate__" not in vars(c) and "__reduce__" not in vars(c) for c in classes)


def test_pickle_globals_names_stack_global_of_protocol_5(tmp_path):
    """A crafted file written with pickle protocol 5 (STACK_GLOBAL, memoised strings) is named too."""
    import pickle

    from pipeline.safeload import load, pickle_globals

    path = tmp_path / "p5.pt"
    marker = tmp_path / "MARKER"
    path.write_bytes(pickle.dumps([_Marker(marker), _Marker(marker)], protocol=5))
    assert pickle_globals(path) == ["posix.system"]
    with pytest.raises(UntrustedFileError, match="'posix.system'"):
        load(path)
    assert not marker.exists()


def test_any_damage_is_one_refusal(tmp_path):
    """300 damaged files (random bytes, flipped bytes, cut anywhere): each is read fine or
    refused with UntrustedFileError, never another exception (IndexError, BadZipFile, ...)."""
    from pipeline.safeload import load

    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(50.0), "meta": [1, 2.0, "x"], "n": {"i": torch.ones(3, dtype=torch.int64)}}, good)
    data = good.read_bytes()
    rng = random.Random(0)
    path = tmp_path / "bad.pt"
    for i in range(300):
        if i % 3 == 0:
            damaged = rng.randbytes(rng.choice([1, 7, 100, 4096]))
        elif i % 3 == 1:
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        else:
            damaged = data[: rng.randrange(len(data))]
        path.write_bytes(bytes(damaged))
        try:
            load(path)
        except UntrustedFileError as err:
            assert str(path) in str(err) and "\n" not in str(err)
