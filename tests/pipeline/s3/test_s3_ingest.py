"""``recon3d ingest`` from s3:// sources (moto on 127.0.0.1): a ``.npy`` (ranged reads), an HDF5
file (h5py on an fsspec file object), a folder or glob of TIFFs, flat/dark/angle files — each
ingested scan equals the one ingested from the same local files; a URL of a kind no reader
takes is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.cli import main

h5py = pytest.importorskip("h5py")
tifffile = pytest.importorskip("tifffile")

COMMON = ["--chunk-depth", "2", "--workers", "1", "--no-progress"]


def _arrays(target: str, options=None) -> dict[str, np.ndarray]:
    group = zarr.open_group(target, mode="r", storage_options=options)
    return {name: np.asarray(a[...]) for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def _same(s3, local: str, remote: str) -> None:
    here, there = _arrays(local), _arrays(remote, s3.options)
    assert here and sorted(here) == sorted(there)
    for name in here:
        np.testing.assert_array_equal(there[name], here[name], err_msg=name)


def _upload(s3, folder: Path) -> None:
    s3.fs.put(str(folder) + "/", f"{s3.name}/src/", recursive=True)


def _ct_sources(folder: Path) -> None:
    rng = np.random.default_rng(0)
    a, v, u = 10, 6, 16
    p = rng.uniform(0, 2, size=(a, v, u))
    flat, dark = np.full((v, u), 900.0), np.full((v, u), 20.0)
    counts = (dark + (flat - dark) * np.exp(-p)).astype(np.float32)
    (folder / "proj").mkdir(parents=True)
    for k in range(a):
        tifffile.imwrite(folder / "proj" / f"proj_{k:04d}.tif", counts[k])
    tifffile.imwrite(folder / "flat.tif", np.stack([flat, flat]).astype(np.float32))
    tifffile.imwrite(folder / "dark.tif", dark.astype(np.float32))
    np.save(folder / "counts.npy", counts)
    np.savetxt(folder / "angles.txt", np.linspace(0, 170, a))


@pytest.mark.parametrize("source, extra", [
    ("proj", ["--flat", "flat.tif", "--dark", "dark.tif"]),
    ("proj/*.tif", ["--flat", "flat.tif", "--dark", "dark.tif", "--angles", "angles.txt"]),
    ("counts.npy", ["--i0", "900", "--angles", "angles.txt"]),
])
def test_ingest_ct_from_s3_equals_local(source, extra, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    folder = tmp_path / "src"
    _ct_sources(folder)
    _upload(s3, folder)

    def args(root: str) -> list[str]:
        return [f"{root}/{a}" if a.endswith((".tif", ".txt")) else a for a in extra]

    local, remote = str(tmp_path / "local.zarr"), s3.url("remote.zarr")
    assert main(["ingest", "ct", f"{folder}/{source}", "--out", local, *args(str(folder)), *COMMON]) == 0
    assert main(["ingest", "ct", s3.url(f"src/{source}"), "--out", remote, *args(s3.url("src")), *COMMON]) == 0
    _same(s3, local, remote)


def _kspace(folder: Path) -> None:
    rng = np.random.default_rng(2)
    c, kx, ky, kz = 2, 8, 12, 10
    k = (rng.standard_normal((c, kx, ky, kz)) + 1j * rng.standard_normal((c, kx, ky, kz))).astype(np.complex64)
    k[:, :, 1::3, ::2] = 0  # undersampled, centre kept
    k[:, :, 4:8, 3:7] = (rng.standard_normal((c, kx, 4, 4)) + 1j).astype(np.complex64)
    folder.mkdir(parents=True)
    np.save(folder / "k.npy", k)
    with h5py.File(folder / "k.h5", "w") as f:
        f.create_dataset("kspace", data=k, chunks=(1, kx, 4, kz))
    np.save(folder / "maps.npy", (np.ones((c, kx, ky, kz)) / np.sqrt(c)).astype(np.complex64))


@pytest.mark.parametrize("source", ["k.npy", "k.h5"])
def test_ingest_mri_from_s3_equals_local(source, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    folder = tmp_path / "src"
    _kspace(folder)
    _upload(s3, folder)
    local, remote = str(tmp_path / "local.zarr"), s3.url("remote.zarr")
    assert main(["ingest", "mri", str(folder / source), "--out", local, "--coil-maps", str(folder / "maps.npy"),
                 *COMMON]) == 0
    assert main(["ingest", "mri", s3.url(f"src/{source}"), "--out", remote, "--coil-maps", s3.url("src/maps.npy"),
                 *COMMON]) == 0
    _same(s3, local, remote)


def test_ingest_refuses_a_url_no_reader_takes(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "mri", s3.url("k.dat"), "--out", s3.url("scan.zarr"), "--storage-options", s3.options_json])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "ingest SOURCE must be a local path" in err and ".npy/.h5/.hdf5" in err
    assert not list(tmp_path.iterdir()) and s3.keys() == []


def test_ingest_names_a_missing_url(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECON3D_STORAGE_OPTIONS", s3.options_json)
    assert main(["ingest", "ct", s3.url("nothing.npy"), "--out", str(tmp_path / "x.zarr"), *COMMON]) != 0
    assert f"{s3.url('nothing.npy')}' does not exist" in capsys.readouterr().err
