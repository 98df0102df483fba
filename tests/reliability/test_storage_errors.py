"""Clear errors for broken metadata and a full disk (issue 13, point 7).

* Invalid JSON in any ``zarr.json`` (the group's or an array's; truncated or garbage), valid
  JSON that is not zarr metadata, and ``recon3d`` attributes that are missing or of the wrong
  type: one line naming the file and the scan (an ``InputError``) from ``open_scan``,
  ``inspect``, training reads and ``reconstruct``.
* Disk full while writing a chunk (simulate; reconstruct's OME output): one line naming the
  path and the bytes needed (``StorageFullError``), no torn state (no half-written object, the
  scan stays ``incomplete``), and a rerun after space is freed finishes with the same data.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main
from pipeline.data import SimulateCTConfig, SlabStream, SlabStreamConfig, open_scan, simulate_ct
from pipeline.data.inspect import check_scan
from pipeline.errors import InputError, StorageFullError

SHAPE = (8, 16, 16)


def _config(path, **changes) -> SimulateCTConfig:
    config = dict(out=str(path), shape=SHAPE, angles=12, chunk_depth=2, workers=1, scheduler="sync",
                  progress=False)
    config.update(changes)
    return SimulateCTConfig(**config)


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("storage") / "ct.zarr"
    simulate_ct(_config(path))
    return str(path)


@pytest.fixture
def scan_copy(tmp_path, ct_scan) -> str:
    dest = tmp_path / "copy.zarr"
    shutil.copytree(ct_scan, dest)
    return str(dest)


# ----------------------------------------------------------------------------- metadata
def _truncate(file: Path) -> None:
    text = file.read_text()
    file.write_text(text[: len(text) // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x00\xffnot json at all\x07")


def _not_zarr(file: Path) -> None:
    meta = json.loads(file.read_text())
    meta["shape"] = "sixteen"  # valid JSON, not valid zarr array metadata
    file.write_text(json.dumps(meta))


DAMAGE = [("zarr.json", _truncate), ("measurements/zarr.json", _truncate),
          ("angles/zarr.json", _garbage), ("measurements/zarr.json", _not_zarr)]


@pytest.mark.parametrize("key, damage", DAMAGE, ids=["group-truncated", "array-truncated",
                                                     "array-garbage", "array-not-zarr"])
def test_unreadable_zarr_json_names_the_file_and_the_scan(tmp_path, scan_copy, capsys, key, damage):
    damage(Path(scan_copy) / key)
    named = f"scan '{scan_copy}': metadata file '{scan_copy}/{key}' is not readable"
    with pytest.raises(InputError) as info:
        open_scan(scan_copy)
    assert str(info.value).startswith(named), str(info.value)
    assert "\n" not in str(info.value)
    # inspect: one error line, exit 2; inspect --check: the one problem it reports.
    assert main(["inspect", scan_copy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert [p for p in check_scan(scan_copy).problems if named in p]
    # training reads (the stream opens every scan first)
    with pytest.raises(InputError, match="metadata file"):
        SlabStream(SlabStreamConfig(scans=(scan_copy,), num_workers=0))
    # reconstruct
    code = main(["reconstruct", "--method", "fbp", "--scan", scan_copy, "--out", str(tmp_path / "r.ome.zarr"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0], err


def test_writing_into_a_scan_with_a_corrupt_zarr_json_names_it(scan_copy, capsys):
    """A rerun of simulate on a scan whose group metadata broke: refused, the file named."""
    _truncate(Path(scan_copy) / "zarr.json")
    argv = ["simulate", "ct", "--shape", *map(str, SHAPE), "--angles", "12", "--chunk-depth", "2",
            "--workers", "1", "--no-progress", "--out", scan_copy]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"metadata file '{scan_copy}/zarr.json' is not readable: invalid JSON" in err[0], err
    assert (Path(scan_copy) / "measurements" / "c").is_dir()  # nothing was deleted


@pytest.mark.parametrize("change, expected", [
    (lambda a: a.pop("recon3d"), "no 'recon3d' attributes; not a recon3d scan"),
    (lambda a: a["recon3d"].update(geometry=5), "malformed 'recon3d' attributes in its zarr.json"),
    (lambda a: a["recon3d"].update(volume_shape="abc"), "malformed 'recon3d' attributes in its zarr.json"),
    (lambda a: a.update(recon3d=[1, 2]), "attribute 'recon3d' must be a mapping"),
], ids=["missing", "geometry-number", "shape-string", "not-a-mapping"])
def test_recon3d_attributes_missing_or_of_wrong_type(scan_copy, capsys, change, expected):
    file = Path(scan_copy) / "zarr.json"
    meta = json.loads(file.read_text())
    change(meta["attributes"])
    file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=expected):
        open_scan(scan_copy)
    assert main(["inspect", scan_copy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"scan '{scan_copy}'" in err[0] and expected in err[0], err


# ----------------------------------------------------------------------------- disk full
def _no_space_after(monkeypatch, chunks: int) -> list[str]:
    """Make zarr's low-level local write fail with ENOSPC after ``chunks`` chunk objects."""
    from zarr.storage import _local

    real = _local._put
    written: list[str] = []

    def put(path, value, exclusive=False):
        if "/c/" in Path(path).as_posix():
            if len(written) >= chunks:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            written.append(str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(_local, "_put", put)
    return written


def _leftovers(path: Path) -> list[str]:
    return [str(p) for p in path.rglob("*") if p.name.endswith(".partial")]


def _status(path: Path) -> str:
    return json.loads((path / "zarr.json").read_text())["attributes"]["recon3d"]["status"]


def test_disk_full_while_simulating(tmp_path, ct_scan, monkeypatch, capsys):
    out = tmp_path / "full.zarr"
    _no_space_after(monkeypatch, 3)
    argv = ["simulate", "ct", "--shape", *map(str, SHAPE), "--angles", "12", "--chunk-depth", "2",
            "--workers", "1", "--scheduler", "sync", "--no-progress", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"recon3d simulate: error: no space left writing {out}/"), err
    assert "/c/" in err[0] and " bytes needed" in err[0] and "bytes free" in err[0]
    with pytest.raises(StorageFullError):
        simulate_ct(_config(out))
    assert _status(out) == "incomplete" and _leftovers(out) == []
    monkeypatch.undo()  # space freed: the same command finishes the scan
    assert main(argv) == 0
    assert _status(out) == "complete"
    assert check_scan(str(out)).problems == []
    for name in ("measurements", "reference", "angles"):
        np.testing.assert_array_equal(zarr.open_array(out / name)[...], zarr.open_array(Path(ct_scan) / name)[...])


@pytest.mark.parametrize("after, array", [(1, "_ingest/sino"), (27, "measurements")],
                         ids=["in-the-temporary-pass", "in-the-final-pass"])
def test_disk_full_while_ingesting(tmp_path, monkeypatch, after, array):
    from pipeline.data import IngestCTConfig, ingest_ct

    p = np.random.default_rng(1).uniform(0, 1, size=(9, 6, 10)).astype(np.float32)
    np.save(tmp_path / "p.npy", p)
    config = IngestCTConfig(source=str(tmp_path / "p.npy"), out=str(tmp_path / "ct.zarr"), log=False, chunk_depth=2,
                            block_bytes=6 * 10 * 4 * 3, workers=1, scheduler="sync", progress=False)
    _no_space_after(monkeypatch, after)
    # 9 angles in blocks of 3 fill 25 chunks of the temporary sinogram first, then the scan's.
    with pytest.raises(StorageFullError, match=rf"no space left writing {tmp_path}/ct.zarr/{array}/c/\S+ \(\d+ bytes needed"):
        ingest_ct(config)
    assert _status(tmp_path / "ct.zarr") == "incomplete" and _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert ingest_ct(config).state == "resumed"
    np.testing.assert_array_equal(open_scan(config.out).measurements.read(), p.transpose(1, 0, 2))


def test_a_full_disk_is_reported_after_the_regions_other_writes_end(tmp_path, monkeypatch):
    """zarr writes a region's chunks at once and reports the first failure while the others run
    on: the error must come back only after they end (no temporary file outlives it), and the
    store starts no chunk write after it."""
    import threading
    import time

    from zarr.storage import _local

    from pipeline.data.store import open_store

    arr = zarr.create_array(open_store(tmp_path / "a.zarr", read_only=False), shape=(4, 8), chunks=(1, 8),
                            dtype="float32", fill_value=0.0)
    real = _local._put
    started: list[str] = []
    slow_started = threading.Event()

    def put(path, value, exclusive=False):
        name = Path(path).as_posix()
        if "/c/" not in name:
            return real(path, value, exclusive=exclusive)
        started.append(name)
        if name.endswith("/c/0/0"):
            slow_started.set()
            time.sleep(0.3)  # a slow write, still under way when the disk fills
            return real(path, value, exclusive=exclusive)
        # The disk fills while the slow write is under way: zarr starts a region's chunk writes
        # in no fixed order, and a write that starts after the failure is refused (checked below).
        assert slow_started.wait(10), "the slow chunk write never started"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(_local, "_put", put)
    with pytest.raises(StorageFullError, match="no space left writing"):
        arr[...] = np.ones((4, 8), np.float32)
    assert (tmp_path / "a.zarr" / "c" / "0" / "0").is_file()  # the slow write had ended
    assert _leftovers(tmp_path) == []
    count = len(started)
    with pytest.raises(StorageFullError):
        arr[0] = 2.0
    assert len(started) == count  # refused before any file was opened


def test_disk_full_while_preprocessing(tmp_path, scan_copy, monkeypatch):
    from pipeline.data import PreprocessConfig, preprocess

    config = PreprocessConfig(scan=scan_copy, outputs=("fbp",), workers=1, scheduler="sync", progress=False)
    _no_space_after(monkeypatch, 1)
    with pytest.raises(StorageFullError, match=rf"no space left writing {scan_copy}/derived/fbp/c/\S+ \(\d+ bytes needed"):
        preprocess(config)
    fbp = Path(scan_copy) / "derived" / "fbp"
    assert json.loads((fbp / "zarr.json").read_text())["attributes"]["recon3d"]["status"] != "complete"
    assert _leftovers(Path(scan_copy)) == []
    monkeypatch.undo()
    assert preprocess(config) == {"fbp": "resumed"}
    whole = tmp_path / "whole.zarr"
    shutil.copytree(Path(scan_copy), whole, ignore=shutil.ignore_patterns("derived"))
    preprocess(PreprocessConfig(scan=str(whole), outputs=("fbp",), workers=1, scheduler="sync", progress=False))
    np.testing.assert_array_equal(open_scan(scan_copy).derived("fbp").read(), open_scan(str(whole)).derived("fbp").read())


def test_disk_full_while_writing_the_reconstruction(tmp_path, ct_scan, monkeypatch, capsys):
    out = tmp_path / "rec.ome.zarr"
    argv = ["reconstruct", "--method", "fbp", "--scan", ct_scan, "--out", str(out), "--chunks", "2", "16", "16",
            "--no-progress"]
    _no_space_after(monkeypatch, 2)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recon3d reconstruct: error: no space left writing {out}/0/c/"), err
    assert " bytes needed" in err[0]
    assert _leftovers(out) == []
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["recon3d"].get("complete")
    monkeypatch.undo()
    assert main(argv) == 0
    whole = tmp_path / "whole.ome.zarr"
    assert main(argv[:6] + [str(whole)] + argv[7:]) == 0
    np.testing.assert_array_equal(zarr.open_array(out / "0")[...], zarr.open_array(whole / "0")[...])


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 96 KiB tmpfs (skips where mounting is not permitted); ``remount(size)`` grows it."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True, timeout=20)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=20)


def test_real_full_tmpfs_then_rerun_finishes(small_tmpfs, tmp_path):
    mnt, remount = small_tmpfs
    # Noisy measurements do not compress: about 300 KiB of chunks for a 96 KiB disk.
    config = _config(mnt / "scan.zarr", shape=(8, 48, 48), angles=48, photons=1e3)
    with pytest.raises(StorageFullError, match=rf"no space left writing {mnt}/scan.zarr/\S+ \(\d+ bytes needed, \d+ bytes free\)"):
        simulate_ct(config)
    assert _status(mnt / "scan.zarr") == "incomplete" and _leftovers(mnt) == []
    remount("4m")
    assert simulate_ct(config).state == "resumed"
    assert check_scan(str(mnt / "scan.zarr")).problems == []
    reference = tmp_path / "reference.zarr"
    simulate_ct(_config(reference, shape=(8, 48, 48), angles=48, photons=1e3))
    np.testing.assert_array_equal(zarr.open_array(mnt / "scan.zarr" / "measurements")[...],
                                  zarr.open_array(reference / "measurements")[...])
