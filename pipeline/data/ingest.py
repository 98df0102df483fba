"""``recon3d ingest mri|ct``: raw measurements into the scan format, out of core.

Both modalities need a transpose-like reordering (every output chunk along D takes a piece of
every input block), done in two passes through a temporary array inside the new scan
(``_ingest/``, removed at the end), so memory is bounded by one input block plus one output
chunk, never the data:

* **MRI.** Input k-space ``(C, kx, ky, kz)`` (a plain HDF5 dataset, an ISMRMRD-style
  ``/dataset/data`` acquisition list, or ``.npy``). Pass 1 reads blocks of ``ky`` columns,
  moves them to hybrid space by a centred inverse FFT along the readout ``kx``
  (``operators3d.readout_to_hybrid``; optionally keeping the central ``readout_crop``
  positions to drop readout oversampling), records which ``(ky, kz)`` were sampled, and writes
  the block into the temporary array chunked ``(C, chunk_depth, block, kz)``. Pass 2 gathers
  each D-chunk ``(C, chunk_depth, kH, kW)`` and writes ``measurements``; coil maps are
  estimated per chunk from the calibration block (``operators3d.estimate_coil_maps``, ESPIRiT)
  unless given.
* **CT.** Input projections ``(A, V, U)`` (a folder of TIFF files, one per angle, in name
  order, or ``.npy``). Pass 1 reads blocks of angles, applies the flat/dark correction
  ``I = (raw − dark)/(flat − dark)`` and ``−log`` when asked, and writes them into the
  temporary array chunked ``(chunk_depth, block, U)``; pass 2 writes each D-chunk of
  ``measurements (V, A, U)``.

Every step is a task of :mod:`pipeline.data.writer`, so a killed ingest resumes where it
stopped. The inputs are only read, by the readers of :mod:`pipeline.data.ingest_sources`.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from pydantic import Field, model_validator

from pipeline.config_base import PathStr, Settings
from pipeline.paths import is_url

from ._npy import NpyArray, open_url
from .detector import clip_record, detector_fractions, say_detector
from .format import (
    ArraySpec,
    CodecConfig,
    CTGeometry,
    MRIGeometry,
    ScanMetadata,
    ct_specs,
    default_chunk_depth,
    mri_specs,
)
from .ingest_sources import ProjectionSource, detect_calibration, open_kspace, read_field
from .writer import (
    RUN_SETTINGS,
    JobOutcome,
    SlabTask,
    finish_scan,
    prepare_scan,
    run_tasks,
    update_attrs,
)

__all__ = ["IngestMRIConfig", "IngestCTConfig", "ingest_mri", "ingest_ct"]

TMP = "_ingest"


# ----------------------------------------------------------------------------- configs
class IngestMRIConfig(Settings):
    """Settings of ``recon3d ingest mri``.

    Args:
        source: ``.h5``/``.hdf5`` (a ``dataset`` of shape ``(C, kx, ky, kz)`` or ISMRMRD
            ``/dataset/data``) or ``.npy`` ``(C, kx, ky, kz)`` complex.
        out: the scan to write.
        dataset: the HDF5 dataset name of plain k-space.
        readout_crop: keep this many central readout positions (removes readout
            oversampling); ``None`` keeps all.
        calibration: the calibration block side; ``None`` detects it from the mask.
        coil_maps: a ``.npy`` ``(C, D, H, W)`` of known maps; ``None`` estimates them (ESPIRiT).
        noise_sigma: the known noise σ (per real/imaginary part), stored as the noise model.
        espirit_kernel, espirit_threshold, espirit_crop: ESPIRiT settings.
        block_bytes: the memory for one block of either pass (per worker).
    """

    _where: ClassVar[str] = "ingest mri"
    _flags: ClassVar[bool] = True
    source: PathStr
    out: PathStr
    dataset: str = "kspace"
    readout_crop: int | None = None
    calibration: int | None = None
    coil_maps: PathStr | None = None
    noise_sigma: float | None = None
    espirit_kernel: int = 6
    espirit_threshold: float = 0.02
    espirit_crop: float = 0.95
    block_bytes: int = 128 << 20
    chunk_depth: int | None = None
    codec: CodecConfig = CodecConfig()
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    units: str = "mm"
    overwrite: bool = False
    workers: int = 2
    scheduler: str = "threads"
    progress: bool = True

    def parameters(self) -> dict[str, Any]:
        """What determines the scan's content (compared when resuming)."""
        return {**self.model_dump(exclude=set(RUN_SETTINGS)), "codec": self.codec.recorded(self.out)}


