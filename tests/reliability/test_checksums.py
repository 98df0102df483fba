"""Silent corruption is found (issue 13, point 5): CRC32C on every chunk by default.

A flipped byte inside a chunk of a scan must stop ``inspect --check``, training (reading a slab
through the stream) and ``reconstruct`` with an error naming the scan, the array and the chunk;
``--no-checksum`` opts out, and then a flip that still decodes goes unnoticed (today's limit,
asserted so the difference the checksum makes stays visible).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data import (
    CodecConfig,
    CorruptChunkError,
    SimulateCTConfig,
    SlabStream,
    SlabStreamConfig,
    open_scan,
    simulate_ct,
)
from pipeline.data.inspect import check_scan
from pipeline.errors import InputError

SHAPE = (8, 16, 16)
CHUNK = "chunk (1, 0, 0) (D 2:4)"


def _make(path: Path, **changes) -> str:
    config = dict(out=str(path), shape=SHAPE, angles=12, chunk_depth=2, workers=1, scheduler="sync",
                  progress=False)
    config.update(changes)
    simulate_ct(SimulateCTConfig(**config))
    return str(path)


def _codec_names(array_dir: Path) -> list[str]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    return [c["name"] for c in meta["codecs"]]


def _flip(path: str, array: str = "measurements", index: int = 1, *, at: float = 0.5,
          bit: int = 0x01) -> None:
    """XOR one bit of one byte of the stored chunk ``index`` along D."""
    target = Path(path) / array / "c" / str(index) / "0" / "0"
    data = bytearray(target.read_bytes())
    data[int(len(data) * at)] ^= bit
    target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory) -> str:
    return _make(tmp_path_factory.mktemp("crc") / "ct.zarr")


@pytest.fixture
def flipped(tmp_path, ct_scan) -> str:
    import shutil

    dest = tmp_path / "flipped.zarr"
    shutil.copytree(ct_scan, dest)
    _flip(str(dest))
    return str(dest)


def test_checksum_is_the_default_and_recorded_in_the_codec_list(tmp_path, ct_scan, capsys):
    assert CodecConfig().checksum is True
    for name in ("measurements", "angles", "reference"):
        codecs = _codec_names(Path(ct_scan) / name)
        assert codecs[-1] == "crc32c", (name, codecs)  # zarr's own record, read by any v3 reader
    # The CLI: on by default, --no-checksum opts out, --checksum is still accepted.
    base = ["simulate", "ct", "--shape", *map(str, SHAPE), "--angles", "12", "--chunk-depth", "2",
            "--no-progress", "--workers", "1"]
    for flag, want in ((None, True), ("--checksum", True), ("--no-checksum", False)):
        out = tmp_path / f"cli_{flag}.zarr"
        assert main(base + ["--out", str(out)] + ([flag] if flag else [])) == 0
        assert ("crc32c" in _codec_names(out / "measurements")) is want, flag
    assert main(["inspect", ct_scan]) == 0
    assert "crc32c" in capsys.readouterr().out  # inspect shows it among the codecs


def test_preprocess_and_reconstruct_outputs_carry_it(tmp_path, ct_scan):
    import shutil

    scan = tmp_path / "ct.zarr"
    shutil.copytree(ct_scan, scan)
    assert main(["preprocess", str(scan), "--outputs", "fbp", "--no-progress", "--workers", "1"]) == 0
    assert _codec_names(scan / "derived" / "fbp")[-1] == "crc32c"
    out = tmp_path / "rec.ome.zarr"
    assert main(["reconstruct", "--method", "fbp", "--scan", str(scan), "--out", str(out), "--pyramid", "2",
                 "--no-progress"]) == 0
    for level in ("0", "1"):
        assert _codec_names(out / level)[-1] == "crc32c", level
    plain = tmp_path / "plain.ome.zarr"
    assert main(["reconstruct", "--method", "fbp", "--scan", str(scan), "--out", str(plain),
                 "--no-checksum", "--no-progress"]) == 0
    assert "crc32c" not in _codec_names(plain / "0")


def test_flipped_byte_fails_inspect_check(flipped, capsys):
    report = check_scan(flipped)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"scan '{flipped}': array 'measurements': {CHUNK}: cannot be decoded")
    assert "its CRC32C checksum does not match" in report.problems[0]
    assert main(["inspect", flipped, "--check", "--no-progress"]) == 1
    assert f"array 'measurements': {CHUNK}" in capsys.readouterr().out


def test_flipped_byte_stops_training_reads(flipped):
    scan = open_scan(flipped)
    scan.slab(slice(0, 2))  # the chunks around it still read
    with pytest.raises(CorruptChunkError, match=rf"scan '{flipped}': array 'measurements': chunk \(1, 0, 0\)"):
        scan.slab(slice(2, 4))
    stream = SlabStream(SlabStreamConfig(scans=(flipped,), num_workers=0, seed=0))
    with pytest.raises(CorruptChunkError, match=r"array 'measurements': chunk \(1, 0, 0\)") as info:
        for _ in stream:
            pass
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("window", [["--filter", "ram-lak"], []], ids=["given window", "auto window"])
def test_flipped_byte_stops_reconstruct(tmp_path, flipped, capsys, window):
    """Met while writing slabs (a given window), or already while choosing the window (auto:
    the calibration blocks cover the whole of this thin scan), before any output exists."""
    out = tmp_path / "rec.ome.zarr"
    code = main(["reconstruct", "--method", "fbp", "--scan", flipped, "--out", str(out), "--no-progress", *window])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("recon3d reconstruct: error: "), err
    assert f"scan '{flipped}': array 'measurements': {CHUNK}" in err[0]
    if window:
        assert not json.loads((out / "zarr.json").read_text())["attributes"]["recon3d"].get("complete")
    else:
        assert not out.exists()


def test_without_checksum_a_flip_that_decodes_goes_unnoticed(tmp_path):
    """Today's limit with ``--no-checksum``: the same flip, with and without the CRC32C.

    Uncompressed chunks, so the flip always decodes (to a slightly different finite value):
    only the checksum can tell.
    """
    checked = _make(tmp_path / "crc.zarr", codec=CodecConfig(compressor="none"))
    plain = _make(tmp_path / "plain.zarr", codec=CodecConfig(compressor="none", checksum=False))
    before = open_scan(plain).measurements.read(slice(2, 4))
    for path in (checked, plain):
        _flip(path, at=0.0)  # the lowest mantissa bit of the chunk's first float32
    assert any(CHUNK in p for p in check_scan(checked).problems)
    assert check_scan(plain).problems == []  # passes: the corruption is silent
    after = open_scan(plain).measurements.read(slice(2, 4))
    assert np.isfinite(after).all() and not np.array_equal(before, after)


def test_flipped_byte_in_an_output_level_stops_the_pyramid(tmp_path):
    """A level-0 chunk of the output damaged before the next level is built: named, not averaged."""
    import zarr

    from pipeline.reconstruct import ome

    group = zarr.open_group(str(tmp_path / "out.ome.zarr"), mode="w", zarr_format=3)
    level0 = ome.create_level(group, "0", (4, 8, 8), (2, 8, 8), compressors=CodecConfig().compressors())
    level1 = ome.create_level(group, "1", (2, 4, 4), (1, 4, 4), compressors=CodecConfig().compressors())
    level0[...] = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    target = tmp_path / "out.ome.zarr" / "0" / "c" / "1" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    tasks = ome.pyramid_tasks(level0, level1, name="level1")
    tasks[0].fn()  # the chunk block over the intact level-0 chunk
    with pytest.raises(ome.OMEError, match=r"z 2:4, y 0:8, x 0:8 under level chunk \(1, 0, 0\) of 'level1' cannot be decoded"):
        tasks[1].fn()
