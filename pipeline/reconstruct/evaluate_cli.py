"""``recon3d evaluate``: the command line of :func:`pipeline.reconstruct.evaluate.evaluate`.

``recon3d evaluate OUT --reference SCAN`` prints the whole volume's and the object's PSNR, SSIM
and NMSE (``--json`` writes them); ``--estimate`` adds, or without ``--reference`` gives alone,
the reference-free estimate of :mod:`pipeline.reconstruct.estimate_output`, next to the true
PSNR of the complex image for MRI.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.log import say as log
from pipeline.paths import local_arg

from .evaluate import evaluate
from .ome_image import open_zarr

__all__ = ["add_parser", "run_cli"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recon3d evaluate`` to the ``recon3d`` sub-parsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="PSNR, SSIM (3D) and NMSE of a reconstruction against a scan's reference, or estimated without one (--estimate)",
        description="Compare an OME-Zarr reconstruction with the reference volume of a scan, "
        "out of core (dask, slab by slab with halos): PSNR, 3D SSIM (7³ uniform windows, as "
        "scikit-image) and NMSE. Complex images (MRI) are compared as magnitudes, real ones (CT) "
        "as they are, signed. Without --mask both the whole volume and the object "
        "(|reference| > --object-threshold × max|reference|) are reported; R (the data range) "
        "is printed with where it came from.",
    )
    p.add_argument("out", help="the reconstruction (OME-Zarr image)")
    p.add_argument("--reference", default=None, metavar="SCAN",
                   help="a scan with a reference array (needed unless --estimate)")
    est = p.add_argument_group(
        "reference-free estimate (--estimate)",
        "Estimate the reconstruction's MSE/PSNR without a reference: the reconstruction that made OUT "
        "(recorded in it) is re-run on a few D-blocks of the scan with held-out measurements and "
        "equivariant bootstrap draws (bootstrap-calibrated cross-validation, docs/estimate.md). It costs "
        "about draws × (folds + 1) + folds + 1 reconstructions of each block.")
    est.add_argument("--estimate", action="store_true", help="report estimated_psnr (and its interval) "
                     "without a reference")
    est.add_argument("--scan", default=None, metavar="SCAN",
                     help="the scan OUT was reconstructed from (default: the one OUT records)")
    est.add_argument("--estimate-blocks", type=int, default=3, metavar="N", help="D-blocks estimated (default: 3)")
    est.add_argument("--estimate-slices", type=int, default=None, metavar="N",
                     help="slices per block (default: 8, or the whole scan if thinner)")
    est.add_argument("--draws", type=int, default=8, help="bootstrap draws per block (default: 8, at least 2)")
    est.add_argument("--folds", type=int, default=4, help="held-out parts per cross-validation (default: 4)")
    est.add_argument("--holdout", type=float, default=0.1, metavar="FRACTION",
                     help="share of the measurements held out per part (default: 0.1)")
    est.add_argument("--seed", type=int, default=0, help="seed of the draws and held-out parts (default: 0)")
    est.add_argument("--device", default="cpu", help="where the reconstructions run (default: cpu)")
    p.add_argument("--json", type=local_arg("evaluate --json", "the file is written on the local filesystem",
                                            allow=("-",), as_path=False),
                   default=None, metavar="FILE", help="also write the metrics as JSON ('-': stdout)")
    p.add_argument("--mask", default=None, metavar="FILE|object",
                   help="evaluate inside a mask: a .npy or zarr boolean volume, or 'object' "
                   "(|reference| > --object-threshold × max|reference|)")
    p.add_argument("--no-object", dest="object", action="store_false",
                   help="without --mask, report the whole volume only (one pass less)")
    p.add_argument("--object-threshold", type=float, default=0.1,
                   help="fraction of max|reference| for --mask object (default: 0.1)")
    p.add_argument("--data-range", type=float, default=None, metavar="R",
                   help="R of PSNR and SSIM (default: max|reference|, inside the mask if any)")
    p.add_argument("--window", type=int, default=7, help="SSIM window side (default: 7)")
    p.add_argument("--slab-depth", type=int, default=None,
                   help="D-slices per task (default: whole chunks of OUT, about 16 MiB of it)")
    p.add_argument("--workers", type=int, default=2,
                   help="slabs evaluated at once (default: 2; memory ≈ workers × (4 slabs + 100 MiB))")
    p.add_argument("--scheduler", default="threads", choices=["threads", "sync", "distributed"],
                   help="dask scheduler; 'distributed' uses the active dask.distributed client")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``recon3d evaluate``: print the metrics, optionally write them as JSON."""
    if args.json and args.json != "-":
        from pipeline.outputs import check_outside

        # A --json inside the image, the scan or any zarr group would replace one of its files.
        check_outside(args.json, "evaluate", [a for a in (args.out, args.reference, args.scan) if a],
                      option="--json")
    if args.reference is None and not args.estimate:
        raise ValueError("give --reference SCAN, or --estimate for an estimate without a reference")
    if args.reference is None:
        return _estimate_cli(args)
    common = dict(data_range=args.data_range, object_threshold=args.object_threshold, window=args.window,
                  slab_depth=args.slab_depth, workers=args.workers, scheduler=args.scheduler)
    result = evaluate(args.out, args.reference, mask=args.mask, **common)
    if args.mask is None and args.object:
        obj = evaluate(args.out, args.reference, mask="object", **common)
        result["object"] = {k: obj[k] for k in ("psnr", "ssim", "nmse", "mse", "data_range", "data_range_source",
                                                "object_threshold", "mask_voxels", "ssim_voxels")}
    if args.estimate:
        result["estimate"] = _estimate(args, data_range=result["data_range"])
        complex_mse = _complex_mse(args.out, args.reference)
        if complex_mse is not None:  # what the estimate is of (MRI): the complex image's error
            result["estimate"]["true_psnr_complex"] = (math.inf if complex_mse == 0 else
                                                       10 * math.log10(result["data_range"] ** 2 / complex_mse))
    if _write_json(result, args.json):
        return 0
    inside = f" inside mask {result['mask']} ({result['mask_voxels']} voxels)" if result["mask"] else ""
    print(f"{result['out']} vs {result['reference']}{inside}:")
    rows = [("volume" if "object" in result else "", result)]
    if "object" in result:
        rows.append((f"object ({result['object']['mask_voxels']} voxels, |ref| > "
                     f"{result['object']['object_threshold']:g} max)", result["object"]))
    for label, r in rows:
        lead = f"  {label}:" if label else ""
        print(f"{lead}  PSNR {r['psnr']:.4f} dB   SSIM {r['ssim']:.5f}   NMSE {r['nmse']:.6g}"
              f"   (R = {r['data_range']:.6g}, {r['data_range_source']})")
    if args.estimate:
        est = result["estimate"]
        _print_estimate(est, truth=est.get("true_psnr_complex", result["psnr"]))
    if args.json:
        log(f"  written to {args.json}", "evaluate")
    return 0


