"""Reading scans: :func:`open_scan`, :class:`Scan` and checked, chunk-aligned reads.

Every read goes through :meth:`ScanArray.read`, which

1. checks that each stored object (chunk, or shard) along D that the read touches is in the
   store — zarr would silently return the fill value for a missing one;
2. reads one stored object at a time (a whole shard in one request, see
   :mod:`pipeline.data._objectstore`), turning a decode failure into :class:`CorruptChunkError`;
3. optionally checks that the values are finite.

Each error names the scan, the array and the chunk index (and the D range it covers).
Nothing here writes: scans are opened read-only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import zarr

from .format import (
    ATTRS_KEY,
    REQUIRED,
    CorruptChunkError,
    CTGeometry,
    IncompleteScanError,
    MissingChunkError,
    MRIGeometry,
    ScanError,
    ScanMetadata,
    specs_for,
)
from ._objectstore import read_d_range
from .store import (
    d_axis_of,
    metadata_error,
    missing_chunks,
    open_group,
    stored_depth_of,
)

__all__ = ["Scan", "ScanArray", "open_scan", "slab_slices"]


def _dtype_name(dtype: Any) -> str:
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return str(dtype)


class ScanArray:
    """One array of a scan, read in D-ranges with presence, decode and finite checks.

    Shape:
        ``shape`` of the zarr array; :meth:`read` returns the D-range along :attr:`d_axis`
        (the whole array when it has no ``d`` dimension).
    """

    def __init__(self, array: zarr.Array, name: str, scan: str) -> None:
        self.array = array
        self.name = name
        self.scan = scan
        self.d_axis = d_axis_of(array)
        self.shape: tuple[int, ...] = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(_dtype_name(array.dtype))
        self.chunk_depth = int(array.chunks[self.d_axis]) if self.d_axis is not None else None
        self.stored_depth = stored_depth_of(array)

    # ------------------------------------------------------------------ info
    @property
    def depth(self) -> int:
        """Length of the ``d`` dimension (1 for arrays without one)."""
        return self.shape[self.d_axis] if self.d_axis is not None else 1

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize

    def where(self, index: int | None = None) -> str:
        """``scan 'S': array 'A'[, chunk (…) covering D a:b]`` for error messages."""
        text = f"scan '{self.scan}': array '{self.name}'"
        if index is not None:
            coords = [0] * len(self.shape)
            if self.d_axis is not None:
                coords[self.d_axis] = index
                d0 = index * self.chunk_depth
                d1 = min(d0 + self.chunk_depth, self.depth)
                text += f": chunk {tuple(coords)} (D {d0}:{d1})"
            else:
                text += f": chunk {tuple(coords)}"
        return text

    def __repr__(self) -> str:
        return f"ScanArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, scan={self.scan!r})"

    # ------------------------------------------------------------------ reads
    def _normalise(self, d_slice: slice | None) -> tuple[int, int]:
        if self.d_axis is None:
            return 0, 1
        if d_slice is None:
            return 0, self.depth
        if not isinstance(d_slice, slice) or d_slice.step not in (None, 1):
            raise ValueError(f"{self.where()}: expected a contiguous D slice, got {d_slice!r}")
        start, stop, _ = d_slice.indices(self.depth)
        if stop <= start:
            raise ValueError(f"{self.where()}: empty D slice {d_slice!r} of D={self.depth}")
        return start, stop

    def check_present(self, d_slice: slice | None = None) -> None:
        """Raise :class:`MissingChunkError` if a stored object the D-range needs is absent."""
        start, stop = self._normalise(d_slice)
        if self.d_axis is None:
            objects = [0]
        else:
            objects = list(range(start // self.stored_depth, (stop - 1) // self.stored_depth + 1))
        missing = missing_chunks(self.array, objects)
        if missing:
            first = missing[0]
            if self.stored_depth != self.chunk_depth and self.d_axis is not None:
                d0 = first * self.stored_depth
                what = f"{self.where()}: shard {first} (D {d0}:{min(d0 + self.stored_depth, self.depth)})"
            else:
                what = self.where(first if self.d_axis is not None else None)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MissingChunkError(
                f"{what} is missing from the store{more}; zarr would read it as fill values. "
                "Rerun the command that wrote the scan, or restore the chunk"
            )

    def _read_chunk(self, index: int, lo: int, hi: int) -> np.ndarray:
        sel: list[Any] = [slice(None)] * len(self.shape)
        if self.d_axis is not None:
            sel[self.d_axis] = slice(lo, hi)
        try:
            return np.asarray(self.array[tuple(sel)])
        except Exception as err:  # codecs raise RuntimeError, ValueError, TypeError...
            where = self.where(index if self.d_axis is not None else None)
            if "checksum" in str(err).lower():
                # zarr's crc32c codec: the stored bytes changed after they were written.
                raise CorruptChunkError(
                    f"{where}: cannot be decoded: its CRC32C checksum does not match ({err}); the "
                    "chunk changed after it was written (a flipped bit, a bad disk or copy): "
                    "restore it, or rewrite the scan with the command that made it"
                ) from None
            raise CorruptChunkError(
                f"{where}: cannot be decoded ({type(err).__name__}: {err}); the chunk is truncated or corrupt"
            ) from None

    def read(self, d_slice: slice | None = None, *, check_finite: bool = True) -> np.ndarray:
        """The D-range ``d_slice`` (all of D if ``None``) as a numpy array.

        Raises:
            MissingChunkError: a chunk or shard the range needs is not in the store.
            CorruptChunkError: a chunk does not decode, or holds NaN/Inf (``check_finite``).

        Shape:
            the array's shape with D cut to the range.
        """
        start, stop = self._normalise(d_slice)
        self.check_present(d_slice)
        if self.d_axis is None:
            out = self._read_chunk(0, 0, 1)
            if check_finite:
                self._check_finite(out, 0)
            return out
        # One zarr read per stored object (a whole shard in one request), into one result.
        return read_d_range(self, start, stop, check_finite=check_finite)

    def _check_finite(self, values: np.ndarray, index: int) -> None:
        if values.dtype.kind not in "fc":
            return
        if not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise CorruptChunkError(
                f"{self.where(index if self.d_axis is not None else None)}: holds {bad} NaN/Inf "
                "values (a chunk missing inside a shard also reads as NaN)"
            )

    def read_torch(self, d_slice: slice | None = None, *, check_finite: bool = True) -> torch.Tensor:
        """:meth:`read` as a torch tensor (bool, float32, complex64 as stored)."""
        return torch.from_numpy(np.ascontiguousarray(self.read(d_slice, check_finite=check_finite)))

    def __getitem__(self, d_slice: slice) -> np.ndarray:
        return self.read(d_slice)


def slab_slices(depth: int, thickness: int, chunk_depth: int) -> list[slice]:
    """Consecutive D-slabs of ``thickness`` (a multiple of ``chunk_depth``) covering ``depth``.

    The last slab is shorter when ``thickness`` does not divide ``depth``.
    """
    if thickness < 1 or thickness % chunk_depth:
        raise ValueError(
            f"slab thickness {thickness} must be a positive multiple of the chunk depth "
            f"{chunk_depth} (slabs are aligned to chunks): use a multiple of {chunk_depth}, or make the "
            f"scan with a --chunk-depth that divides {max(thickness, 1)} (recon3d simulate/ingest)"
        )
    return [slice(d, min(d + thickness, depth)) for d in range(0, depth, thickness)]


class Scan:
    """An open scan: metadata, checked arrays and the exact operator of any D-slab.

    Attributes:
        path: where the scan lives (folder or URL).
        metadata: :class:`~pipeline.data.format.ScanMetadata`.
        measurements: CT ``(D, A, U)`` float32 or MRI ``(C, D, kH, kW)`` complex64.
        reference: ``(D, H, W)`` or ``None``.
        mask: MRI ``(kH, kW)`` bool, else ``None``.
        coil_maps: MRI ``(C, D, H, W)`` complex64, else ``None``.
        angles: CT ``(A,)`` float64 radians, else ``None``.
    """

    def __init__(
        self,
        path: Any,
        *,
        allow_incomplete: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = str(path)
        self._allow_incomplete = allow_incomplete
        self._storage_options = dict(storage_options or {})
        self._open()

    # ------------------------------------------------------------------ open/validate
    def _open(self) -> None:
        self.group = open_group(self.path, mode="r", storage_options=self._storage_options)
        attrs = dict(self.group.attrs)
        if ATTRS_KEY not in attrs:
            raise ScanError(f"scan '{self.path}': no '{ATTRS_KEY}' attributes; not a recon3d scan")
        self.metadata = ScanMetadata.from_dict(attrs[ATTRS_KEY], where=f"scan '{self.path}'")
        if self.metadata.status != "complete" and not self._allow_incomplete:
            raise IncompleteScanError(
                f"scan '{self.path}': status is '{self.metadata.status}': the job that writes it "
                "has not finished; rerun the same command to finish it (`recon3d inspect --check` "
                "lists what is missing)"
            )
        try:
            self._open_arrays()
        except ScanError:
            raise
        except Exception as err:  # an array's zarr.json that zarr cannot read (JSON, fields)
            raise metadata_error(self.path, err, storage_options=self._storage_options) from None
        self._mask_tensor: torch.Tensor | None = None
        self._angles_tensor: torch.Tensor | None = None
        self._ct_operator = None
        self._ct_slab_ops: dict[int, Any] = {}

    def _open_arrays(self) -> None:
        self._arrays: dict[str, ScanArray] = {}
        specs = specs_for(self.metadata)
        members = set(self.group.array_keys())
        for name in REQUIRED[self.metadata.modality]:
            # An unfinished writer may not have created every array yet.
            if name not in members and self.metadata.status == "complete":
                raise ScanError(f"scan '{self.path}': required array '{name}' is missing")
        for name, spec in specs.items():
            if name not in members:
                continue
            arr = self.group[name]
            where = f"scan '{self.path}': array '{name}'"
            got_dtype = _dtype_name(arr.dtype)
            if got_dtype != spec.dtype:
                raise ScanError(f"{where}: dtype must be {spec.dtype}, got {got_dtype}")
            if tuple(arr.shape) != spec.shape:
                raise ScanError(
                    f"{where}: shape must be {spec.shape} {spec.dims} to agree with the metadata "
                    f"({self._agreement_hint(name)}), got {tuple(arr.shape)}"
                )
            if d_axis_of(arr) != spec.d_axis:
                raise ScanError(
                    f"{where}: dimension_names must be {spec.dims}, got {arr.metadata.dimension_names}"
                )
            if spec.d_axis is not None:
                chunks = tuple(arr.chunks)
                want = list(spec.shape)
                want[spec.d_axis] = min(self.metadata.chunk_depth, spec.shape[spec.d_axis])
                if chunks != tuple(want):
                    raise ScanError(
                        f"{where}: chunks must be {tuple(want)} (chunk_depth "
                        f"{self.metadata.chunk_depth} along D, whole elsewhere), got {chunks}"
                    )
            self._arrays[name] = ScanArray(arr, name, self.path)
        if "derived" in set(self.group.group_keys()):
            # Reads every derived array's zarr.json now, so a corrupt one fails at open (named),
            # not later in the middle of a job.
            self.derived_names()

    def _agreement_hint(self, name: str) -> str:
        meta = self.metadata
        geom = meta.geometry
        if isinstance(geom, MRIGeometry):
            return f"num_coils={geom.num_coils}, volume_shape={meta.volume_shape}, matrix={geom.matrix}"
        assert isinstance(geom, CTGeometry)
        return f"num_angles={geom.num_angles}, det_shape={geom.det_shape}, volume_shape={meta.volume_shape}"

    def __getstate__(self) -> dict[str, Any]:
        # zarr handles are reopened in the receiving process (DataLoader workers).
        return {
            "path": self.path,
            "allow_incomplete": self._allow_incomplete,
            "storage_options": self._storage_options,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._allow_incomplete = state["allow_incomplete"]
        self._storage_options = state["storage_options"]
        self._open()

    def __repr__(self) -> str:
        return (
            f"Scan({self.path!r}, {self.metadata.modality}, volume {self.metadata.volume_shape}, "
            f"status {self.metadata.status})"
        )

    # ------------------------------------------------------------------ arrays
    def _get(self, name: str) -> ScanArray | None:
        return self._arrays.get(name)

    @property
    def modality(self) -> str:
        return self.metadata.modality

    @property
    def measurements(self) -> ScanArray:
        if "measurements" not in self._arrays:
            raise ScanError(f"scan '{self.path}': array 'measurements' is not written yet (incomplete scan)")
        return self._arrays["measurements"]

    @property
    def reference(self) -> ScanArray | None:
        return self._get("reference")

    @property
    def mask(self) -> ScanArray | None:
        return self._get("mask")

    @property
    def coil_maps(self) -> ScanArray | None:
        return self._get("coil_maps")

    @property
    def angles(self) -> ScanArray | None:
        return self._get("angles")

    @property
    def chunk_depth(self) -> int:
        return self.metadata.chunk_depth

    def derived_names(self) -> list[str]:
        """Names of the complete arrays under ``derived/`` (``fbp``, ``n2i``, ``adjoint``...)."""
        if "derived" not in set(self.group.group_keys()):
            return []
        group = self.group["derived"]
        out = []
        for name in sorted(group.array_keys()):
            info = dict(group[name].attrs).get(ATTRS_KEY, {})
            if isinstance(info, dict) and info.get("status") == "complete":
                out.append(name)
        return out

    def derived(self, name: str, *, allow_incomplete: bool = False) -> ScanArray:
        """The array ``derived/<name>`` written by ``recon3d preprocess``."""
        if name not in self.derived_names() and not allow_incomplete:
            raise ScanError(
                f"scan '{self.path}': no complete array 'derived/{name}' (have "
                f"{self.derived_names()}); run `recon3d preprocess {self.path}`"
            )
        key = f"derived/{name}"
        if key not in self._arrays:
            self._arrays[key] = ScanArray(self.group["derived"][name], key, self.path)
        return self._arrays[key]

    # ------------------------------------------------------------------ operators
    def _mask(self) -> torch.Tensor:
        if self._mask_tensor is None:
            assert self.mask is not None
            self._mask_tensor = self.mask.read_torch()
        return self._mask_tensor

    def _angles(self) -> torch.Tensor:
        if self._angles_tensor is None:
            assert self.angles is not None
            self._angles_tensor = self.angles.read_torch().to(torch.float32)
        return self._angles_tensor

    def slab_slices(self, thickness: int | None = None) -> list[slice]:
        """Chunk-aligned D-slabs of the measurements (``thickness`` default: one chunk)."""
        t = self.chunk_depth if thickness is None else int(thickness)
        return slab_slices(self.metadata.measurement_depth, t, self.chunk_depth)

    def full_operator(self):
        """The operator of the whole scan for CT (holds no measurement data); MRI: see slabs."""
        meta = self.metadata
        geom = meta.geometry
        if isinstance(geom, MRIGeometry):
            raise ScanError(
                f"scan '{self.path}': the whole-scan MRI operator holds all coil maps; use "
                "operator(d_slice)"
            )
        if self._ct_operator is None:
            from .ct_ops import ct_operator

            self._ct_operator = ct_operator(meta, self._angles())
        return self._ct_operator

    def operator(self, d_slice: slice, *, coil_maps: torch.Tensor | None = None):
        """The exact operator of the D-slab ``d_slice`` of the volume.

        MRI (hybrid space): ``MultiCoilMRI(mask, coil_maps[:, d_slice])``, image
        ``(d, H, W)`` → k-space ``(C, d, kH, kW)``; ``coil_maps`` gives the slab's maps already
        read (through a shard cache, say) instead of reading them here. Parallel-beam CT: the projector of the
        slab, ``(d, H, W)`` → ``(d, A, U)``. Cone beam couples D-slices: a slab has no exact
        operator of its own (use image-domain crops of ``derived/`` arrays), so this raises.
        """
        meta = self.metadata
        if isinstance(meta.geometry, MRIGeometry):
            assert self.coil_maps is not None
            from operators3d import MultiCoilMRI

            maps = self.coil_maps.read_torch(d_slice) if coil_maps is None else coil_maps
            return MultiCoilMRI(mask=self._mask(), coil_maps=maps)
        if meta.geometry.kind == "cone":
            raise ScanError(
                f"scan '{self.path}': cone-beam rays cross D-slabs, so a slab has no exact "
                "operator of its own; use the whole-scan operator (full_operator) or "
                "image-domain crops of derived volumes (SlabStreamConfig(mode='image'))"
            )
        start, stop, _ = d_slice.indices(meta.volume_shape[0])
        # A parallel-beam slab's operator depends only on its thickness: build it once (its
        # tables are then also shared, not copied, when DataLoader workers send it).
        thickness = stop - start
        if thickness not in self._ct_slab_ops:
            self._ct_slab_ops[thickness] = self.full_operator().slab(slice(start, stop))
        return self._ct_slab_ops[thickness]

    def slab(self, d_slice: slice, *, check_finite: bool = True) -> tuple[torch.Tensor, Any]:
        """``(y_slab, op_slab)``: the measurements of a D-slab and its exact operator."""
        op = self.operator(d_slice)  # first: raises for cone beam before reading anything
        return self.measurements.read_torch(d_slice, check_finite=check_finite), op


def open_scan(
    path: Any,
    *,
    allow_incomplete: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Scan:
    """Open a scan read-only and validate its metadata against its arrays.

    Args:
        path: a local folder or an fsspec URL of the scan's zarr v3 group.
        allow_incomplete: open a scan whose writer has not finished (for inspection).
        storage_options: passed to fsspec for URLs.

    Raises:
        ScanError: not a recon3d scan, unsupported version, a required array missing, an
            array whose dtype, shape or chunking disagrees with the metadata (angle count vs
            ``A``, coil count vs ``C``...).
        IncompleteScanError: the writing job has not finished (unless ``allow_incomplete``).
    """
    return Scan(path, allow_incomplete=allow_incomplete, storage_options=storage_options)

