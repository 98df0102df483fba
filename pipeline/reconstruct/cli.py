"""The reconstruction sub-command of ``recon3d``: ``reconstruct``.

``register(subparsers)`` adds it to the ``recon3d`` parser; ``run(args)`` runs the parsed
command and returns the exit code.

Examples::

    recon3d reconstruct --model runs/mri_ei --scan scans/brain.zarr --out recon/brain.ome.zarr --pyramid 3
    recon3d reconstruct --method sense --scan scans/brain.zarr --out recon/brain_sense.ome.zarr
    recon3d reconstruct --method tv --scan scans/foam.zarr --out recon/foam_tv.ome.zarr   # weight chosen by SURE
    recon3d reconstruct --method fbp --filter hann --filter-cutoff 0.8 --scan scans/foam.zarr --out recon/f.ome.zarr
    torchrun --standalone --nproc_per_node=4 -m pipeline.cli reconstruct --model runs/ct_n2i \\
        --scan scans/foam.zarr --out recon/foam.ome.zarr          # rank r owns slabs i ≡ r mod 4
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run", "COMMANDS"]

COMMANDS = ("reconstruct",)


def register(subparsers: Any) -> None:
    """Add ``reconstruct`` to a subparsers object."""
    rec = subparsers.add_parser(
        "reconstruct",
        help="reconstruct a whole scan slab by slab into an OME-Zarr 0.5 image",
        description="Reconstruct a scan out of core with a trained model or a classical method "
        "into an OME-Zarr 0.5 image (magnitude for MRI, plus the complex image). Slabs along D "
        "with a halo of the model's receptive radius, so the result equals the model applied to "
        "the whole volume. Resumable: rerun the same command after an interruption. Parallel: "
        "under torchrun each rank writes its own slabs; --workers slabs at once per process.",
    )
    what = rec.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", default=None, metavar="RUN_DIR|WEIGHTS",
                      help="a training run directory (exported first if needed) or an exported weights file")
    rec.add_argument("--pick", default="latest", choices=["latest", "best"],
                     help="with a run directory: its latest checkpoint (default) or the one its best validation "
                     "kept (train with checkpoint.keep_best: estimate, psnr or loss)")
    what.add_argument("--method", default=None, choices=["adjoint", "fbp", "fdk", "sense", "tv"],
                      help="a classical reconstruction instead of a model: adjoint, fbp (parallel-beam "
                      "CT), fdk (cone beam), sense (MRI), tv (total variation; parallel-beam CT and MRI)")
    rec.add_argument("--scan", required=True, help="the scan (folder or fsspec URL)")
    rec.add_argument("--out", required=True, help="the OME-Zarr image to write (folder or fsspec URL)")
    rec.add_argument("--pyramid", type=int, default=1, metavar="N",
                     help="resolution levels: level l is the 2x mean of level l-1 (default: 1)")
    g = rec.add_argument_group("slabs and tiles")
    g.add_argument("--slab", type=int, default=None,
                   help="output slab thickness along D, a multiple of the chunk depth (default: a chunk; "
                   "for a model the thickest whose estimated peak fits --memory-budget)")
    g.add_argument("--memory-budget", type=_bytes, default="1GiB", metavar="SIZE",
                   help="with a model and no --slab: the estimated peak memory of the process with its slabs in flight, "
                   "e.g. 512MiB, 1GiB, 2G or bytes (default: 1GiB); the choice is logged and recorded in "
                   "the output's 'memory' attribute")
    g.add_argument("--halo", type=int, default=None,
                   help="input slices added on each side of a slab (default: the model's receptive radius)")
    g.add_argument("--chunks", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="output chunk shape (default: 16 256 256, clipped to the volume)")
    g.add_argument("--tile", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="run the backbone on tiles of this shape (default: untiled, also for a model trained "
                   "on tiles; 0 0 0: untiled)")
    g.add_argument("--overlap", type=int, default=None,
                   help="tile overlap (default: twice the receptive radius, which is exact)")
    c = rec.add_argument_group(
        "classical methods",
        "Each 'auto' value (the default) is chosen without a reference before the first slab: the "
        "candidates run on --calibration-slabs evenly spaced D-blocks and the one of least "
        "estimated error, from the scan's noise model, is used for every slab and recorded in the "
        "output (docs/classical.md). FBP and TV: SURE of the measurement error; SENSE: GSURE of "
        "the image error. A number fixes the value (the others stay auto).")
    c.add_argument("--filter", default="auto", choices=["auto", "ram-lak", "shepp-logan", "cosine", "hann"],
                   help="FBP window (default: auto)")
    c.add_argument("--filter-cutoff", type=_auto_or(float), default=None, metavar="auto|F",
                   help="FBP window end as a fraction of Nyquist, 0 < F <= 1 (default: auto with "
                   "--filter auto, else 1; auto tries 1, 0.8, 0.6, 0.5, 0.4)")
    c.add_argument("--sense-iters", type=_auto_or(int), default="auto", metavar="auto|N",
                   help="SENSE CG iterations (default: auto among 5, 10, 20, 40)")
    c.add_argument("--l2-weight", type=_auto_or(float), default="auto", metavar="auto|L",
                   help="SENSE Tikhonov weight (default: auto among 1e-4..1 x ||AᴴA|| in 1-2-5 steps)")
    c.add_argument("--tv-weight", type=_auto_or(float), default="auto", metavar="auto|MU",
                   help="TV weight of min ½||Ax - y||²_w + MU TV(x) (default: auto, around the "
                   "noise's scale; needs the scan's noise model)")
    c.add_argument("--tv-iters", type=_auto_or(int), default="auto", metavar="auto|N",
                   help="TV (PDHG) iterations (default: auto among 25, 50, 100)")
    c.add_argument("--calibration-slabs", type=int, default=3, metavar="K",
                   help="D-blocks the auto calibration reads, evenly spaced (default: 3)")
    c.add_argument("--detector", default="auto", choices=["auto", "ignore"],
                   help="FBP of a parallel-beam scan read through a clipping detector (a count floor or a "
                   "saturation in its detector record): auto (default) follows it with the clipped-FBP steps, "
                   "which take a clipped ray as a bound; ignore: plain FBP, the measurements taken as linear")
    s = rec.add_argument_group("output")
    s.add_argument("--no-complex", action="store_true", help="MRI: do not keep the complex image")
    s.add_argument("--uncertainty", type=int, default=0, metavar="N",
                   help="also write OUT/uncertainty: a per-voxel RMS error from N equivariant-bootstrap draws "
                   "(the pilot re-measured with the scan's noise model and reconstructed again, slab by slab; "
                   "about N+1 times the work; docs/estimate.md). Default 0: none")
    s.add_argument("--uncertainty-seed", type=int, default=0, metavar="S", help="seed of the draws (default: 0)")
    s.add_argument("--codec", default="zstd", choices=["zstd", "lz4", "lz4hc", "zlib", "blosclz", "none"],
                   help="Blosc compressor of the output, or none (default: zstd)")
    s.add_argument("--clevel", type=int, default=3, help="compression level 0-9 (default: 3)")
    s.add_argument("--no-checksum", action="store_true",
                   help="leave out the CRC32C the output's chunks carry by default (pyramid levels too)")
    s.add_argument("--overwrite", action="store_true",
                   help="accepted for scripts: an earlier reconstruct output at --out made with other "
                   "settings is recomputed anyway; a scan, a run or anything recon3d reconstruct did "
                   "not write is never replaced")
    e = rec.add_argument_group("execution")
    e.add_argument("--device", default="auto", help="auto (the rank's GPU if any), cpu, cuda, cuda:N")
    e.add_argument("--workers", type=int, default=1, help="slabs at once in each process (default: 1)")
    e.add_argument("--scheduler", default="threads", choices=["threads", "sync", "distributed"],
                   help="dask scheduler; 'distributed' uses the active dask.distributed client")
    e.add_argument("--memory", default="lean", choices=["lean", "fast"],
                   help="lean (default): freed buffers of 1 MiB or more go back to the OS at once "
                   "(peak RSS about 40%% lower, about 30%% slower on CPU in benchmarks/reconstruct.py); "
                   "fast: the C allocator's default")
    e.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="seconds a rank waits for the others (rank 0 for their slabs, they for rank 0's "
                   "preparation) before it stops and names what is missing (default: 600)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def _auto_or(kind: type):
    """An argparse type: the word ``auto`` or a number of ``kind``."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or {kind.__name__}, got {text!r}") from None

    parse.__name__ = f"auto|{kind.__name__}"
    return parse


