"""The raw inputs of ``recon3d ingest``, read block by block (:mod:`pipeline.data.ingest`).

* MRI k-space ``(C, kx, ky, kz)``: :class:`ArrayKSpace` (a plain HDF5 dataset or ``.npy``) and
  :class:`ISMRMRDKSpace` (an ISMRMRD-style ``/dataset/data`` acquisition list), opened by
  :func:`open_kspace`; :func:`detect_calibration` finds the fully sampled centre of a mask.
* CT projections ``(A, V, U)``: :class:`ProjectionSource` (a folder of TIFF files, one per
  angle, in name order, or ``.npy``) and :func:`read_field` (a flat or dark field).

Each may be a local path or an fsspec URL (``s3://…``; the storage options of ``fsspec.config``
apply): a ``.npy`` is read by ranged requests (:class:`~._npy.NpyArray`), an HDF5 file through
an fsspec file object (``h5py.File(fileobj)``, which reads only the blocks it needs), a TIFF per
file object; a folder or glob of TIFFs is listed in the store. Nothing is downloaded whole
ahead of time and nothing here writes: the inputs are only read.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.paths import is_url

from ._npy import NpyArray, open_url

__all__ = ["KSpaceSource", "ArrayKSpace", "ISMRMRDKSpace", "open_kspace", "detect_calibration",
           "ProjectionSource", "read_field"]


#: ISMRMRD acquisition flag ACQ_IS_NOISE_MEASUREMENT (bit 19, 1-based).
_ACQ_IS_NOISE = 1 << 18


# ----------------------------------------------------------------------------- MRI sources
class KSpaceSource:
    """3D Cartesian k-space ``(C, kx, ky, kz)`` read in blocks of ``ky``."""

    shape: tuple[int, int, int, int]
    path: str

    def read_ky(self, j0: int, j1: int) -> np.ndarray:
        """``(C, kx, j1 − j0, kz)`` complex64."""
        raise NotImplementedError


class ArrayKSpace(KSpaceSource):
    """A plain array: an HDF5 dataset or a memory-mapped ``.npy``."""

    def __init__(self, path: str, array: Any) -> None:
        self.path = path
        self.array = array
        if len(array.shape) != 4:
            raise ValueError(f"k-space '{path}': expected (C, kx, ky, kz), got shape {tuple(array.shape)}")
        self.shape = tuple(int(s) for s in array.shape)  # type: ignore[assignment]
        kind = np.dtype(array.dtype).kind
        if kind != "c" and not (array.dtype.names and set(array.dtype.names) >= {"r", "i"}):
            raise ValueError(f"k-space '{path}': expected complex values, got dtype {array.dtype}")

    def read_ky(self, j0: int, j1: int) -> np.ndarray:
        block = self.array[:, :, j0:j1, :]
        if block.dtype.names:  # HDF5 compound (r, i)
            block = block["r"] + 1j * block["i"]
        return np.array(block, dtype=np.complex64)  # a copy: memory-maps are read-only


class ISMRMRDKSpace(KSpaceSource):
    """An ISMRMRD-style file: ``/dataset/data`` acquisitions (one readout line each).

    Each record has ``head`` (with ``idx.kspace_encode_step_1`` = ky,
    ``idx.kspace_encode_step_2`` = kz, ``active_channels``, ``number_of_samples``, ``flags``)
    and ``data`` (interleaved float32 real/imaginary, channel-major). The matrix comes from
    the encoded-space ``matrixSize`` of ``/dataset/xml`` when present, else from the largest
    indices. Noise-measurement acquisitions are skipped.
    """

    def __init__(self, path: str, handle: Any) -> None:
        self.path = path
        self.data = handle["dataset"]["data"]
        head = self.data["head"]
        idx = head["idx"]
        flags = head["flags"] if "flags" in head.dtype.names else np.zeros(len(head), np.uint64)
        keep = (np.asarray(flags, dtype=np.uint64) & np.uint64(_ACQ_IS_NOISE)) == 0
        self.rows = np.nonzero(keep)[0]
        self.ky = np.asarray(idx["kspace_encode_step_1"])[self.rows].astype(np.int64)
        self.kz = np.asarray(idx["kspace_encode_step_2"])[self.rows].astype(np.int64)
        channels = np.asarray(head["active_channels"])[self.rows]
        samples = np.asarray(head["number_of_samples"])[self.rows]
        if len(self.rows) == 0:
            raise ValueError(f"k-space '{path}': no imaging acquisitions in /dataset/data")
        if len(set(channels.tolist())) != 1 or len(set(samples.tolist())) != 1:
            raise ValueError(
                f"k-space '{path}': acquisitions differ in channels or samples "
                f"({sorted(set(channels.tolist()))}, {sorted(set(samples.tolist()))})"
            )
        matrix = self._matrix(handle)
        ny = matrix[1] if matrix else int(self.ky.max()) + 1
        nz = matrix[2] if matrix else int(self.kz.max()) + 1
        if self.ky.max() >= ny or self.kz.max() >= nz:
            raise ValueError(f"k-space '{path}': encode steps exceed the matrix ({ny}, {nz})")
        self.shape = (int(channels[0]), int(samples[0]), int(ny), int(nz))

    @staticmethod
    def _matrix(handle: Any) -> tuple[int, int, int] | None:
        if "xml" not in handle["dataset"]:
            return None
        import re

        raw = handle["dataset"]["xml"][()]
        text = raw[0] if isinstance(raw, np.ndarray) else raw
        text = text.decode() if isinstance(text, bytes) else str(text)
        enc = re.search(r"<encodedSpace>.*?<matrixSize>(.*?)</matrixSize>", text, re.S)
        if not enc:
            return None
        dims = [re.search(rf"<{a}>\s*(\d+)\s*</{a}>", enc.group(1)) for a in "xyz"]
        if not all(dims):
            return None
        return tuple(int(m.group(1)) for m in dims)  # type: ignore[union-attr,return-value]

    def read_ky(self, j0: int, j1: int) -> np.ndarray:
        c, kx, _, kz = self.shape
        out = np.zeros((c, kx, j1 - j0, kz), dtype=np.complex64)
        sel = np.nonzero((self.ky >= j0) & (self.ky < j1))[0]
        if len(sel):
            records = self.data[np.sort(self.rows[sel]).tolist()]
            order = np.argsort(self.rows[sel])
            for rec, s in zip(records, sel[order]):
                line = np.asarray(rec["data"], dtype=np.float32).reshape(c, kx, 2)
                out[:, :, self.ky[s] - j0, self.kz[s]] = line[..., 0] + 1j * line[..., 1]
        return out


class _RemoteHDF5:
    """An HDF5 file read through an fsspec file object: closing it closes both."""

    def __init__(self, url: str) -> None:
        import h5py

        self.fileobj = open_url(url)
        try:
            self.file = h5py.File(self.fileobj, "r")
        except BaseException:
            self.fileobj.close()
            raise

    def __getitem__(self, key: str) -> Any:
        return self.file[key]

    def __contains__(self, key: str) -> bool:
        return key in self.file

    def keys(self) -> Any:
        return self.file.keys()

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.fileobj.close()


def open_kspace(path: str, dataset: str = "kspace") -> tuple[KSpaceSource, Any]:
    """The k-space source of ``path`` (a local path or a URL) and a handle to close (or ``None``)."""
    if not is_url(path) and not Path(path).exists():
        raise FileNotFoundError(f"k-space '{path}' does not exist")
    if path.endswith(".npy"):
        return ArrayKSpace(path, NpyArray(path)), None
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - h5py is a dependency
        raise ImportError("reading HDF5 k-space needs h5py (pip install h5py)") from err
    handle = _RemoteHDF5(path) if is_url(path) else h5py.File(path, "r")
    try:
        if dataset in handle:
            return ArrayKSpace(path, handle[dataset]), handle
        if "dataset" in handle and "data" in handle["dataset"]:
            return ISMRMRDKSpace(path, handle), handle
        raise ValueError(
            f"k-space '{path}': no dataset {dataset!r} and no ISMRMRD /dataset/data "
            f"(found {sorted(handle.keys())}); pass --dataset NAME"
        )
    except Exception:
        handle.close()
        raise


def detect_calibration(mask: np.ndarray) -> int:
    """The side of the largest fully sampled square block centred on ``(H//2, W//2)``."""
    from operators3d import calibration_region

    h, w = mask.shape
    best = 0
    for c in range(1, min(h, w) + 1):
        rows, cols = calibration_region((h, w), c)
        if not mask[rows, cols].all():
            break
        best = c
    return best


# ----------------------------------------------------------------------------- CT sources
def _read_image(path: str) -> np.ndarray:
    """A ``.npy`` or TIFF image, local or at a URL (read through a file object)."""
    import tifffile

    if is_url(path):
        with open_url(path) as f:
            return np.load(f) if path.endswith(".npy") else tifffile.imread(f)
    if path.endswith(".npy"):
        return np.load(path)
    return tifffile.imread(path)


def _is_dir(path: str) -> bool:
    """Whether ``path`` (local or a URL) is a folder."""
    if is_url(path):
        from fsspec.core import url_to_fs

        fs, key = url_to_fs(path)
        return bool(fs.isdir(key))
    return os.path.isdir(path)


def _url_tiff_files(source: str) -> list[str]:
    """The TIFFs of a folder URL (by name) or the matches of a glob URL, as URLs."""
    from fsspec.core import url_to_fs

    fs, key = url_to_fs(source)
    if any(c in key for c in "*?["):  # a glob
        found = fs.glob(key)
    elif fs.isdir(key):
        found = [p for p in fs.ls(key, detail=False) if p.lower().endswith((".tif", ".tiff"))]
    else:
        found = []
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def _tiff_files(source: str) -> list[str]:
    if is_url(source):
        return _url_tiff_files(source)
    if os.path.isdir(source):
        files = sorted(
            str(p) for p in Path(source).iterdir() if p.suffix.lower() in (".tif", ".tiff")
        )
    else:
        files = sorted(glob.glob(source))
    return files


class ProjectionSource:
    """Projections ``(A, V, U)`` read in blocks of angles."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.files: list[str] = []
        self.array = None
        if source.endswith(".npy"):
            if not is_url(source) and not Path(source).exists():
                raise FileNotFoundError(f"projections '{source}' do not exist")
            self.array = NpyArray(source)
            if self.array.ndim != 3:
                raise ValueError(f"projections '{source}': expected (A, V, U), got {self.array.shape}")
            self.shape = tuple(int(s) for s in self.array.shape)
        else:
            self.files = _tiff_files(source)
            if not self.files:
                raise FileNotFoundError(f"projections '{source}': no .tif/.tiff files found")
            first = _read_image(self.files[0])
            if first.ndim != 2:
                raise ValueError(f"projection '{self.files[0]}': expected one (V, U) image, got {first.shape}")
            self.shape = (len(self.files), int(first.shape[0]), int(first.shape[1]))

    def read(self, a0: int, a1: int) -> np.ndarray:
        """``(a1 − a0, V, U)`` float32 (a fresh array the caller may modify)."""
        if self.array is not None:
            return np.asarray(self.array[a0:a1], dtype=np.float32)
        out = np.empty((a1 - a0,) + self.shape[1:], dtype=np.float32)
        for k, path in enumerate(self.files[a0:a1]):
            img = _read_image(path)
            if img.shape != self.shape[1:]:
                raise ValueError(
                    f"projection '{path}' (angle {a0 + k}): shape {img.shape} differs from "
                    f"the first projection's {self.shape[1:]}"
                )
            out[k] = img
        return out


def read_field(path: str | None, shape: tuple[int, int], what: str) -> np.ndarray | None:
    if path is None:
        return None
    if _is_dir(path):
        stack = np.stack([_read_image(f) for f in _tiff_files(path)])
    else:
        stack = np.asarray(_read_image(path), dtype=np.float64)
    if stack.ndim == 3:
        stack = stack.mean(axis=0)
    if stack.shape != shape:
        raise ValueError(f"ingest ct: {what} '{path}' has shape {stack.shape}, projections are {shape}")
    return stack.astype(np.float64)
