"""Each bad input, made on purpose, gives an error naming the scan, the array and the chunk;
checks and reads never write into a scan."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import (
    CorruptChunkError,
    MissingChunkError,
    ScanError,
    SlabStream,
    SlabStreamConfig,
    check_scan,
    open_scan,
)


def _chunk_file(scan: str, array: str, d_index: int) -> Path:
    arr = open_scan(scan).__getattribute__(array).array
    coords = [0] * arr.ndim
    coords[list(arr.metadata.dimension_names).index("d")] = d_index
    return Path(scan) / array / arr.metadata.encode_chunk_key(tuple(coords))


def _tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _stream(path, **kw):
    return list(SlabStream(SlabStreamConfig(scans=(path,), num_workers=0, shuffle=False, **kw)))


def _set_attrs(scan: str, change) -> None:
    meta_file = Path(scan) / "zarr.json"
    meta = json.loads(meta_file.read_text())
    change(meta["attributes"]["recon3d"])
    meta_file.write_text(json.dumps(meta))


def test_deleted_chunk_is_caught_by_check_cli_and_stream(copy_scan, mri_scan, capsys):
    path = copy_scan(mri_scan)
    _chunk_file(path, "measurements", 3).unlink()
    report = check_scan(path)
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert f"scan '{path}'" in problem and "array 'measurements'" in problem
    assert "chunk (0, 3, 0, 0) (D 6:8)" in problem and "missing" in problem
    assert main(["inspect", path, "--check", "--no-progress"]) == 1
    assert "chunk (0, 3, 0, 0)" in capsys.readouterr().out
    assert main(["inspect", path]) == 0  # without --check: a summary that shows 4/5 present
    assert "4/5 chunks present" in capsys.readouterr().out
    with pytest.raises(MissingChunkError, match=r"array 'measurements': chunk \(0, 3, 0, 0\)"):
        _stream(path)
    scan = open_scan(path)
    scan.slab(slice(0, 6))  # the slabs that do not need it still read
    with pytest.raises(MissingChunkError):
        scan.slab(slice(6, 8))


def test_deleted_chunk_of_operator_array_is_caught(copy_scan, mri_scan):
    path = copy_scan(mri_scan)
    _chunk_file(path, "coil_maps", 0).unlink()
    with pytest.raises(MissingChunkError, match="array 'coil_maps': chunk"):
        open_scan(path).operator(slice(0, 2))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_chunk_names_scan_array_chunk(copy_scan, ct_scan, damage):
    path = copy_scan(ct_scan)
    target = _chunk_file(path, "measurements", 1)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3] if damage == "truncate" else data[:16] + b"\x07" * (len(data) - 16))
    report = check_scan(path)
    assert any("array 'measurements': chunk (1, 0, 0) (D 2:4): cannot be decoded" in p for p in report.problems), report.problems
    with pytest.raises(CorruptChunkError, match=r"chunk \(1, 0, 0\)"):
        _stream(path)


def test_nan_in_a_chunk_is_reported(copy_scan, ct_scan):
    import zarr

    path = copy_scan(ct_scan)
    arr = zarr.open_array(Path(path) / "measurements", mode="r+")
    block = arr[2:4]
    block[1, 3, 5] = np.nan
    block[0, 0, 0] = np.inf
    arr[2:4] = block
    report = check_scan(path)
    assert report.problems == [
        f"scan '{path}': array 'measurements': chunk (1, 0, 0) (D 2:4): holds 2 NaN/Inf values "
        "(a chunk missing inside a shard also reads as NaN)"
    ]
    with pytest.raises(CorruptChunkError, match="NaN/Inf"):
        _stream(path)


def test_wrong_dtype_and_shape_are_refused(copy_scan, ct_scan, mri_scan):
    import zarr

    path = copy_scan(ct_scan)
    g = zarr.open_group(path, mode="r+")
    old = g["reference"]
    g.create_array("reference", shape=old.shape, chunks=old.chunks, dtype="float64",
                   dimension_names=("d", "h", "w"), overwrite=True)
    with pytest.raises(ScanError, match="array 'reference': dtype must be float32, got float64"):
        open_scan(path)
    assert main(["inspect", path, "--check", "--no-progress"]) == 1

    path = copy_scan(mri_scan)
    g = zarr.open_group(path, mode="r+")
    g.create_array("mask", shape=(24, 21), dtype="bool", dimension_names=("kh", "kw"), overwrite=True)
    with pytest.raises(ScanError, match=r"array 'mask': shape must be \(24, 20\)"):
        open_scan(path)


def test_metadata_that_disagrees_with_arrays(copy_scan, ct_scan, mri_scan):
    path = copy_scan(ct_scan)
    _set_attrs(path, lambda m: m["geometry"].update(num_angles=17))
    with pytest.raises(ScanError, match=r"array 'measurements': shape must be \(8, 17, \d+\).*num_angles=17"):
        open_scan(path)
    path = copy_scan(mri_scan)
    _set_attrs(path, lambda m: m["geometry"].update(num_coils=4))
    with pytest.raises(ScanError, match=r"array 'measurements': shape must be \(4, 10, 24, 20\).*num_coils=4"):
        open_scan(path)
    report = check_scan(path)
    assert not report.ok and "num_coils=4" in report.problems[0]


def test_not_a_scan_and_unsupported_version(tmp_path, copy_scan, ct_scan):
    import zarr

    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(ScanError, match="not a recon3d scan"):
        open_scan(tmp_path / "plain.zarr")
    with pytest.raises((ScanError, FileNotFoundError)):
        open_scan(tmp_path / "nothing.zarr")
    path = copy_scan(ct_scan)
    _set_attrs(path, lambda m: m.update(format_version=99))
    with pytest.raises(ScanError, match="format_version 99 is not supported"):
        open_scan(path)


def test_incomplete_scan_is_refused_by_stream(copy_scan, ct_scan):
    path = copy_scan(ct_scan)
    _set_attrs(path, lambda m: m.update(status="incomplete"))
    with pytest.raises(ScanError, match="rerun the same command"):
        _stream(path)
    assert open_scan(path, allow_incomplete=True).measurements.shape[0] == 8


def test_reads_and_checks_write_nothing(copy_scan, mri_scan):
    path = copy_scan(mri_scan)
    before = _tree_digest(path)
    assert check_scan(path).ok
    _stream(path, include_reference=True)
    assert main(["inspect", path, "--check", "--no-progress"]) == 0
    assert _tree_digest(path) == before


def test_an_unknown_length_unit_is_refused_not_dropped(tmp_path, monkeypatch, capsys):
    # `--units furlong` used to be stored in the scan and then dropped from every OME-Zarr output
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "ct", "--shape", "2", "8", "8", "--angles", "4", "--units", "furlong", "--out", "s.zarr"])
    assert exc.value.code == 2 and "unknown length unit 'furlong'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main(["simulate", "ct", "--shape", "2", "8", "8", "--angles", "4", "--units", "um", "--out", "s.zarr",
                 "--no-progress"]) == 0