def _bytes(text: str) -> int:
    """An argparse type: a memory size (``512MiB``, ``1GiB``, ``2G``, bytes)."""
    from .memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _config(args: argparse.Namespace):
    """The :class:`~pipeline.reconstruct.config.ReconstructConfig` of ``recon3d reconstruct``."""
    from pipeline.data.format import CodecConfig

    from .config import ReconstructConfig

    return ReconstructConfig(
        scan=args.scan, out=args.out, model=args.model, method=args.method, pick=args.pick, pyramid=args.pyramid,
        slab=args.slab, halo=args.halo, memory_budget=args.memory_budget,
        chunks=tuple(args.chunks) if args.chunks else None,
        tile=tuple(args.tile) if args.tile else None, overlap=args.overlap, filter=args.filter,
        filter_cutoff=args.filter_cutoff, sense_iters=args.sense_iters, l2_weight=args.l2_weight,
        tv_weight=args.tv_weight, tv_iters=args.tv_iters, calibration_slabs=args.calibration_slabs,
        detector=args.detector,
        keep_complex=not args.no_complex, uncertainty=args.uncertainty, uncertainty_seed=args.uncertainty_seed,
        codec=CodecConfig(compressor=args.codec, clevel=args.clevel,
                          checksum=not args.no_checksum), overwrite=args.overwrite,
        device=args.device, workers=args.workers, scheduler=args.scheduler,
        progress=not args.no_progress, wait_timeout_s=args.wait_timeout,
    )


def _reconstruct(args: argparse.Namespace) -> int:
    from pipeline.allocator import return_freed_memory_to_os

    from .reconstruct import reconstruct

    if args.memory == "lean":
        return_freed_memory_to_os()
    config = _config(args)
    result = reconstruct(config)
    if result.rank == 0:
        from pipeline.log import say

        verb = {"already complete": "already complete, nothing to do"}.get(
            result.state, f"{result.state}: {result.slabs_run} of {result.slabs_total} slabs run here")
        say(f"recon3d {result.path}: {verb}", "reconstruct")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a parsed reconstruction sub-command; returns the exit code (2 for errors a user can fix)."""
    from pipeline.data.format import ScanError
    from pipeline.errors import Recon3dError, report_error

    try:
        return {"reconstruct": _reconstruct}[args.command](args)
    except ImportError as err:  # a missing optional package: the user installs it
        report_error(err, args.command)
        return 2
    except (Recon3dError, ScanError, ValueError, TypeError, FileNotFoundError, TimeoutError) as err:
        # 1 for a job that could not finish (a full disk, a wait that timed out, a lease lost),
        # 2 for input errors (a scan that fails its checks, a target it must not write)
        return report_error(err, args.command)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.reconstruct.cli``: the reconstruction sub-commands alone."""
    parser = argparse.ArgumentParser(prog="recon3d-reconstruct")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