def _write_json(result: dict[str, Any], target: str | None) -> bool:
    """``--json``: the result to ``target`` (a file), or to stdout for ``-`` (then nothing else
    is printed: returns True)."""
    text = json.dumps(result, indent=2)
    if target == "-":
        print(text)
        return True
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return False


def _estimate(args: argparse.Namespace, data_range: float | None) -> dict[str, Any]:
    from .estimate_output import estimate_output

    def say(message: str) -> None:
        log(message, "evaluate")

    return estimate_output(args.out, args.scan, blocks=args.estimate_blocks, thickness=args.estimate_slices,
                           draws=args.draws, folds=args.folds, fraction=args.holdout, seed=args.seed,
                           data_range=data_range if data_range is not None else args.data_range,
                           device=args.device, say=say)


def _complex_mse(out: Any, reference: Any) -> float | None:
    """The MSE of OUT's complex image (MRI, kept by reconstruct) against the complex reference,
    slab by slab; ``None`` when either is not complex."""
    import zarr

    from pipeline.data import open_scan

    group = open_zarr(out, "OME-Zarr store")
    name = (dict(group.attrs).get("recon3d") or {}).get("complex")
    ref = open_scan(reference).reference
    if not name or name not in group or ref is None:
        return None
    array = group[name]
    if not isinstance(array, zarr.Array) or array.dtype.kind != "c" or tuple(array.shape[-3:]) != tuple(ref.shape):
        return None
    sse, count, step = 0.0, 0, max(1, int(array.chunks[-3]))
    for lo in range(0, int(ref.shape[0]), step):
        hi = min(int(ref.shape[0]), lo + step)
        a = np.asarray(array[(0,) * (array.ndim - 3) + (slice(lo, hi),)]).astype(np.complex128)
        b = np.asarray(ref.read(slice(lo, hi))).astype(np.complex128)
        sse += float(np.square(np.abs(a - b)).sum())
        count += a.size
    return sse / max(count, 1)


def _print_estimate(est: dict[str, Any], truth: float | None = None) -> None:
    made = est["reconstruction"]
    what = made.get("method") or f"model {made.get('model')}"
    label = "true PSNR of the complex image" if "true_psnr_complex" in est else "true PSNR"
    against = (f"   ({label} {truth:.2f} dB: error {est['estimated_psnr'] - truth:+.2f} dB)"
               if truth is not None else "")
    print(f"  estimated (no reference; {est['estimator']}, {len(est['blocks'])} block(s), {what}):")
    print(f"    PSNR {est['estimated_psnr']:.2f} dB  [{est['estimated_psnr_low']:.2f}, {est['estimated_psnr_high']:.2f}]"
          f"   MSE {est['estimated_mse']:.4g}   (R = {est['data_range']:.6g}, {est['data_range_source']}; "
          f"{est['of']}){against}")
    for caution in est.get("cautions", []):
        print(f"    caution: {caution}")


def _estimate_cli(args: argparse.Namespace) -> int:
    """``recon3d evaluate OUT --estimate`` without a reference."""
    est = _estimate(args, data_range=None)
    if _write_json({"out": str(args.out), **est}, args.json):
        return 0
    print(f"{args.out} (scan {est['scan']}):")
    _print_estimate(est)
    if args.json:
        log(f"  written to {args.json}", "evaluate")
    return 0