class IngestCTConfig(Settings):
    """Settings of ``recon3d ingest ct``.

    Args:
        source: a folder of TIFF projections (one per angle, sorted by name), a glob pattern
            of them, or a ``.npy`` ``(A, V, U)``.
        out: the scan to write.
        angles: a text or ``.npy`` file with one angle per projection; ``None`` spreads them
            uniformly over ``angle_range``.
        angle_range: ``(start, stop)`` in ``angles_unit``, endpoint excluded.
        angles_unit: ``rad`` or ``deg``.
        flat, dark: flat-field and dark-field images (a TIFF/``.npy`` image or stack, a
            folder of TIFFs; stacks are averaged).
        i0: the open-beam intensity when no flat field is given.
        log: apply ``−log`` to the normalised intensity (``False``: the input already holds
            line integrals).
        geometry: ``parallel`` or ``cone``; det_spacing, voxel_size, src_dist, det_dist as
            for simulate.
        volume_shape: the reconstruction grid ``(D, H, W)``; default ``(V, U', U')`` with
            ``U' = U · det_spacing / voxel_size`` (parallel beam): the square around the
            field-of-view circle, whose corners the detector does not see (the geometry
            records ``allow_truncation``).
        photons: incident photons, recorded as the acquisition noise when known.
        saturation: the detector's maximum reading as a fraction ``S`` of the open-beam
            intensity (after dark and flat correction): recorded as a ``clip`` detector with
            line integrals clipped from below at ``−log S``, so training measures through it.
            The data are stored as read (a flat field that varies across the detector moves
            each pixel's level a little; the recorded level is the one given).
        floor: the smallest reading as a fraction ``F < S`` of the open-beam intensity (a
            dark-noise floor, photon starvation): line integrals clipped from above at ``−log F``.
        block_bytes: the memory for one block of either pass (per worker).
    """

    _where: ClassVar[str] = "ingest ct"
    _flags: ClassVar[bool] = True
    source: PathStr
    out: PathStr
    angles: PathStr | None = None
    angle_range: tuple[float, float] = (0.0, 180.0)
    angles_unit: Literal["deg", "rad"] = "deg"
    flat: PathStr | None = None
    dark: PathStr | None = None
    i0: float | None = None
    log: bool = True
    geometry: Literal["parallel", "cone"] = "parallel"
    det_spacing: float = 1.0
    voxel_size: float = 1.0
    src_dist: float | None = None
    det_dist: float | None = None
    volume_shape: tuple[int, int, int] | None = None
    photons: float | None = None
    saturation: float | None = Field(None, gt=0, allow_inf_nan=False)
    floor: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    block_bytes: int = 128 << 20
    chunk_depth: int | None = None
    codec: CodecConfig = CodecConfig()
    units: str = "mm"
    overwrite: bool = False
    workers: int = 2
    scheduler: str = "threads"
    progress: bool = True

    @model_validator(mode="after")
    def _levels_in_order(self) -> "IngestCTConfig":
        if self.floor is not None and self.saturation is not None and self.floor >= self.saturation:
            raise ValueError(f"--floor F ({self.floor:g}) must be below --saturation S ({self.saturation:g})")
        return self

    def parameters(self) -> dict[str, Any]:
        """What determines the scan's content (compared when resuming); unset detector levels
        are left out, so scans ingested before they existed still resume."""
        params = {**self.model_dump(exclude=set(RUN_SETTINGS)), "codec": self.codec.recorded(self.out)}
        return {k: v for k, v in params.items() if not (k in ("saturation", "floor") and v is None)}


# ----------------------------------------------------------------------------- helpers
def _blocks(n: int, size: int) -> list[tuple[int, int, int]]:
    return [(i, a, min(a + size, n)) for i, a in enumerate(range(0, n, size))]


