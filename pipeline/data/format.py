"""The recon3d scan format: one zarr v3 group per scan (see ``docs/scan-format.md``).

This module holds what every reader and writer shares: the typed metadata stored under the
group attribute ``recon3d``, the array layouts (names, dimension names, dtypes, chunking along
D), the codec configuration and the errors. Opening stores (local folders or fsspec URLs) and
the chunk-level helpers are in :mod:`pipeline.data.store`; together they give the integrity
rules everything else relies on:

* **chunk presence.** zarr returns the fill value for a chunk that is not in the store; here
  every read first checks that the stored objects (chunks, or shards when sharded) it touches
  exist, and raises :class:`MissingChunkError` naming the scan, the array and the chunk index.
  Float arrays also use NaN as their fill value, so anything that slips past (an inner chunk
  missing from a shard) is caught by the finite check.
* **checksums.** Every chunk carries a CRC32C by default (:class:`CodecConfig`), which zarr
  checks on each read: a flipped byte that still decodes raises :class:`CorruptChunkError`
  instead of reaching training or a reconstruction as plausible numbers.
* **completion.** A writer creates the scan with ``status: "incomplete"``, writes whole stored
  objects (zarr writes each one atomically on local stores and object stores) and sets
  ``status: "complete"`` at the end. A stored object exists only once fully written, so on a
  rerun the work still to do is exactly the slabs whose objects are missing.

Shape conventions: CT ``measurements (D, A, U)`` float32; MRI ``measurements (C, D, kH, kW)``
complex64 in hybrid space; ``reference (D, H, W)``; every array with a ``d`` dimension is
chunked along it with the scan's ``chunk_depth`` and whole along the other dimensions.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from pydantic import Field, field_validator

from pipeline.config_base import Settings
from pipeline.errors import InputError

__all__ = [
    "FORMAT_VERSION",
    "ATTRS_KEY",
    "ScanError",
    "MissingChunkError",
    "CorruptChunkError",
    "IncompleteScanError",
    "CodecConfig",
    "ScanMetadata",
    "MRIGeometry",
    "CTGeometry",
    "ArraySpec",
    "default_chunk_depth",
    "now_iso",
    "scan_name",
]

FORMAT_VERSION = 1
ATTRS_KEY = "recon3d"
#: Target size of one chunk when the chunk depth is chosen automatically.
TARGET_CHUNK_BYTES = 8 << 20


# ----------------------------------------------------------------------------- errors
class ScanError(InputError):
    """A scan is malformed, incomplete or unreadable; the message names scan, array, chunk.

    An :class:`~pipeline.errors.InputError` (exit status 2, still a ``ValueError``): the user
    must restore or rewrite the scan.
    """


class MissingChunkError(ScanError):
    """A chunk (or shard) that a read needs is not in the store."""


class CorruptChunkError(ScanError):
    """A chunk exists but does not decode, or holds NaN/Inf."""


class IncompleteScanError(ScanError):
    """The job that writes the scan has not finished (rerun it to finish)."""


def scan_name(path: Any) -> str:
    return str(path)


# ----------------------------------------------------------------------------- codecs
#: Blosc compressor names, and ``none`` for uncompressed chunks; Blosc shuffle modes.
COMPRESSORS = ("zstd", "lz4", "lz4hc", "zlib", "blosclz", "none")
SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")


#: The size ``shard_chunks: auto`` aims at for a shard on an object store: large enough that a
#: request's latency is small against its transfer, small enough for a writer's memory.
SHARD_TARGET_BYTES = 64 << 20


class CodecConfig(Settings):
    """How arrays are compressed.

    Args:
        compressor: a Blosc codec name (``zstd`` default, ``lz4``, ``lz4hc``, ``zlib``,
            ``blosclz``) or ``none`` for uncompressed chunks.
        clevel: compression level, 0–9.
        shuffle: ``shuffle`` (byte shuffle, default), ``bitshuffle`` or ``noshuffle``.
        checksum: append a CRC32C per chunk (the zarr v3 ``crc32c`` codec, last in the codec
            list), so a flipped bit is found on read even where the chunk still decodes.
            On by default; ``False`` (``--no-checksum``) leaves it out.
        shard_chunks: when > 0, store this many chunks along D per shard (zarr sharding, for
            object stores that dislike many small objects); 0 for one object per chunk;
            ``auto`` (default): sharded on an object store (about :data:`SHARD_TARGET_BYTES`
            per shard, see :meth:`chunks_per_shard`), one object per chunk on a local disk.
    """

    _where: ClassVar[str] = "CodecConfig"
    compressor: Literal[COMPRESSORS] = "zstd"
    clevel: int = Field(3, ge=0, le=9)
    shuffle: Literal[SHUFFLES] = "shuffle"
    checksum: bool = True
    shard_chunks: int | Literal["auto"] = Field("auto")

    @field_validator("shard_chunks", mode="before")
    @classmethod
    def _shard_chunks(cls, value: Any) -> Any:
        """A number (``"4"`` from a command line too, ``>= 0``) or ``auto``."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise ValueError(f"shard_chunks: a whole number of chunks per shard >= 0 (0: no sharding) or 'auto', "
                         f"got {value!r}")

    def chunks_per_shard(self, chunk_bytes: int, chunks_along_d: int, *, object_store: bool) -> int:
        """Chunks along D per shard for chunks of ``chunk_bytes`` (0: not sharded). ``auto``: on
        an object store, enough chunks for :data:`SHARD_TARGET_BYTES` (one request per shard,
        not per chunk), at most the array's depth; on a local disk 0 (one file per chunk)."""
        if self.shard_chunks != "auto":
            return int(self.shard_chunks)
        if not object_store:
            return 0
        count = min(chunks_along_d, -(-SHARD_TARGET_BYTES // max(1, int(chunk_bytes))))
        return count if count > 1 else 0  # a shard of one chunk is the chunk plus an index: no gain

    def resolved(self, slice_bytes: int, chunk_depth: int, depth: int, *, object_store: bool) -> "CodecConfig":
        """This codec with ``auto`` made a number, one for all the arrays of a job (their writers
        cover whole shards of every array only if all share the shard depth): from the largest
        array's bytes per D-slice (``slice_bytes``), the chunk depth and the largest depth."""
        if self.shard_chunks != "auto":
            return self
        chunk_depth = max(1, int(chunk_depth))
        count = self.chunks_per_shard(int(slice_bytes) * chunk_depth, -(-int(depth) // chunk_depth),
                                      object_store=object_store)
        return self.model_copy(update={"shard_chunks": count})

    def compressors(self) -> list:
        from zarr.codecs import BloscCodec, Crc32cCodec

        out: list = []
        if self.compressor != "none":
            out.append(BloscCodec(cname=self.compressor, clevel=int(self.clevel), shuffle=self.shuffle))
        if self.checksum:
            out.append(Crc32cCodec())
        return out

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def recorded(self, out: Any) -> dict[str, Any]:
        """The codec as a job records it (compared when resuming, hashed into fingerprints):
        ``auto`` for a local ``out`` is what it means there, 0 (unsharded), so outputs written
        before ``auto`` existed (when 0 was the default) still resume."""
        from pipeline.paths import is_url

        data = self.to_dict()
        if data["shard_chunks"] == "auto" and not is_url(out):
            data["shard_chunks"] = 0
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CodecConfig":
        return cls(**dict(data))


def on_object_store(group: Any) -> bool:
    """Whether a zarr group (or array) is in an object store (an fsspec store other than a local
    disk), where ``shard_chunks: auto`` shards: each object costs a request there."""
    fs = getattr(getattr(group, "store", None), "fs", None)
    if fs is None:  # zarr's LocalStore, MemoryStore
        return False
    protocol = fs.protocol
    return not set((protocol,) if isinstance(protocol, str) else protocol) & {"file", "local"}


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class MRIGeometry:
    """Cartesian multi-coil MRI in hybrid space (readout along D already inverse-transformed).

    Args:
        num_coils: ``C``.
        matrix: the phase-encoding grid ``(kH, kW)`` (equal to the image ``(H, W)``).
        acceleration: ``kH·kW / count(mask)``.
        calibration: the fully sampled centre block ``(cH, cW)`` (``(0, 0)`` if none).
    """

    num_coils: int
    matrix: tuple[int, int]
    acceleration: float
    calibration: tuple[int, int] = (0, 0)
    kind: str = "cartesian_hybrid"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_coils": int(self.num_coils),
            "matrix": [int(s) for s in self.matrix],
            "acceleration": float(self.acceleration),
            "calibration": [int(s) for s in self.calibration],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MRIGeometry":
        if data.get("kind") != "cartesian_hybrid":
            raise ScanError(f"MRI geometry kind must be 'cartesian_hybrid', got {data.get('kind')!r}")
        return cls(
            num_coils=int(data["num_coils"]),
            matrix=tuple(int(s) for s in data["matrix"]),  # type: ignore[arg-type]
            acceleration=float(data["acceleration"]),
            calibration=tuple(int(s) for s in data.get("calibration", (0, 0))),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class CTGeometry:
    """Parallel-beam or circular cone-beam CT (DESIGN.md, *CT*); lengths in the scan's units.

    Args:
        kind: ``parallel`` or ``cone``.
        num_angles: ``A`` (the angles themselves are the ``angles`` array, radians).
        det_shape: ``(V, U)`` detector rows and columns (``V`` is the measurements' D).
        det_spacing: detector pitch (on the detector).
        voxel_size: in-plane voxel size passed to the projector.
        src_dist: source to rotation axis (cone beam only).
        det_dist: rotation axis to detector (cone beam only).
        allow_truncation: the volume's corners may project past the detector (an ingested
            scan reconstructed on the square around the field-of-view circle).
    """

    kind: str
    num_angles: int
    det_shape: tuple[int, int]
    det_spacing: float = 1.0
    voxel_size: float = 1.0
    src_dist: float | None = None
    det_dist: float | None = None
    allow_truncation: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("parallel", "cone"):
            raise ScanError(f"CT geometry kind must be 'parallel' or 'cone', got {self.kind!r}")
        if self.kind == "cone" and (self.src_dist is None or self.det_dist is None):
            raise ScanError("CT cone-beam geometry needs src_dist and det_dist")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "num_angles": int(self.num_angles),
            "det_shape": [int(s) for s in self.det_shape],
            "det_spacing": float(self.det_spacing),
            "voxel_size": float(self.voxel_size),
            "allow_truncation": bool(self.allow_truncation),
        }
        if self.kind == "cone":
            out["src_dist"] = float(self.src_dist)  # type: ignore[arg-type]
            out["det_dist"] = float(self.det_dist)  # type: ignore[arg-type]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CTGeometry":
        return cls(
            kind=str(data.get("kind")),
            num_angles=int(data["num_angles"]),
            det_shape=tuple(int(s) for s in data["det_shape"]),  # type: ignore[arg-type]
            det_spacing=float(data.get("det_spacing", 1.0)),
            voxel_size=float(data.get("voxel_size", 1.0)),
            src_dist=None if data.get("src_dist") is None else float(data["src_dist"]),
            det_dist=None if data.get("det_dist") is None else float(data["det_dist"]),
            allow_truncation=bool(data.get("allow_truncation", False)),
        )


# ----------------------------------------------------------------------------- metadata
def _noise_fields(noise_model: Any, acquisition_noise: Any) -> dict[str, Any]:
    """The noise fields of stored metadata; a photon count of an older scan is a noise model now."""
    if (noise_model is None and isinstance(acquisition_noise, dict)
            and acquisition_noise.get("kind") == "transmission_poisson"):
        return {"noise_model": dict(acquisition_noise), "acquisition_noise": None}
    return {"noise_model": noise_model, "acquisition_noise": acquisition_noise}


@dataclass(frozen=True)
class ScanMetadata:
    """Everything under the group attribute ``recon3d``.

    Args:
        modality: ``mri`` or ``ct``.
        volume_shape: the image ``(D, H, W)``.
        geometry: :class:`MRIGeometry` or :class:`CTGeometry`.
        chunk_depth: D-slices per chunk of every array with a ``d`` dimension.
        noise_model: ``NoiseModel.to_dict()`` of the measurement noise when it is one of the
            operator models (``operators3d.noise_model_from_dict`` reads it; CT photon counting
            before ``−log`` is ``{"kind": "transmission_poisson", "photons": I0}``), else
            ``None``.
        acquisition_noise: how noise entered before the measurements were formed, when no
            operator noise model describes it, else ``None``. Scans written before the
            transmission model existed kept their photon count here; reading them moves it to
            ``noise_model``.
        detector: a non-linear detector (``None``: linear): ``{"model": "clip" | "quantize",
            "low", "high", ...}`` in the stored units; ``operators3d.nonlinear_from_dict(detector,
            A)`` is its forward model ``y = g(A x)`` (``docs/scan-format.md``).
        voxel_size: ``(dD, dH, dW)`` in ``units``.
        units: length unit of ``voxel_size`` and the geometry.
        status: ``incomplete`` while a job writes the scan, ``complete`` after.
        provenance: the tool, version, parameters and sources that made the scan.
        format_version: this format's version.
    """

    modality: str
    volume_shape: tuple[int, int, int]
    geometry: MRIGeometry | CTGeometry
    chunk_depth: int
    noise_model: dict[str, Any] | None = None
    acquisition_noise: dict[str, Any] | None = None
    detector: dict[str, Any] | None = None
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    units: str = "mm"
    status: str = "incomplete"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.modality not in ("mri", "ct"):
            raise ScanError(f"modality must be 'mri' or 'ct', got {self.modality!r}")
        want = MRIGeometry if self.modality == "mri" else CTGeometry
        if not isinstance(self.geometry, want):
            raise ScanError(f"a {self.modality} scan needs a {want.__name__}, got {self.geometry!r}")
        if len(self.volume_shape) != 3 or any(int(s) < 1 for s in self.volume_shape):
            raise ScanError(f"volume_shape must be positive (D, H, W), got {self.volume_shape}")
        if int(self.chunk_depth) < 1:
            raise ScanError(f"chunk_depth must be >= 1, got {self.chunk_depth}")
        if self.status not in ("incomplete", "complete"):
            raise ScanError(f"status must be 'incomplete' or 'complete', got {self.status!r}")
        if self.detector is not None and not (isinstance(self.detector, Mapping) and "model" in self.detector):
            raise ScanError(f"detector must be null or a mapping with a 'model', got {self.detector!r}")

    @property
    def measurement_depth(self) -> int:
        """D of ``measurements``: the volume's D, or the detector rows ``V`` for cone beam."""
        if isinstance(self.geometry, CTGeometry):
            return int(self.geometry.det_shape[0])
        return int(self.volume_shape[0])

    def noise(self):
        """The measurement noise model (``operators3d``) or ``None``."""
        if self.noise_model is None:
            return None
        from operators3d import noise_model_from_dict

        return noise_model_from_dict(self.noise_model)

    def replace(self, **changes: Any) -> "ScanMetadata":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": int(self.format_version),
            "modality": self.modality,
            "status": self.status,
            "volume_shape": [int(s) for s in self.volume_shape],
            "chunk_depth": int(self.chunk_depth),
            "voxel_size": [float(v) for v in self.voxel_size],
            "units": self.units,
            "geometry": self.geometry.to_dict(),
            "noise_model": self.noise_model,
            "acquisition_noise": self.acquisition_noise,
            "detector": self.detector,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "scan") -> "ScanMetadata":
        if not isinstance(data, Mapping):
            raise ScanError(f"{where}: attribute '{ATTRS_KEY}' must be a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ScanError(
                f"{where}: format_version {version!r} is not supported (this recon3d reads "
                f"{FORMAT_VERSION})"
            )
        try:
            modality = data["modality"]
            geom = data["geometry"]
            geometry: MRIGeometry | CTGeometry = (
                MRIGeometry.from_dict(geom) if modality == "mri" else CTGeometry.from_dict(geom)
            )
            return cls(
                modality=modality,
                volume_shape=tuple(int(s) for s in data["volume_shape"]),  # type: ignore[arg-type]
                geometry=geometry,
                chunk_depth=int(data["chunk_depth"]),
                **_noise_fields(data.get("noise_model"), data.get("acquisition_noise")),
                detector=data.get("detector"),
                voxel_size=tuple(float(v) for v in data.get("voxel_size", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
                units=str(data.get("units", "mm")),
                status=str(data.get("status", "incomplete")),
                provenance=dict(data.get("provenance") or {}),
                format_version=int(version),
            )
        except ScanError as err:
            raise ScanError(f"{where}: {err}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # A field missing or of the wrong type (a string for a shape, a number for the
            # geometry...): one line, not the traceback of whichever conversion met it.
            raise ScanError(
                f"{where}: malformed '{ATTRS_KEY}' attributes in its zarr.json "
                f"({type(err).__name__}: {err}); restore the file or rewrite the scan"
            ) from None


# ----------------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class ArraySpec:
    """Layout of one array of a scan: shape, dtype and dimension names (one of them ``d``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]

    @property
    def d_axis(self) -> int | None:
        return self.dims.index("d") if "d" in self.dims else None


def mri_specs(meta: ScanMetadata) -> dict[str, ArraySpec]:
    """The required arrays of an MRI scan (and ``reference``, present for simulated scans)."""
    geom = meta.geometry
    assert isinstance(geom, MRIGeometry)
    d, h, w = meta.volume_shape
    c = geom.num_coils
    kh, kw = geom.matrix
    return {
        "measurements": ArraySpec("measurements", (c, d, kh, kw), "complex64", ("coil", "d", "kh", "kw")),
        "mask": ArraySpec("mask", (kh, kw), "bool", ("kh", "kw")),
        "coil_maps": ArraySpec("coil_maps", (c, d, h, w), "complex64", ("coil", "d", "h", "w")),
        "reference": ArraySpec("reference", (d, h, w), "complex64", ("d", "h", "w")),
    }


def ct_specs(meta: ScanMetadata) -> dict[str, ArraySpec]:
    """The required arrays of a CT scan (and ``reference``, present for simulated scans)."""
    geom = meta.geometry
    assert isinstance(geom, CTGeometry)
    v, u = geom.det_shape
    return {
        "measurements": ArraySpec("measurements", (v, geom.num_angles, u), "float32", ("d", "angle", "u")),
        "angles": ArraySpec("angles", (geom.num_angles,), "float64", ("angle",)),
        "reference": ArraySpec("reference", tuple(meta.volume_shape), "float32", ("d", "h", "w")),
    }


def specs_for(meta: ScanMetadata) -> dict[str, ArraySpec]:
    return mri_specs(meta) if meta.modality == "mri" else ct_specs(meta)


#: Arrays a scan must hold (``reference`` and ``derived/*`` are optional).
REQUIRED = {"mri": ("measurements", "mask", "coil_maps"), "ct": ("measurements", "angles")}


def default_chunk_depth(bytes_per_slice: int, depth: int, target: int = TARGET_CHUNK_BYTES) -> int:
    """D-slices per chunk so one chunk holds about ``target`` bytes (at least 1, at most D)."""
    return int(max(1, min(depth, target // max(1, bytes_per_slice))))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
