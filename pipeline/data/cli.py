"""The data sub-commands of ``recon3d``: ``simulate``, ``ingest``, ``inspect``, ``preprocess``.

``register(subparsers)`` adds them to the ``recon3d`` parser; ``run(args)`` runs the parsed
command and returns the exit code (non-zero when ``inspect --check`` finds a problem).

Examples::

    recon3d simulate mri --shape 64 256 256 --coils 8 --acceleration 4 --noise-sigma 0.01 \\
        --seed 0 --out scans/brain.zarr
    recon3d simulate ct --shape 128 256 256 --angles 360 --phantom foam --photons 1e4 \\
        --seed 0 --out scans/foam.zarr
    recon3d simulate ct --shape 16 96 128 --phantom anatomy-crop --seed 201 --out scans/head.zarr
    recon3d ingest mri kspace.h5 --out scans/subject1.zarr
    recon3d ingest ct projections/ --flat flat.tif --dark dark.tif --out scans/sample.zarr
    recon3d inspect scans/foam.zarr --check
    recon3d preprocess scans/foam.zarr --outputs fbp n2i
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.paths import is_url, local_arg

#: The endings a URL source of ``ingest mri`` is read by (ranged .npy reads, h5py on a file object).
_MRI_URL_ENDINGS = (".npy", ".h5", ".hdf5")


def _source_arg(what: str, endings: tuple[str, ...] = ()) -> Any:
    """An argparse ``type=`` for an ingest input: a local path, or a URL read through fsspec;
    with ``endings``, a URL of another kind is a usage error that says which are read."""
    local = local_arg(what, f"a URL is read only as {'/'.join(endings)}; copy other files to a local or "
                            f"mounted folder first", as_path=False)

    def convert(text: str) -> str:
        if is_url(text) and (not endings or text.lower().endswith(endings)):
            return text
        return local(text)

    convert.__name__ = "path or URL"
    return convert

__all__ = ["register", "run", "COMMANDS"]


def _units(text: str) -> str:
    """A length unit OME-Zarr knows (``mm``, ``um``, ``micrometer``...): anything else would be
    stored in the scan and then dropped from every output without a word."""
    from .units import ngff_unit

    if ngff_unit(text) is None:
        raise argparse.ArgumentTypeError(
            f"unknown length unit {text!r}: use an OME-Zarr space unit (e.g. millimeter, micrometer, nanometer, "
            "centimeter, meter, inch) or mm, um, µm, nm, cm, m, in")
    return text

COMMANDS = ("simulate", "ingest", "inspect", "preprocess")

_PHANTOM_HELP = ("a named phantom: shepp-logan, ellipsoids, foam, or the held-out realistic ones "
                 "anatomy (head), industrial (CT sample), organs (abdomen), each also as NAME-crop "
                 "(magnified 1.5x so that it crosses the edges of the field of view); "
                 "or a .npy / zarr volume (default: shepp-logan)")


# MRI voxels may be anisotropic (three sizes); a CT voxel is one size (the geometry is in its units).
_MRI_VOXEL_HELP = "voxel size along D, H and W: three numbers (CT takes one) (default: 1 1 1)"
_CT_VOXEL_HELP = ("voxel size, one number: the side of the cubic voxel, in the units of the detector "
                  "spacing and distances (MRI takes three: DD DH DW) (default: 1)")


def _codec_args(p: argparse.ArgumentParser, *, chunk_depth: bool = True) -> None:
    g = p.add_argument_group("storage")
    if chunk_depth:  # preprocess's derived arrays take the scan's chunk depth: no option to ignore
        g.add_argument("--chunk-depth", type=int, default=None,
                       help="D-slices per chunk (default: about 8 MiB of measurements per chunk)")
    g.add_argument("--codec", default="zstd", choices=["zstd", "lz4", "lz4hc", "zlib", "blosclz", "none"],
                   help="Blosc compressor, or none (default: zstd)")
    g.add_argument("--clevel", type=int, default=3, help="compression level 0-9 (default: 3)")
    g.add_argument("--shuffle", default="shuffle", choices=["shuffle", "bitshuffle", "noshuffle"],
                   help="Blosc shuffle (default: shuffle)")
    g.add_argument("--checksum", dest="checksum", action="store_true", default=True,
                   help="append a CRC32C to every chunk, so a flipped bit is found on read "
                   "(the default; accepted for old command lines)")
    g.add_argument("--no-checksum", dest="checksum", action="store_false",
                   help="leave the CRC32C out (a flipped bit that still decodes then goes unnoticed)")
    g.add_argument("--shard-chunks", default="auto", metavar="N|auto",
                   help="chunks per shard along D (zarr sharding: one object per shard); 0 for one object "
                   "per chunk; default auto: about 64 MiB shards when the output is a URL (s3://...), "
                   "off on a local disk")


def _job_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an output of this same command made with other parameters "
                   "(simulate: a simulated scan, ingest: an ingested scan, preprocess: its derived "
                   "arrays); anything else at the target is never replaced")
    g.add_argument("--workers", type=int, default=2, help="slabs processed at once (default: 2)")
    g.add_argument("--scheduler", default="threads", choices=["threads", "sync", "distributed"],
                   help="dask scheduler; 'distributed' uses the active dask.distributed client")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _codec(args: argparse.Namespace):
    from .format import CodecConfig

    return CodecConfig(compressor=args.codec, clevel=args.clevel, shuffle=args.shuffle,
                       checksum=args.checksum, shard_chunks=args.shard_chunks)


def register(subparsers: Any) -> None:
    """Add ``simulate``, ``ingest``, ``inspect`` and ``preprocess`` to a subparsers object."""
    # ---------------------------------------------------------------- simulate
    sim = subparsers.add_parser("simulate", help="write a simulated MRI or CT scan with its reference",
                                description="Simulate a scan slab by slab (any size in a few GB of RAM). "
                                "Rerunning an interrupted command finishes it.")
    sim_sub = sim.add_subparsers(dest="modality", metavar="MODALITY", required=True)

    mri = sim_sub.add_parser("mri", help="multi-coil Cartesian MRI in hybrid space")
    mri.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                     help="volume shape (default: 32 128 128, or the phantom file's)")
    mri.add_argument("--coils", type=int, default=8, help="number of coils (default: 8)")
    mri.add_argument("--acceleration", type=float, default=4.0, help="mask acceleration (default: 4)")
    mri.add_argument("--calibration", type=int, default=24, help="calibration block side (default: 24)")
    mri.add_argument("--mask", default="poisson", choices=["poisson", "gaussian"],
                     help="variable-density mask kind (default: poisson)")
    mri.add_argument("--phantom", default="shepp-logan", help=_PHANTOM_HELP)
    mri.add_argument("--noise-sigma", type=float, default=0.0,
                     help="complex Gaussian noise σ per real/imaginary part (default: 0)")
    mri.add_argument("--no-phase", action="store_true", help="keep the image real (no smooth phase)")
    mri.add_argument("--one-bit", action="store_true",
                     help="store one bit per real and imaginary part of each sampled (hybrid-space) value: "
                     "its sign (a comparator on the I and Q channels; the image's scale is lost)")
    mri.add_argument("--one-bit-width", type=float, default=0.05, metavar="W",
                     help="with --one-bit: the temperature of the logistic consistency loss, in k-space units "
                     "(recorded as the model's width; default 0.05)")
    mri.add_argument("--one-bit-dither", type=float, default=None, metavar="D",
                     help="with --one-bit: compare each part with its own threshold drawn uniformly from [-D, D) "
                     "(seeded from --seed, recorded as the detector's dither), so the bits keep the amplitudes "
                     "and the scale; D in k-space units, e.g. a high quantile of |parts| of the linear data")
    mri.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("DD", "DH", "DW"),
                     help=_MRI_VOXEL_HELP)
    mri.add_argument("--units", type=_units, default="mm", help="length unit of --voxel-size and the geometry (default: mm)")
    mri.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    mri.add_argument("--out", required=True, help="the scan to write (folder or fsspec URL)")
    _codec_args(mri)
    _job_args(mri)

    ct = sim_sub.add_parser("ct", help="parallel- or cone-beam CT")
    ct.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                    help="volume shape (default: 32 128 128, or the phantom file's)")
    ct.add_argument("--angles", type=int, default=180, help="number of angles (default: 180)")
    ct.add_argument("--geometry", default="parallel", choices=["parallel", "cone"])
    ct.add_argument("--phantom", default="shepp-logan", help=_PHANTOM_HELP)
    ct.add_argument("--attenuation", type=float, default=4.0,
                    help="line integral through the full width of value-1 material (default: 4)")
    noise = ct.add_mutually_exclusive_group()
    noise.add_argument("--photons", type=float, default=None, help="incident photons I0 (Poisson noise)")
    noise.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian σ on line integrals")
    ct.add_argument("--det-count", type=int, default=None, help="detector columns U")
    ct.add_argument("--det-rows", type=int, default=None, help="cone-beam detector rows V")
    ct.add_argument("--det-spacing", type=float, default=1.0)
    ct.add_argument("--voxel-size", type=float, default=1.0, help=_CT_VOXEL_HELP)
    ct.add_argument("--src-dist", type=float, default=None, help="cone beam: source to axis")
    ct.add_argument("--det-dist", type=float, default=None, help="cone beam: axis to detector")
    ct.add_argument("--saturation", type=float, default=None, metavar="S",
                    help="the detector saturates at the fraction S of the open-beam count (S*I0 photons "
                    "with --photons): line integrals below -log S read -log S (default: no saturation)")
    ct.add_argument("--floor", type=float, default=None, metavar="F",
                    help="the smallest count the detector reads, as the fraction F of the open-beam count "
                    "(photon starvation behind dense material): line integrals above -log F read -log F "
                    "(default: no floor)")
    ct.add_argument("--bits", type=int, default=None, metavar="B",
                    help="quantise the line integrals to B bits, uniformly on [-log S (0 without "
                    "--saturation), -log F (--attenuation without --floor)] (default: not quantised)")
    ct.add_argument("--one-bit", type=float, default=None, metavar="T",
                    help="store one bit per ray: +1 where the line integral is at least T, -1 elsewhere "
                    "(a comparator; not with --saturation, --floor or --bits)")
    ct.add_argument("--one-bit-width", type=float, default=0.1, metavar="W",
                    help="with --one-bit: the temperature of the logistic consistency loss a network is "
                    "trained with, in line-integral units (recorded as the model's width; default 0.1)")
    ct.add_argument("--units", type=_units, default="mm", help="length unit of --voxel-size and the geometry (default: mm)")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--out", required=True)
    _codec_args(ct)
    _job_args(ct)

    # ---------------------------------------------------------------- ingest
    ing = subparsers.add_parser("ingest", help="turn raw k-space or projections into a scan",
                                description="Ingest raw data out of core; the input is only read. "
                                "Rerunning an interrupted command finishes it.")
    ing_sub = ing.add_subparsers(dest="modality", metavar="MODALITY", required=True)
    im = ing_sub.add_parser("mri", help="3D Cartesian k-space (HDF5 or .npy) to hybrid space")
    im.add_argument("source", type=_source_arg("ingest SOURCE", _MRI_URL_ENDINGS), help="k-space .h5/.hdf5 (dataset (C, kx, ky, kz) or ISMRMRD) or .npy; a path or a URL (s3://...)")
    im.add_argument("--out", required=True)
    im.add_argument("--dataset", default="kspace", help="HDF5 dataset name (default: kspace)")
    im.add_argument("--readout-crop", type=int, default=None,
                    help="keep this many central readout positions (drops oversampling)")
    im.add_argument("--calibration", type=int, default=None, help="calibration side (default: detect)")
    im.add_argument("--coil-maps", type=_source_arg("ingest --coil-maps", (".npy",)), default=None, help=".npy (C, D, H, W) coil maps (default: ESPIRiT)")
    im.add_argument("--noise-sigma", type=float, default=None, help="known noise σ (stored as the noise model)")
    im.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("DD", "DH", "DW"),
                    help=_MRI_VOXEL_HELP)
    im.add_argument("--units", type=_units, default="mm", help="length unit of --voxel-size and the geometry (default: mm)")
    _codec_args(im)
    _job_args(im)

    ic = ing_sub.add_parser("ct", help="projections (TIFF stack or .npy (A, V, U)) to (D, A, U)")
    ic.add_argument("source", type=_source_arg("ingest SOURCE"), help="a folder of TIFFs (one per angle), a glob, or .npy (A, V, U); a path or a URL")
    ic.add_argument("--out", required=True)
    ic.add_argument("--angles", type=_source_arg("ingest --angles"), default=None, help="text/.npy file with one angle per projection")
    ic.add_argument("--angle-range", type=float, nargs=2, default=(0.0, 180.0), metavar=("START", "STOP"),
                    help="uniform angles over [START, STOP) when no --angles file (default: 0 180)")
    ic.add_argument("--angles-unit", default="deg", choices=["deg", "rad"])
    ic.add_argument("--flat", type=_source_arg("ingest --flat"), default=None, help="flat field image/stack/folder")
    ic.add_argument("--dark", type=_source_arg("ingest --dark"), default=None, help="dark field image/stack/folder")
    ic.add_argument("--i0", type=float, default=None, help="open-beam intensity when no --flat")
    ic.add_argument("--no-log", action="store_true", help="the projections already are line integrals")
    ic.add_argument("--geometry", default="parallel", choices=["parallel", "cone"])
    ic.add_argument("--det-spacing", type=float, default=1.0)
    ic.add_argument("--voxel-size", type=float, default=1.0, help=_CT_VOXEL_HELP)
    ic.add_argument("--src-dist", type=float, default=None)
    ic.add_argument("--det-dist", type=float, default=None)
    ic.add_argument("--volume-shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"))
    ic.add_argument("--photons", type=float, default=None, help="known incident photons (metadata)")
    ic.add_argument("--saturation", type=float, default=None, metavar="S",
                    help="the detector saturates at the fraction S of the open-beam intensity: recorded as a "
                    "clip at line integral -log S, which training measures through (default: none)")
    ic.add_argument("--floor", type=float, default=None, metavar="F",
                    help="the detector reads nothing below the fraction F < S of the open-beam intensity: "
                    "recorded as a clip at line integral -log F (default: none)")
    ic.add_argument("--units", type=_units, default="mm", help="length unit of --voxel-size and the geometry (default: mm)")
    _codec_args(ic)
    _job_args(ic)

    # ---------------------------------------------------------------- inspect
    ins = subparsers.add_parser("inspect", help="show a scan; --check reads and verifies every chunk",
                                description="Show modality, shapes, chunks, codecs, compression, "
                                "geometry, acceleration and noise. With --check, read every chunk "
                                "and exit 1 if one is missing, corrupt or non-finite, or the scan "
                                "is incomplete.")
    ins.add_argument("path", help="the scan (folder or fsspec URL)")
    ins.add_argument("--check", action="store_true", help="read and verify every chunk")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    ins.add_argument("--no-progress", action="store_true")

    # ---------------------------------------------------------------- preprocess
    pre = subparsers.add_parser("preprocess", help="compute derived/ baselines and splits",
                                description="CT: derived/fbp and derived/n2i (Noise2Inverse angle "
                                "subsets); MRI: derived/adjoint and optionally derived/sense. Slab "
                                "by slab with dask; resumable.")
    pre.add_argument("path", help="the scan")
    pre.add_argument("--outputs", nargs="+", default=None,
                     help="fbp n2i (CT), adjoint sense (MRI); default: fbp n2i / adjoint")
    pre.add_argument("--n2i-splits", type=int, default=4, help="K angle subsets (default: 4)")
    pre.add_argument("--filter", default="ram-lak", help="FBP/FDK window (default: ram-lak)")
    pre.add_argument("--sense-iters", type=int, default=20)
    pre.add_argument("--l2-weight", type=float, default=1e-3)
    _codec_args(pre, chunk_depth=False)
    _job_args(pre)


# ----------------------------------------------------------------------------- running
def _say(message: str) -> None:
    from pipeline.log import say

    say(f"recon3d {message}", "data")


def _outcome(outcome) -> None:
    if outcome.state == "already complete":
        _say(f"{outcome.path}: already complete, nothing to do")
    else:
        verb = "resumed and finished" if outcome.state == "resumed" else "wrote"
        _say(f"{verb} {outcome.path} ({outcome.tasks_run} of {outcome.tasks_total} tasks run)")


def _simulate_config(args: argparse.Namespace):
    """The :class:`SimulateMRIConfig` or :class:`SimulateCTConfig` of ``recon3d simulate``."""
    from .phantoms import PHANTOMS
    from .simulate import SimulateCTConfig, SimulateMRIConfig

    shape = tuple(args.shape) if args.shape is not None else None
    if shape is None and args.phantom in PHANTOMS:
        shape = (32, 128, 128)
    common = dict(out=args.out, shape=shape, phantom=args.phantom, seed=args.seed,
                  chunk_depth=args.chunk_depth, codec=_codec(args), units=args.units,
                  overwrite=args.overwrite, workers=args.workers, scheduler=args.scheduler,
                  progress=not args.no_progress)
    if args.modality == "mri":
        return SimulateMRIConfig(coils=args.coils, acceleration=args.acceleration,
                                 calibration=args.calibration, mask=args.mask,
                                 noise_sigma=args.noise_sigma, phase=not args.no_phase,
                                 one_bit=args.one_bit, one_bit_width=args.one_bit_width,
                                 one_bit_dither=args.one_bit_dither, voxel_size=tuple(args.voxel_size), **common)
    return SimulateCTConfig(angles=args.angles, geometry=args.geometry,
                            attenuation=args.attenuation, photons=args.photons,
                            noise_sigma=args.noise_sigma or 0.0, det_count=args.det_count,
                            det_rows=args.det_rows, det_spacing=args.det_spacing,
                            voxel_size=args.voxel_size, src_dist=args.src_dist,
                            det_dist=args.det_dist, saturation=args.saturation, bits=args.bits,
                            floor=args.floor, one_bit=args.one_bit, one_bit_width=args.one_bit_width,
                            **common)


def _simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate_ct, simulate_mri

    config = _simulate_config(args)
    _outcome(simulate_mri(config) if args.modality == "mri" else simulate_ct(config))
    return 0


def _ingest_config(args: argparse.Namespace):
    """The :class:`IngestMRIConfig` or :class:`IngestCTConfig` of ``recon3d ingest``."""
    from .ingest import IngestCTConfig, IngestMRIConfig

    common = dict(source=args.source, out=args.out, chunk_depth=args.chunk_depth, codec=_codec(args),
                  units=args.units, overwrite=args.overwrite, workers=args.workers,
                  scheduler=args.scheduler, progress=not args.no_progress)
    if args.modality == "mri":
        return IngestMRIConfig(
            dataset=args.dataset, readout_crop=args.readout_crop, calibration=args.calibration,
            coil_maps=args.coil_maps, noise_sigma=args.noise_sigma,
            voxel_size=tuple(args.voxel_size), **common)
    return IngestCTConfig(
        angles=args.angles, angle_range=tuple(args.angle_range), angles_unit=args.angles_unit,
        flat=args.flat, dark=args.dark, i0=args.i0, log=not args.no_log,
        geometry=args.geometry, det_spacing=args.det_spacing, voxel_size=args.voxel_size,
        src_dist=args.src_dist, det_dist=args.det_dist,
        volume_shape=tuple(args.volume_shape) if args.volume_shape else None,
        photons=args.photons, saturation=args.saturation, floor=args.floor, **common)


def _ingest(args: argparse.Namespace) -> int:
    from .ingest import ingest_ct, ingest_mri

    config = _ingest_config(args)
    _outcome(ingest_mri(config) if args.modality == "mri" else ingest_ct(config))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from .inspect import check_scan, count_chunks, format_report, inspect_scan

    if args.check:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        from rich.console import Console

        total = count_chunks(args.path)
        with Progress(TextColumn("[bold cyan]check"), BarColumn(), MofNCompleteColumn(),
                      console=Console(stderr=True), disable=args.no_progress) as bar:
            task = bar.add_task("check", total=total)
            report = check_scan(args.path, on_chunk=lambda: bar.advance(task))
    else:
        report = inspect_scan(args.path)
    if args.json:
        data = dataclasses.asdict(report)
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_report(report))
    if args.check and report.problems:
        return 1
    return 0


def _preprocess_config(args: argparse.Namespace):
    """The :class:`PreprocessConfig` of ``recon3d preprocess``."""
    from .preprocess import PreprocessConfig

    return PreprocessConfig(scan=args.path, outputs=tuple(args.outputs) if args.outputs else None,
                            n2i_splits=args.n2i_splits, filter=args.filter,
                            sense_iters=args.sense_iters, l2_weight=args.l2_weight,
                            codec=_codec(args), overwrite=args.overwrite, workers=args.workers,
                            scheduler=args.scheduler, progress=not args.no_progress)


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocess import preprocess

    for name, state in preprocess(_preprocess_config(args)).items():
        _say(f"{args.path}: derived/{name}: {state if state == 'already complete' else 'done (' + state + ')'}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed data sub-command; returns the exit code.

    Errors a user can fix (bad input, a scan that fails its checks) are printed as one line
    naming the scan, array and chunk, with exit code 2.
    """
    from pipeline.errors import Recon3dError, report_error

    from .format import ScanError

    handlers = {"simulate": _simulate, "ingest": _ingest, "inspect": _inspect, "preprocess": _preprocess}
    try:
        return handlers[args.command](args)
    except ImportError as err:  # a missing optional package (h5py, tifffile): the user installs it
        report_error(err, args.command)
        return 2
    except (Recon3dError, ScanError, ValueError, TypeError, FileNotFoundError) as err:
        # a scan that fails its checks or a bad value (2), a full disk (1)
        return report_error(err, args.command)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.cli``: the data sub-commands alone."""
    parser = argparse.ArgumentParser(prog="recon3d-data")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