def _group_depth(stored: int, depth: int, bytes_per_row: int, budget: int) -> int:
    """D-rows per pass-2 task and per temporary chunk: a multiple of the stored depth whose
    rows fit in ``budget`` (fewer, larger temporary chunks keep the zarr overhead low)."""
    rows = max(stored, budget // max(1, bytes_per_row) // stored * stored)
    return int(min(rows, math.ceil(depth / stored) * stored))


def _tmp_array(group: zarr.Group, name: str, shape, chunks, dtype: str, *, resume: bool) -> zarr.Array:
    tmp = group.require_group(TMP)
    if resume and name in set(tmp.array_keys()):
        arr = tmp[name]
        if tuple(arr.shape) == tuple(shape) and tuple(arr.chunks) == tuple(chunks):
            return arr.with_config({"write_empty_chunks": True})
    from zarr.codecs import BloscCodec

    arr = tmp.create_array(
        name, shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
        compressors=[BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")],
        config={"write_empty_chunks": True}, overwrite=True,
    )
    return arr.with_config({"write_empty_chunks": True})


def _drop_tmp(group: zarr.Group) -> None:
    store = group.store_path.store
    prefix = f"{group.store_path.path}/{TMP}" if group.store_path.path else TMP
    sync(store.delete_dir(prefix))


def _final_arrays(group, specs: dict[str, ArraySpec], chunk_depth: int, codec: CodecConfig, *, resume: bool):
    from .simulate import _arrays

    return _arrays(group, specs, chunk_depth, codec, resume=resume)


# ----------------------------------------------------------------------------- MRI
def ingest_mri(config: IngestMRIConfig) -> JobOutcome:
    """Ingest 3D Cartesian k-space into an MRI scan (hybrid space); see the module docstring.

    Shape:
        source ``(C, kx, ky, kz)`` → ``measurements (C, D, ky, kz)`` with ``D = kx`` (or
        ``readout_crop``), ``mask (ky, kz)``, ``coil_maps (C, D, ky, kz)``.
    """
    from operators3d import GaussianNoise, estimate_coil_maps, readout_to_hybrid

    source, handle = open_kspace(config.source, config.dataset)
    try:
        c, kx, ky, kz = source.shape
        d = kx if config.readout_crop is None else int(config.readout_crop)
        if not 1 <= d <= kx:
            raise ValueError(f"ingest mri: --readout-crop must be in 1..{kx}, got {config.readout_crop}")
        crop0 = (kx - d) // 2 if config.readout_crop is not None else 0
        known_maps = None
        if config.coil_maps is not None:
            known_maps = NpyArray(config.coil_maps)
            if tuple(known_maps.shape) != (c, d, ky, kz) or known_maps.dtype.kind != "c":
                raise ValueError(
                    f"ingest mri: coil maps '{config.coil_maps}' must be complex (C, D, H, W) = "
                    f"{(c, d, ky, kz)}, got {known_maps.dtype} {tuple(known_maps.shape)}"
                )
        chunk_depth = min(config.chunk_depth or default_chunk_depth(c * ky * kz * 8, d), d)
        noise = None if config.noise_sigma is None else GaussianNoise(config.noise_sigma).to_dict()
        meta = ScanMetadata(
            modality="mri",
            volume_shape=(d, ky, kz),
            # Acceleration and calibration are known after pass 1 (updated then).
            geometry=MRIGeometry(c, (ky, kz), 1.0, (0, 0)),
            chunk_depth=chunk_depth,
            noise_model=noise,
            voxel_size=tuple(config.voxel_size),
            units=config.units,
        )
        group, state = prepare_scan(config.out, meta, config.parameters(), tool="recon3d ingest mri",
                                    overwrite=config.overwrite, sources=[_source_id(config.source)])
        if state == "complete":
            return JobOutcome(str(config.out), "already complete")
        resume = state == "resumed"
        specs = {k: s for k, s in mri_specs(meta).items() if k != "reference"}
        arrays = _final_arrays(group, specs, chunk_depth, config.codec, resume=resume)
        meas, maps_arr, mask_arr = arrays["measurements"], arrays["coil_maps"], arrays["mask"]
        # Pass 1: ky blocks of about block_bytes (input block, FFT copies and output);
        # pass 2: groups of `td` D-rows (a few slabs: ESPIRiT works on them).
        per_column = c * kx * kz * 8 * 3
        jb = max(1, min(ky, config.block_bytes // per_column))
        stored = meas.shards[1] if meas.shards is not None else chunk_depth
        td = _group_depth(stored, d, c * ky * kz * 8 * 4, config.block_bytes)
        hybrid = _tmp_array(group, "hybrid", (c, d, ky, kz), (c, td, jb, kz), "complex64", resume=resume)
        sampled = _tmp_array(group, "mask", (ky, kz), (jb, kz), "bool", resume=resume)
        num_d_chunks = math.ceil(d / td)

        def pass1(j0: int, j1: int) -> None:
            block = torch.from_numpy(source.read_ky(j0, j1))
            sampled[j0:j1] = (block.abs() > 0).any(dim=1).any(dim=0).numpy()
            hyb = readout_to_hybrid(block, readout_dim=1)[:, crop0 : crop0 + d]
            hybrid[:, :, j0:j1] = hyb.numpy()

        tasks = [
            SlabTask(
                f"ky{j}",
                (lambda a=j0, b=j1: pass1(a, b)),
                [(hybrid, (0, i, j, 0)) for i in range(num_d_chunks)] + [(sampled, (j, 0))],
            )
            for j, j0, j1 in _blocks(ky, jb)
        ]
        run_tasks(tasks, description="ingest mri: readout FFT", workers=config.workers,
                  scheduler=config.scheduler, progress=config.progress)

        mask = np.asarray(sampled[...])
        if not mask.any():
            raise ValueError(f"ingest mri: k-space '{config.source}' holds no nonzero sample")
        calib = config.calibration if config.calibration is not None else detect_calibration(mask)
        acc = mask.size / int(mask.sum())
        meta = meta.replace(geometry=MRIGeometry(c, (ky, kz), acc, (calib, calib)))
        update_attrs(group, geometry=meta.geometry.to_dict())
        if known_maps is None and calib < config.espirit_kernel:
            raise ValueError(
                f"ingest mri: the fully sampled calibration block is {calib}×{calib}, smaller "
                f"than the ESPIRiT kernel {config.espirit_kernel}; give --coil-maps or "
                "--calibration / --espirit-kernel"
            )

        def write_mask() -> None:
            mask_arr[...] = mask

        def pass2(g0: int, g1: int) -> None:
            group_rows = np.asarray(hybrid[:, g0:g1])
            for d0 in range(g0, g1, stored):  # whole stored objects, one at a time
                d1 = min(d0 + stored, g1)
                y = group_rows[:, d0 - g0 : d1 - g0]
                meas[:, d0:d1] = y
                if known_maps is not None:
                    maps = np.asarray(known_maps[:, d0:d1], dtype=np.complex64)
                else:
                    maps = estimate_coil_maps(
                        torch.from_numpy(np.ascontiguousarray(y)), calibration=calib,
                        kernel_size=config.espirit_kernel, threshold=config.espirit_threshold,
                        crop=config.espirit_crop,
                    ).numpy()
                maps_arr[:, d0:d1] = maps

        tasks2 = [SlabTask("mask", write_mask, [(mask_arr, 0)])]
        for i, g0, g1 in _blocks(d, td):
            objects = range(g0 // stored, math.ceil(g1 / stored))
            tasks2.append(SlabTask(f"d{i}", (lambda a=g0, b=g1: pass2(a, b)),
                                   [(arr, k) for k in objects for arr in (meas, maps_arr)]))
        ran = run_tasks(tasks2, description="ingest mri: chunks along D", workers=config.workers,
                        scheduler=config.scheduler, progress=config.progress)
        _drop_tmp(group)
        finish_scan(group)
        return JobOutcome(str(config.out), state, ran + len(tasks), len(tasks) + len(tasks2))
    finally:
        if handle is not None:
            handle.close()


def _source_id(source: str) -> str:
    """The source as recorded (and kept apart from the output): a URL as given, a path absolute."""
    return source if is_url(source) else os.path.abspath(source)


def _angles(config: IngestCTConfig, count: int) -> np.ndarray:
    scale = math.pi / 180 if config.angles_unit == "deg" else 1.0
    if config.angles is not None:
        path = config.angles
        if is_url(path):
            with open_url(path) as f:
                values = np.load(f) if path.endswith(".npy") else np.loadtxt(io.TextIOWrapper(f), ndmin=1)
        else:
            values = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=1)
        values = np.asarray(values, dtype=np.float64).ravel()
        if len(values) != count:
            raise ValueError(
                f"ingest ct: the angle list '{path}' has {len(values)} angles but there are "
                f"{count} projections"
            )
    else:
        start, stop = config.angle_range
        values = start + (stop - start) * np.arange(count) / count
    if not np.isfinite(values).all():
        raise ValueError("ingest ct: the angles hold NaN/Inf")
    return values * scale


# ----------------------------------------------------------------------------- CT
def ingest_ct(config: IngestCTConfig) -> JobOutcome:
    """Ingest a projection stack into a CT scan; see the module docstring.

    Shape:
        source ``(A, V, U)`` → ``measurements (V, A, U)`` float32, ``angles (A,)``.
    """
    from operators3d import TransmissionNoise

    source = ProjectionSource(config.source)
    a, v, u = source.shape
    angles = _angles(config, a)
    flat = read_field(config.flat, (v, u), "flat field")
    dark = read_field(config.dark, (v, u), "dark field")
    if config.log and flat is None and config.i0 is None:
        raise ValueError(
            "ingest ct: −log needs the open-beam intensity: give --flat FILE or --i0 VALUE, or "
            "--no-log if the projections already are line integrals"
        )
    if config.volume_shape is not None:
        vol = tuple(int(s) for s in config.volume_shape)
    else:
        n = max(1, int(round(u * config.det_spacing / config.voxel_size)))
        vol = (v, n, n)
    if config.geometry == "parallel" and vol[0] != v:
        raise ValueError(f"ingest ct: parallel beam needs volume D = detector rows V = {v}, got {vol[0]}")
    if config.geometry == "cone":
        if config.src_dist is None or config.det_dist is None:
            raise ValueError("ingest ct: cone beam needs --src-dist and --det-dist")
    geom = CTGeometry(config.geometry, a, (v, u), config.det_spacing, config.voxel_size,
                      config.src_dist, config.det_dist, allow_truncation=True)
    chunk_depth = min(config.chunk_depth or default_chunk_depth(a * u * 4, v), v)
    noise = None if config.photons is None else TransmissionNoise(config.photons).to_dict()
    detector = clip_record(config.saturation, config.floor, photons=config.photons)
    meta = ScanMetadata(modality="ct", volume_shape=vol, geometry=geom, chunk_depth=chunk_depth,
                        noise_model=noise, detector=detector,
                        voxel_size=(config.voxel_size,) * 3, units=config.units)
    group, state = prepare_scan(config.out, meta, config.parameters(), tool="recon3d ingest ct",
                                overwrite=config.overwrite, sources=[_source_id(config.source)])
    if state == "complete":
        return JobOutcome(str(config.out), "already complete")
    resume = state == "resumed"
    specs = {k: s for k, s in ct_specs(meta).items() if k != "reference"}
    arrays = _final_arrays(group, specs, chunk_depth, config.codec, resume=resume)
    meas, ang = arrays["measurements"], arrays["angles"]
    # Pass 1: blocks of `ab` angles, float32 and in place (one block of memory per task);
    # pass 2: groups of `td` detector rows. The temporary chunks are (td, ab, U).
    ab = max(1, min(a, config.block_bytes // (v * u * 4 * 2)))
    stored = meas.shards[0] if meas.shards is not None else chunk_depth
    td = _group_depth(stored, v, a * u * 4 * 2, config.block_bytes)
    tmp = _tmp_array(group, "sino", (v, a, u), (td, ab, u), "float32", resume=resume)
    num_d_chunks = math.ceil(v / td)
    scale = None
    if flat is not None:
        scale = (flat - (dark if dark is not None else 0.0)).astype(np.float32)
        if (scale <= 0).any():
            raise ValueError("ingest ct: flat − dark must be positive everywhere")
    dark32 = None if dark is None else dark.astype(np.float32)

    def pass1(a0: int, a1: int) -> None:
        values = source.read(a0, a1)
        if not np.isfinite(values).all():
            raise ValueError(f"ingest ct: projections {a0}:{a1} of '{config.source}' hold NaN/Inf")
        if config.log:
            if dark32 is not None:
                values -= dark32
            if scale is not None:
                values /= scale
            else:
                values /= np.float32(config.i0)
            np.clip(values, 1e-6, None, out=values)
            np.log(values, out=values)
            np.negative(values, out=values)
        tmp[:, a0:a1] = values.transpose(1, 0, 2)

    tasks = [
        SlabTask(f"a{j}", (lambda x=a0, y=a1: pass1(x, y)), [(tmp, (i, j, 0)) for i in range(num_d_chunks)])
        for j, a0, a1 in _blocks(a, ab)
    ]
    run_tasks(tasks, description="ingest ct: projections", workers=config.workers,
              scheduler=config.scheduler, progress=config.progress)

    def write_angles() -> None:
        ang[...] = angles

    def pass2(g0: int, g1: int) -> None:
        rows = np.asarray(tmp[g0:g1])
        for d0 in range(g0, g1, stored):
            meas[d0 : min(d0 + stored, g1)] = rows[d0 - g0 : min(d0 + stored, g1) - g0]

    tasks2 = [SlabTask("angles", write_angles, [(ang, 0)])]
    tasks2 += [
        SlabTask(f"d{i}", (lambda x=g0, y=g1: pass2(x, y)),
                 [(meas, k) for k in range(g0 // stored, math.ceil(g1 / stored))])
        for i, g0, g1 in _blocks(v, td)
    ]
    ran = run_tasks(tasks2, description="ingest ct: chunks along D", workers=config.workers,
                    scheduler=config.scheduler, progress=config.progress)
    _drop_tmp(group)
    if detector is None:
        finish_scan(group)
    else:  # the share of stored line integrals at or beyond each recorded level
        detector = {**detector, **detector_fractions(meas, detector)}
        finish_scan(group, detector=detector)
        say_detector(config.out, detector, "recon3d ingest ct")
    return JobOutcome(str(config.out), state, ran + len(tasks), len(tasks) + len(tasks2))

