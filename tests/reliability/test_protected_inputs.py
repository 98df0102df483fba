"""An input is never destroyed (issue 13, point 2): every command that writes refuses a target
it did not write as an output of itself, with or without ``--overwrite``, and says what it is.

Each case runs the real ``recon3d`` command line in-process on tiny scans (8×16×16, 8 angles),
and checks the exit status, the one-line message (which never invites ``--overwrite`` for a
target the command did not write) and, by a checksum of every file, that the target is intact.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cli import main
from pipeline.errors import OutputConflictError

SIM = ["simulate", "ct", "--shape", "8", "16", "16", "--angles", "8", "--chunk-depth", "4",
       "--workers", "1", "--scheduler", "sync", "--no-progress"]


def _ingest(source: Path) -> list[str]:
    return ["ingest", "ct", str(source), "--no-log", "--chunk-depth", "4", "--workers", "1",
            "--scheduler", "sync", "--no-progress"]


def _fbp(scan, out) -> list[str]:
    return ["reconstruct", "--scan", str(scan), "--out", str(out), "--method", "fbp", "--no-progress"]


def _checksum(path: Path) -> str:
    """One digest of every file under ``path`` (names and bytes), or of the file itself."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _refused(capsys, argv: list[str], target: Path, *, says: str) -> str:
    """Run ``argv``: it must exit 2 with one line saying ``says``, and leave ``target`` intact."""
    before = _checksum(target)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert says in err, err
    assert "--overwrite" not in err, err  # never invite a flag that could not help
    assert "Traceback" not in err
    assert _checksum(target) == before, f"{target} was modified"
    return err


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A simulated scan, an ingested scan and a reconstruction of the first (made once)."""
    root = tmp_path_factory.mktemp("protect")
    np.save(root / "p.npy", np.random.default_rng(0).uniform(0, 1, (8, 4, 10)).astype(np.float32))
    assert main(SIM + ["--out", str(root / "sim.zarr")]) == 0
    assert main(_ingest(root / "p.npy") + ["--out", str(root / "ing.zarr")]) == 0
    assert main(_fbp(root / "sim.zarr", root / "rec.ome.zarr")) == 0
    return root


@pytest.fixture
def copy(tmp_path, made):
    """``copy(name)`` → a private copy of one of :func:`made`'s outputs."""

    def _copy(name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(made / name, dest)
        return dest

    return _copy


def _foreign_group(path: Path) -> Path:
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("data", shape=(4, 4), dtype="float32")[:] = np.arange(16, dtype=np.float32).reshape(4, 4)
    g.attrs["owner"] = "someone else"
    return path


def _plain_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("user data\n")
    return path


def _run_dir(path: Path) -> Path:
    (path / "checkpoints" / "step_00000010").mkdir(parents=True)
    (path / "checkpoints" / "step_00000010" / "manifest.json").write_text("{}")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (path / "config.resolved.yaml").write_text("run: {max_steps: 10}\n")
    return path


# ----------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_reconstruct_out_is_the_scan(capsys, copy, overwrite):
    scan = copy("sim.zarr")
    argv = _fbp(scan, scan) + (["--overwrite"] if overwrite else [])
    _refused(capsys, argv, scan, says="is a recon3d scan written by simulate")
    from pipeline.data import open_scan

    assert open_scan(scan).measurements.read().shape[0] == 8  # the arrays are all there


def test_reconstruct_out_inside_the_scan(capsys, copy):
    scan = copy("sim.zarr")
    _refused(capsys, _fbp(scan, scan / "sub.ome.zarr") + ["--overwrite"], scan, says="inside the input")
    assert not (scan / "sub.ome.zarr").exists()


def test_reconstruct_out_is_a_run_directory(capsys, made, tmp_path):
    run = _run_dir(tmp_path / "run")
    _refused(capsys, _fbp(made / "sim.zarr", run) + ["--overwrite"], run, says="is a training run directory")


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_reconstruct_out_is_a_foreign_group(capsys, made, tmp_path, overwrite):
    group = _foreign_group(tmp_path / "other.zarr")
    argv = _fbp(made / "sim.zarr", group) + (["--overwrite"] if overwrite else [])
    _refused(capsys, argv, group, says="is a zarr group that recon3d did not write")


def test_reconstruct_recomputes_its_own_output(capsys, made, copy):
    out = copy("rec.ome.zarr")
    capsys.readouterr()
    assert main(["reconstruct", "--scan", str(made / "sim.zarr"), "--out", str(out), "--method", "adjoint",
                 "--no-progress", "--overwrite"]) == 0, capsys.readouterr().err
    attrs = zarr.open_group(str(out), mode="r").attrs["recon3d"]
    assert attrs["method"] == "adjoint" and attrs["complete"] and attrs["written_by"] == "reconstruct"


# ----------------------------------------------------------------------------- simulate / ingest
def _targets(kind: str, copy, tmp_path: Path) -> tuple[Path, str]:
    """A target of ``kind`` and what its refusal must say."""
    if kind == "simulated":
        return copy("sim.zarr"), "is a recon3d scan written by simulate"
    if kind == "ingested":
        return copy("ing.zarr"), "is a recon3d scan written by ingest"
    if kind == "reconstruction":
        return copy("rec.ome.zarr"), "is a reconstruction written by recon3d reconstruct"
    if kind == "foreign-group":
        return _foreign_group(tmp_path / "other.zarr"), "is a zarr group that recon3d did not write"
    return _plain_folder(tmp_path / "plain"), "is a non-empty folder that recon3d did not write"


@pytest.mark.parametrize("kind", ["ingested", "reconstruction", "foreign-group", "plain-folder"])
def test_simulate_overwrite_refuses_what_simulate_did_not_write(capsys, copy, tmp_path, kind):
    target, says = _targets(kind, copy, tmp_path)
    _refused(capsys, SIM + ["--out", str(target), "--overwrite"], target, says=says)


@pytest.mark.parametrize("kind", ["simulated", "reconstruction", "foreign-group", "plain-folder"])
def test_ingest_overwrite_refuses_what_ingest_did_not_write(capsys, made, copy, tmp_path, kind):
    target, says = _targets(kind, copy, tmp_path)
    _refused(capsys, _ingest(made / "p.npy") + ["--out", str(target), "--overwrite"], target, says=says)


def test_simulate_into_a_non_empty_plain_folder(capsys, tmp_path):
    folder = _plain_folder(tmp_path / "plain")
    _refused(capsys, SIM + ["--out", str(folder)], folder, says="is a non-empty folder")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_simulate_and_ingest_overwrite_their_own_scans(capsys, made, copy):
    sim, ing = copy("sim.zarr"), copy("ing.zarr")
    assert main(SIM + ["--angles", "10", "--out", str(sim), "--overwrite"]) == 0
    assert zarr.open_group(str(sim), mode="r")["angles"].shape == (10,)
    assert main(_ingest(made / "p.npy") + ["--out", str(ing), "--overwrite", "--i0", "2"]) == 0, \
        capsys.readouterr().err
    prov = zarr.open_group(str(ing), mode="r").attrs["recon3d"]["provenance"]
    assert prov["written_by"] == "ingest"


def test_a_scan_of_an_older_version_is_still_recognised(capsys, copy):
    """Without ``written_by`` the provenance tool names the writer, and a scan that claims to be
    a reconstruction still counts as a scan (no hole for reconstruct)."""
    scan = copy("sim.zarr")
    g = zarr.open_group(str(scan), mode="r+")
    attrs = dict(g.attrs["recon3d"])
    attrs["provenance"] = {k: v for k, v in attrs["provenance"].items() if k != "written_by"}
    attrs.update(kind="reconstruction", tool="recon3d reconstruct", written_by="reconstruct")
    g.attrs["recon3d"] = attrs
    _refused(capsys, _fbp(scan, scan) + ["--overwrite"], scan, says="is a recon3d scan written by simulate")


# ----------------------------------------------------------------------------- preprocess
def test_preprocess_recomputes_its_own_arrays_but_not_foreign_ones(capsys, copy):
    scan = copy("sim.zarr")
    base = ["preprocess", str(scan), "--outputs", "fbp", "--workers", "1", "--scheduler", "sync", "--no-progress"]
    assert main(base) == 0
    assert main(base + ["--overwrite"]) == 0  # its own array: recomputed
    g = zarr.open_group(str(scan), mode="r+")
    g["derived"].create_array("n2i", shape=(2, 2), dtype="float32", overwrite=True)[:] = 7.0
    capsys.readouterr()
    rc = main(base[:3] + ["n2i"] + base[4:] + ["--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "that recon3d preprocess did not write" in err and "--overwrite" not in err, err
    assert (zarr.open_group(str(scan), mode="r")["derived/n2i"][:] == 7.0).all()


# ----------------------------------------------------------------------------- export / report
def test_export_refuses_a_foreign_file_and_the_checkpoints(capsys, tmp_path):
    run = _run_dir(tmp_path / "run")
    notes = tmp_path / "notes.pt"
    notes.write_bytes(b"not an export")
    _refused(capsys, ["export", str(run), "--out", str(notes)], notes, says="is a file that recon3d export did not write")
    inside = run / "checkpoints" / "step_00000010" / "manifest.json"
    _refused(capsys, ["export", str(run), "--out", str(inside)], run, says="is a file that recon3d export did not write")
    with pytest.raises(OutputConflictError, match="inside the input"):
        from pipeline.train import export_run

        export_run(run, run / "checkpoints" / "merged.pt")


def test_export_may_replace_an_earlier_export(tmp_path):
    from pipeline.outputs import check_output
    from pipeline.train.export import EXPORT_FORMAT

    path = tmp_path / "model.pt"
    torch.save({"format": EXPORT_FORMAT, "state_dict": {"w": torch.zeros(2)}}, path)
    assert check_output(path, "export").kind == "export"
    with pytest.raises(OutputConflictError, match="is a file that recon3d report did not write"):
        check_output(path, "report")  # an export is no report's output
    assert check_output(tmp_path / "new.pt", "export").kind == "missing"


def test_report_refuses_a_foreign_folder_and_a_path_inside_the_image(capsys, made, tmp_path):
    folder = _plain_folder(tmp_path / "plain")
    image = made / "rec.ome.zarr"
    _refused(capsys, ["report", str(image), "--out", str(folder), "--no-metrics"], folder,
             says="is a non-empty folder that recon3d did not write")
    _refused(capsys, ["report", str(image), "--out", str(image / "report"), "--no-metrics"], image,
             says="inside the input")
    # Its own earlier report folder is replaced.
    out = tmp_path / "rep"
    assert main(["report", str(image), "--out", str(out), "--no-metrics"]) == 0
    assert main(["report", str(image), "--out", str(out), "--no-metrics"]) == 0
    assert json.loads((out / ".recon3d-report.json").read_text())["written_by"] == "report"


def test_outputs_of_an_older_version_are_still_replaced_by_their_command(capsys, made, copy, tmp_path):
    """A reconstruction without ``written_by`` (``kind`` + ``tool``) and a report folder without
    the marker (only ``report.md`` and its files) stay replaceable by the command that wrote them."""
    out = copy("rec.ome.zarr")
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["recon3d"] = {k: v for k, v in g.attrs["recon3d"].items() if k != "written_by"}
    assert main(["reconstruct", "--scan", str(made / "sim.zarr"), "--out", str(out), "--method", "adjoint",
                 "--no-progress"]) == 0, capsys.readouterr().err
    old_report = tmp_path / "old.report"
    old_report.mkdir()
    (old_report / "report.md").write_text("# SENTINEL of an older report\n")
    (old_report / "slices.png").write_bytes(b"png")
    assert main(["report", str(out), "--out", str(old_report), "--no-metrics"]) == 0, capsys.readouterr().err
    assert "SENTINEL" not in (old_report / "report.md").read_text()
    (old_report / ".recon3d-report.json").unlink()
    (old_report / "mine.txt").write_text("user data\n")  # no longer only a report's files
    _refused(capsys, ["report", str(out), "--out", str(old_report), "--no-metrics"], old_report,
             says="is a non-empty folder that recon3d did not write")


def test_quickstart_refuses_a_folder_it_did_not_write(capsys, tmp_path):
    """quickstart writes README.md and summary.json straight into --out: a user's folder is refused."""
    folder = _plain_folder(tmp_path / "home")
    (folder / "README.md").write_text("my own readme\n")
    _refused(capsys, ["quickstart", "--out", str(folder), "--shape", "8", "16", "16", "--angles", "8",
                      "--steps", "1", "--nproc", "1", "--no-progress"], folder,
             says="is a folder that recon3d quickstart did not write")


def test_evaluate_json_inside_a_scan_is_refused(capsys, copy, made):
    """``evaluate --json SCAN/zarr.json`` would replace the scan's metadata with metrics."""
    scan = copy("sim.zarr")
    _refused(capsys, ["evaluate", str(made / "rec.ome.zarr"), "--reference", str(scan), "--json",
                      str(scan / "zarr.json")], scan, says="inside the input")


# ----------------------------------------------------------------------------- train
@pytest.mark.parametrize("kind", ["scan", "reconstruction", "foreign group", "inside the scan", "a file"])
def test_train_run_dir_never_lands_in_a_scan_or_an_output(capsys, copy, made, tmp_path, kind):
    """``train --run-dir`` would write checkpoints/, metrics.jsonl and the resolved config into
    it: a scan, an output, a foreign group, a path inside the scan and a file are refused before
    any work; the scans it reads are untouched."""
    import yaml

    scan = copy("sim.zarr")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"data": {"scans": [str(scan)], "slab_thickness": 2},
                                      "model": {"widths": [4, 8]}, "run": {"max_steps": 1}}))
    run, target, says = {
        "scan": (scan, scan, "is a recon3d scan"),
        "reconstruction": (copy("rec.ome.zarr"),) * 2 + ("is a reconstruction written by recon3d reconstruct",),
        "foreign group": (_foreign_group(tmp_path / "g.zarr"),) * 2 + ("zarr group that recon3d did not write",),
        "inside the scan": (scan / "run", scan, "inside the input"),
        "a file": (config, config, "a file"),
    }[kind]
    err = _refused(capsys, ["train", str(config), "--run-dir", str(run)], target, says=says)
    assert "--run-dir" in err and not (scan / "run").exists()


def test_train_run_dir_may_be_a_users_experiment_folder(made, tmp_path):
    """A plain folder that holds the user's YAML is a fine run directory (only checked here:
    the guard passes; training itself is covered elsewhere)."""
    from pipeline.outputs import check_run_dir

    folder = _plain_folder(tmp_path / "exp1")
    assert check_run_dir(folder, inputs=[made / "sim.zarr"]).kind == "folder"
    assert check_run_dir(tmp_path / "new").kind == "missing"
    assert check_run_dir(_run_dir(tmp_path / "old")).kind == "run"
