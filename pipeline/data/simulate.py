"""``recon3d simulate mri|ct``: simulated scans with their reference, slab by slab.

Each slab of the volume is evaluated on its own (analytic phantoms per D-range, files read per
D-range), pushed through the exact slab operator, given noise drawn from a generator seeded by
``(seed, chunk index)`` and written as whole chunks. The result is therefore the same whatever
the slab size, the number of workers or how often the job was interrupted and resumed, and the
memory in use is a few slabs, never the volume.

MRI (hybrid space): ``y = M ⊙ F₂(S ⊙ x) + n`` per D-slice, ``x`` the phantom with a smooth phase
(unless ``phase=False``), ``S`` simulated coil maps, ``M`` a variable-density 2D mask with a
calibration block, ``n`` complex Gaussian (``σ`` per real and imaginary part) on sampled entries.

CT: ``p = A x`` (line integrals); with ``photons = I0`` the counts are ``N ~ Poisson(I0 e^{−p})``
and ``y = −log(max(N, 1) / I0)``; with ``noise_sigma`` ``y = p + σ n``. A non-ideal detector
(``saturation``, ``bits``) then acts on ``y`` entry by entry (:func:`detector_record`), and the
scan records it as ``detector`` (the :mod:`operators3d.nonlinear` model). Parallel beam is exact
slab by slab. Cone beam couples D-slices: every detector row sees a D-range of the volume, so
it is simulated in blocks of detector rows, each adding the exact projections of the volume
slabs its rays can cross (computed from the geometry), one slab at a time; memory is a slab
and a block of rows, whatever the volume (:mod:`pipeline.data.cone`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from pipeline.config_base import PathStr, Settings

from .format import (
    ArraySpec,
    CodecConfig,
    CTGeometry,
    MRIGeometry,
    ScanMetadata,
    ct_specs,
    default_chunk_depth,
    mri_specs,
    on_object_store,
)
from .phantoms import coil_maps_slab, derive_seed, make_volume_source, smooth_phase_slab
from .detector import apply_detector, clip_record, detector_fractions, detector_levels, say_detector
from .store import create_array, stored_depth_of
from .writer import RUN_SETTINGS, JobOutcome, SlabTask, finish_scan, prepare_scan, run_tasks, task_groups

__all__ = ["SimulateMRIConfig", "SimulateCTConfig", "simulate_mri", "simulate_ct", "detector_record"]


class SimulateMRIConfig(Settings):
    """Settings of ``recon3d simulate mri``.

    Args:
        out: the scan to write (folder or fsspec URL).
        shape: image ``(D, H, W)``; ``None`` takes it from a file phantom.
        coils: number of coils ``C``.
        acceleration: target ``H·W / count(mask)`` of the 2D (ky, kz) mask.
        calibration: side of the fully sampled centre block.
        mask: ``poisson`` (variable-density Poisson disc) or ``gaussian``.
        phantom: a name of :data:`~pipeline.data.phantoms.PHANTOMS` (``shepp-logan``,
            ``ellipsoids``, ``foam``, ``anatomy``, ``industrial``, ``organs``, ``NAME-crop``)
            or a ``.npy`` / zarr path.
        noise_sigma: σ of the complex Gaussian noise, per real and imaginary part (absolute,
            in k-space units; the orthonormal FFT keeps image and k-space scales equal).
        phase: multiply the phantom by a smooth phase (a real image is an unrealistic prior).
        one_bit: store one bit per real and imaginary part of each sampled value, its sign
            (``±1 ± 1i``; 0 outside the mask), recorded as a ``sign`` detector with threshold 0
            and ``gradient: zero``. The bits are taken of the stored hybrid-space values
            (``docs/scan-format.md``), where a scanner's comparators would see raw k-space: a
            simulation of the method, not of a receiver. The image's scale is lost.
        one_bit_width: the recorded ``width``: the temperature of the logistic consistency loss.
        one_bit_dither: with ``one_bit``, a dithered threshold: each sampled part is compared
            with its own ``τ ~ U[−Δ, Δ)`` (``Δ`` this value, k-space units), recorded as
            ``"dither": {"amplitude": Δ, "seed": s}`` with ``s = derive_seed(seed, "dither")``
            and rebuilt by :func:`operators3d.nonlinear.dither_threshold` (one ``τ`` per coil,
            k-space point and part, the same for every D-slice, so a slab's ``τ`` is the
            scan's). With ``|parts| ≤ Δ`` the mean bit is ``part/Δ``: the amplitudes and the
            scale stay in the data.
        seed: draws the phantom, mask, coil-map layout, noise and dither.
        chunk_depth: D-slices per chunk (default: about 8 MiB of measurements per chunk).
        codec: compression and sharding.
        voxel_size, units: physical voxel size ``(dD, dH, dW)`` and its unit.
        overwrite: replace an existing scan made with other parameters.
        workers: slabs computed at once; progress: show progress bars.
    """

    _where: ClassVar[str] = "simulate mri"
    _flags: ClassVar[bool] = True
    out: PathStr
    shape: tuple[int, int, int] | None = (32, 128, 128)
    coils: int = Field(8, ge=1)
    acceleration: float = Field(4.0, ge=1)
    calibration: int = Field(24, ge=0)
    mask: Literal["poisson", "gaussian"] = "poisson"
    phantom: str = "shepp-logan"
    noise_sigma: float = Field(0.0, ge=0, allow_inf_nan=False)
    phase: bool = True
    one_bit: bool = False
    one_bit_width: float = Field(0.05, gt=0, allow_inf_nan=False)
    one_bit_dither: float | None = Field(None, gt=0, allow_inf_nan=False)
    seed: int = 0
    chunk_depth: int | None = Field(None, ge=1)
    codec: CodecConfig = CodecConfig()
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    units: str = "mm"
    overwrite: bool = False
    workers: int = 2
    scheduler: str = "threads"
    progress: bool = True

    @model_validator(mode="after")
    def _dither_needs_one_bit(self) -> "SimulateMRIConfig":
        if self.one_bit_dither is not None and not self.one_bit:
            raise ValueError("one_bit_dither (--one-bit-dither) dithers the one-bit threshold: set one_bit "
                             "(--one-bit) as well")
        return self

    def parameters(self) -> dict[str, Any]:
        """What determines the scan's content (compared when resuming); the one-bit settings
        only when set, so scans written before they existed still resume."""
        params = {**self.model_dump(exclude=set(RUN_SETTINGS)), "codec": self.codec.recorded(self.out)}
        if not self.one_bit:
            params.pop("one_bit")
            params.pop("one_bit_width")
        if self.one_bit_dither is None:
            params.pop("one_bit_dither")
        return params


class SimulateCTConfig(Settings):
    """Settings of ``recon3d simulate ct``.

    Args:
        out: the scan to write.
        shape: volume ``(D, H, W)``; ``None`` takes it from a file phantom.
        angles: number of projection angles ``A`` (uniform over ``[0, π)`` for parallel beam,
            ``[0, 2π)`` for cone beam).
        geometry: ``parallel`` or ``cone``.
        phantom: a name of :data:`~pipeline.data.phantoms.PHANTOMS` (``shepp-logan``,
            ``ellipsoids``, ``foam``, ``anatomy``, ``industrial``, ``organs``, ``NAME-crop``)
            or a ``.npy`` / zarr path.
        attenuation: the line integral through the full width of value-1 material; the
            reference (attenuation per unit length) is the phantom times
            ``attenuation / (W · voxel_size)``.
        photons: incident photons ``I0`` per detector pixel (Poisson noise before ``−log``).
        noise_sigma: Gaussian noise σ on the line integrals (exclusive with ``photons``).
        det_count: detector columns ``U`` (default: the volume's diagonal).
        det_rows: cone beam detector rows ``V`` (default: enough for the magnified volume).
        det_spacing: detector pitch; voxel_size: in-plane voxel size.
        src_dist, det_dist: cone-beam source–axis and axis–detector distances (default 4·W
            and 2·W voxels).
        saturation: the detector's maximum count as a fraction ``S`` of the open-beam count
            (``S·I0`` photons with ``photons``): a ray transmitting more reads as ``S``, so
            the stored line integrals are clipped from below at ``−log S``.
        floor: the smallest count the detector reads, as a fraction ``F`` of the open-beam
            count (a dark-noise floor, photon starvation behind dense material): a ray
            transmitting less reads as ``F``, so the line integrals are clipped from above at
            ``−log F``. ``F < S``.
        bits: quantise the stored line integrals with a uniform ``B``-bit quantiser on
            ``[lo, hi] = [−log S (0 without saturation), −log F (attenuation without floor)]``.
        one_bit: store one bit per ray, ``sign(y − T)`` (``+1`` where the line integral is at
            least ``T``, else ``−1``): a comparator instead of an ADC. Not with the options above.
        one_bit_width: the recorded ``width`` of the one-bit model (line-integral units): the
            temperature of the logistic consistency loss a network is trained with.
        seed, chunk_depth, codec, units, overwrite, workers, progress: as for MRI.
    """

    _where: ClassVar[str] = "simulate ct"
    _flags: ClassVar[bool] = True
    out: PathStr
    shape: tuple[int, int, int] | None = (32, 128, 128)
    angles: int = Field(180, ge=1)
    geometry: Literal["parallel", "cone"] = "parallel"
    phantom: str = "shepp-logan"
    attenuation: float = Field(4.0, gt=0)
    photons: float | None = Field(None, gt=0)
    noise_sigma: float = Field(0.0, ge=0, allow_inf_nan=False)
    det_count: int | None = None
    det_rows: int | None = None
    det_spacing: float = 1.0
    voxel_size: float = 1.0
    src_dist: float | None = None
    det_dist: float | None = None
    saturation: float | None = Field(None, gt=0, allow_inf_nan=False)
    floor: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    bits: int | None = Field(None, ge=1, le=32)
    one_bit: float | None = Field(None, allow_inf_nan=False)
    one_bit_width: float = Field(0.1, gt=0, allow_inf_nan=False)
    seed: int = 0
    chunk_depth: int | None = Field(None, ge=1)
    codec: CodecConfig = CodecConfig()
    units: str = "mm"
    overwrite: bool = False
    workers: int = 2
    scheduler: str = "threads"
    progress: bool = True

    @model_validator(mode="after")
    def _one_noise(self) -> "SimulateCTConfig":
        if self.photons is not None and self.noise_sigma:
            raise ValueError("give --photons or --noise-sigma, not both")
        top = -math.log(self.floor) if self.floor is not None else self.attenuation
        if self.bits is not None and self.saturation is not None and -math.log(self.saturation) >= top:
            raise ValueError(f"--bits quantises [-log S, {'-log F' if self.floor else 'attenuation'}] = "
                             f"[{-math.log(self.saturation):.4g}, {top:.4g}]: raise --saturation"
                             f"{'' if self.floor else ' or --attenuation'}")
        if self.floor is not None and self.saturation is not None and self.floor >= self.saturation:
            raise ValueError(f"--floor F ({self.floor:g}) must be below --saturation S ({self.saturation:g}): "
                             "the detector reads counts between F·I0 and S·I0")
        if self.one_bit is not None and (self.bits, self.saturation, self.floor) != (None, None, None):
            raise ValueError("--one-bit T stores one bit per ray: not with --bits, --saturation or --floor")
        return self

    def parameters(self) -> dict[str, Any]:
        """What determines the scan's content (compared when resuming); an ideal detector's unset
        ``saturation``/``bits`` are left out, so scans written before they existed still resume."""
        params = {**self.model_dump(exclude=set(RUN_SETTINGS)), "codec": self.codec.recorded(self.out)}
        optional = ("saturation", "bits", "floor", "one_bit")
        if self.one_bit is None:
            params.pop("one_bit_width", None)
        return {k: v for k, v in params.items() if not (k in optional and v is None)}


# ----------------------------------------------------------------------------- helpers
def _chunk_generator(seed: int, what: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, what, index))


def _stored_ranges(depth: int, stored: int) -> list[tuple[int, int, int]]:
    """``(object index, d0, d1)`` of every stored object along D."""
    return [(i, d0, min(d0 + stored, depth)) for i, d0 in enumerate(range(0, depth, stored))]


# ----------------------------------------------------------------------------- MRI
def _make_mask(config: SimulateMRIConfig, grid: tuple[int, int]) -> torch.Tensor:
    from operators3d import gaussian_mask, poisson_disc_mask

    gen = torch.Generator().manual_seed(derive_seed(config.seed, "mask"))
    calib = min(config.calibration, *grid)
    if config.mask == "poisson":
        return poisson_disc_mask(grid, config.acceleration, calibration=calib, generator=gen)
    return gaussian_mask(grid, config.acceleration, calibration=calib, generator=gen)


def simulate_mri(config: SimulateMRIConfig) -> JobOutcome:
    """Write (or finish) a simulated multi-coil MRI scan; see the module docstring.

    Shape:
        ``measurements (C, D, H, W)`` complex64, ``coil_maps (C, D, H, W)``, ``mask (H, W)``,
        ``reference (D, H, W)`` complex64.
    """
    from operators3d import GaussianNoise, MultiCoilMRI, acceleration_of

    source = make_volume_source(config.phantom, config.shape, seed=config.seed)
    d, h, w = source.shape
    c = config.coils
    mask = _make_mask(config, (h, w))
    calib = min(config.calibration, h, w)
    chunk_depth = config.chunk_depth or default_chunk_depth(c * h * w * 8, d)
    noise = GaussianNoise(config.noise_sigma) if config.noise_sigma > 0 else None
    detector = ({"model": "sign", "threshold": 0.0, "width": float(config.one_bit_width), "gradient": "zero",
                 "fraction_at_low": None, "fraction_at_high": None} if config.one_bit else None)
    tau = None
    if detector is not None and config.one_bit_dither is not None:
        from operators3d.nonlinear import dither_threshold

        dither = {"amplitude": float(config.one_bit_dither), "seed": derive_seed(config.seed, "dither")}
        detector = {**detector, "dither": dither}
        # (C, 1, kH, kW, 2): the same τ for every D-slab, as Sign rebuilds it on a slab operator
        tau = dither_threshold((c, d, h, w), True, dither["amplitude"], dither["seed"]).to(torch.float32)
    meta = ScanMetadata(
        modality="mri",
        detector=detector,
        volume_shape=(d, h, w),
        geometry=MRIGeometry(c, (h, w), acceleration_of(mask), (calib, calib)),
        chunk_depth=min(chunk_depth, d),
        noise_model=noise.to_dict() if noise is not None else GaussianNoise(0.0).to_dict(),
        voxel_size=tuple(config.voxel_size),
        units=config.units,
    )
    params = config.parameters()
    params["shape"] = [d, h, w]
    group, state = prepare_scan(
        config.out, meta, params, tool="recon3d simulate mri", overwrite=config.overwrite,
        sources=[source.describe().get("path", config.phantom)],
    )
    if state == "complete":
        return JobOutcome(str(config.out), "already complete")
    specs = mri_specs(meta)
    arrays = _arrays(group, specs, meta.chunk_depth, config.codec, resume=state == "resumed")
    meas, maps_arr, ref, mask_arr = (arrays[k] for k in ("measurements", "coil_maps", "reference", "mask"))
    stored = stored_depth_of(meas)
    map_seed = derive_seed(config.seed, "coil_maps")
    cd = meta.chunk_depth

    def write_mask() -> None:
        mask_arr[...] = mask.numpy()

    def make_slab(d0: int, d1: int) -> None:
        x = torch.from_numpy(source.slab(d0, d1)).to(torch.complex64)
        if config.phase:
            x = x * smooth_phase_slab((d, h, w), d0, d1)
        maps = coil_maps_slab(c, (d, h, w), d0, d1, seed=map_seed)
        y = MultiCoilMRI(mask=mask, coil_maps=maps)(x)
        if noise is not None:
            for k0 in range(d0, d1, cd):
                k1 = min(k0 + cd, d1)
                gen = _chunk_generator(config.seed, "noise", k0 // cd)
                y[:, k0 - d0 : k1 - d0] = noise.sample(
                    y[:, k0 - d0 : k1 - d0], generator=gen, mask=mask
                )
        if detector is not None:
            parts = torch.view_as_real(y)
            bits = torch.where(parts >= (0.0 if tau is None else tau.to(parts.dtype)), 1.0, -1.0).to(parts.dtype)
            bits = bits * (mask != 0).unsqueeze(-1)
            y = torch.view_as_complex(bits.contiguous())
        ref[d0:d1] = x.numpy()
        maps_arr[:, d0:d1] = maps.numpy()
        meas[:, d0:d1] = y.numpy()

    tasks = [SlabTask("mask", write_mask, [(mask_arr, 0)])]
    for i, d0, d1 in _stored_ranges(d, stored):
        tasks.append(
            SlabTask(f"slab{i}", (lambda a=d0, b=d1: make_slab(a, b)),
                     [(meas, i), (maps_arr, i), (ref, i)])
        )
    ran = run_tasks(tasks, description="simulate mri", workers=config.workers,
                    scheduler=config.scheduler, progress=config.progress)
    if detector is None:
        finish_scan(group)
    else:  # the shares of −1 and +1 bits among the sampled parts, counted on what is stored
        detector = {**detector, **detector_fractions(meas, detector, sampled=np.asarray(mask) != 0)}
        finish_scan(group, detector=detector)
        say_detector(config.out, detector, "recon3d simulate mri")
    return JobOutcome(str(config.out), state, ran, len(tasks))


def _arrays(group, specs: dict[str, ArraySpec], chunk_depth: int, codec: CodecConfig, *, resume: bool):
    """Create the arrays (or reopen them when resuming), writable with every chunk stored; one
    shard depth for all of them (``shard_chunks: auto`` resolved from the largest)."""
    with_d = [s for s in specs.values() if s.d_axis is not None]
    if with_d:
        slice_bytes = max(int(np.prod(s.shape)) // max(1, s.shape[s.d_axis]) * np.dtype(s.dtype).itemsize
                          for s in with_d)
        codec = codec.resolved(slice_bytes, chunk_depth, max(s.shape[s.d_axis] for s in with_d),
                               object_store=on_object_store(group))
    out = {}
    existing = set(group.array_keys()) if resume else set()
    for name, spec in specs.items():
        if name in existing:
            arr = group[name]
            if tuple(arr.shape) != spec.shape:
                arr = create_array(group, spec, chunk_depth=chunk_depth, codec=codec, overwrite=True)
        else:
            arr = create_array(group, spec, chunk_depth=chunk_depth, codec=codec, overwrite=True)
        out[name] = arr.with_config({"write_empty_chunks": True})
    return out


# ----------------------------------------------------------------------------- CT
def _ct_geometry(config: SimulateCTConfig, shape: tuple[int, int, int]) -> CTGeometry:
    d, h, w = shape
    vs, ds = float(config.voxel_size), float(config.det_spacing)
    if config.geometry == "parallel":
        from operators3d.ct import default_det_count

        u = config.det_count or default_det_count(shape, vs, ds)
        return CTGeometry("parallel", config.angles, (d, int(u)), ds, vs)
    src = float(config.src_dist if config.src_dist is not None else 4 * w * vs)
    det = float(config.det_dist if config.det_dist is not None else 2 * w * vs)
    mag = (src + det) / max(src - math.hypot(h, w) * vs / 2, 1e-9)
    u = config.det_count or int(math.ceil(math.hypot(h, w) * vs * mag / ds)) + 2
    v = config.det_rows or int(math.ceil(d * vs * mag / ds)) + 2
    return CTGeometry("cone", config.angles, (int(v), int(u)), ds, vs, src, det)


def _ct_noise(config: SimulateCTConfig) -> dict:
    from operators3d import GaussianNoise, TransmissionNoise

    if config.photons is not None:
        return TransmissionNoise(config.photons).to_dict()
    return GaussianNoise(config.noise_sigma).to_dict()


def _apply_ct_noise(p: torch.Tensor, config: SimulateCTConfig, gen: torch.Generator) -> torch.Tensor:
    if config.photons is not None:
        from operators3d import TransmissionNoise

        return TransmissionNoise(config.photons).sample(p, generator=gen).to(torch.float32)
    if config.noise_sigma > 0:
        return p + config.noise_sigma * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return p


def detector_record(config: SimulateCTConfig) -> dict[str, Any] | None:
    """The scan's ``detector`` record (``docs/scan-format.md``), ``None`` for an ideal detector.

    ``model`` is ``clip`` (``saturation``/``floor``: ``y = clamp(y, low, high)``), ``quantize``
    (``bits``: the uniform quantiser on ``[low, high]``, which saturates at both ends, so it
    includes the clip) or ``sign`` (``one_bit``: ``±1`` about ``threshold``, stored as ``±1``,
    with ``gradient: zero`` — no gradient through the comparator, as in Tachella & Jacques
    2023); ``low``/``high``/``threshold`` are in line-integral units.
    ``operators3d.nonlinear_from_dict(record, A)`` is the noise-free forward model
    ``y = g(A x)``. A saturating detector clips at ``low = −log S``; a count floor at
    ``high = −log F``; with ``photons`` a zero count is read as one, which clips at
    ``high = log I0`` (photon-starved rays) when no lower one is set.
    ``fraction_at_low``/``fraction_at_high`` (the share of measurements read at each end, written
    when the scan completes) are ``None`` until then and for an unbounded side.
    """
    if config.one_bit is None and config.saturation is None and config.bits is None and config.floor is None:
        return None
    if config.one_bit is not None:
        return {"model": "sign", "threshold": float(config.one_bit), "width": float(config.one_bit_width),
                "gradient": "zero", "fraction_at_low": None, "fraction_at_high": None}
    if config.bits is not None:
        low = -math.log(config.saturation) if config.saturation is not None else 0.0
        high = -math.log(config.floor) if config.floor is not None else float(config.attenuation)
        return {"model": "quantize", "bits": int(config.bits), "low": low, "high": high,
                **detector_levels(config.saturation, config.floor, config.photons), "fraction_at_low": None,
                "fraction_at_high": None}
    starved = math.log(config.photons) if config.photons is not None else None
    return clip_record(config.saturation, config.floor, photons=config.photons, starved=starved)


def simulate_ct(config: SimulateCTConfig) -> JobOutcome:
    """Write (or finish) a simulated CT scan; see the module docstring.

    Shape:
        ``measurements (D, A, U)`` float32 (``D = V`` detector rows for cone beam),
        ``angles (A,)`` float64, ``reference (D, H, W)`` float32.
    """
    source = make_volume_source(config.phantom, config.shape, seed=config.seed)
    shape = source.shape
    d, h, w = shape
    geom = _ct_geometry(config, shape)
    v, u = geom.det_shape
    a = config.angles
    span = math.pi if config.geometry == "parallel" else 2 * math.pi
    angles = np.arange(a, dtype=np.float64) * (span / a)
    chunk_depth = config.chunk_depth or default_chunk_depth(max(a * u, h * w) * 4, max(d, v))
    noise_model = _ct_noise(config)
    detector = detector_record(config)
    meta = ScanMetadata(
        modality="ct",
        volume_shape=shape,
        geometry=geom,
        chunk_depth=min(chunk_depth, max(d, v)),
        noise_model=noise_model,
        detector=detector,
        voxel_size=(config.voxel_size,) * 3,
        units=config.units,
    )
    params = config.parameters()
    params["shape"] = list(shape)
    group, state = prepare_scan(
        config.out, meta, params, tool="recon3d simulate ct", overwrite=config.overwrite,
        sources=[source.describe().get("path", config.phantom)],
    )
    if state == "complete":
        return JobOutcome(str(config.out), "already complete")
    arrays = _arrays(group, ct_specs(meta), meta.chunk_depth, config.codec, resume=state == "resumed")
    meas, ref, ang = arrays["measurements"], arrays["reference"], arrays["angles"]
    scale = config.attenuation / (w * config.voxel_size)
    cd = meta.chunk_depth
    angles_t = torch.from_numpy(angles)

    def write_angles() -> None:
        ang[...] = angles

    def reference_slab(d0: int, d1: int) -> torch.Tensor:
        return torch.from_numpy(source.slab(d0, d1)) * scale

    tasks = [SlabTask("angles", write_angles, [(ang, 0)])]
    if config.geometry == "parallel":
        from .ct_ops import ct_operator

        def project(d0: int, d1: int) -> None:
            x = reference_slab(d0, d1)
            op = ct_operator(meta, angles_t.to(torch.float32), volume_depth=d1 - d0)
            p = op(x)
            for k0 in range(d0, d1, cd):
                k1 = min(k0 + cd, d1)
                gen = _chunk_generator(config.seed, "noise", k0 // cd)
                p[k0 - d0 : k1 - d0] = apply_detector(_apply_ct_noise(p[k0 - d0 : k1 - d0], config, gen),
                                                       detector)
            ref[d0:d1] = x.numpy()
            meas[d0:d1] = p.numpy()

        # several stored objects per task: the projector's cost per update falls with the slab
        for objects, d0, d1 in task_groups(d, stored_depth_of(meas), (a * u + h * w) * 4):
            tasks.append(
                SlabTask(f"slab{objects.start}", (lambda a0=d0, a1=d1: project(a0, a1)),
                         [(arr, i) for i in objects for arr in (meas, ref)])
            )
    else:
        from .cone import cone_simulation_tasks

        def noisy(p: torch.Tensor, chunk: int) -> torch.Tensor:
            return apply_detector(_apply_ct_noise(p, config, _chunk_generator(config.seed, "noise", chunk)),
                                   detector)

        tasks += cone_simulation_tasks(meta, angles_t, meas, ref, reference_slab, noisy)
    ran = run_tasks(tasks, description="simulate ct", workers=config.workers,
                    scheduler=config.scheduler, progress=config.progress)
    if detector is None:
        finish_scan(group)
    else:  # counted on what is stored: right however many runs wrote it, on any scheduler
        detector = {**detector, **detector_fractions(meas, detector)}
        finish_scan(group, detector=detector)
        say_detector(config.out, detector)
    return JobOutcome(str(config.out), state, ran, len(tasks))
