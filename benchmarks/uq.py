"""Reference-free error estimates and uncertainty maps against the true error (issue 15.4): classical methods and exported networks.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/uq.py [--methods fbp,sense,tv,MODEL.pt] [--cases held-out]
        [--draws 8] [--folds 4] [--fraction 0.1] [--pilot default|undersmoothed|estimate] [--threads 2]
        [--maps N [--oracle M]] [--scratch DIR] [--json FILE]

For each scan (the held-out family of ``benchmarks/quality.py`` by default, made here through
``recon3d simulate`` when missing, as ``benchmarks/classical.py`` does) and each classical method
with its reference-free (auto) parameters, the whole 16-slice volume is reconstructed in memory
and its error estimated by :func:`pipeline.estimate.estimate_error` with no
reference. Printed per case: the true PSNR (magnitude, as ``recon3d evaluate``; and of the
complex image for MRI, which the estimate targets), the estimate with its interval, the plain
equivariant bootstrap's estimate beside it, the error of each in dB, and the wall time relative
to one reconstruction measured in the same run. Targets of issue 15: |error| ≤ 0.5 dB median,
≤ 1 dB worst case. The data range of every PSNR here is the reference's peak, so the figures
compare the MSE estimates alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from classical import CT_CASES, HELD_OUT_CASES, MRI_CASES, scan as make_scan  # noqa: E402


def _reconstructor(scan, method: str):
    """``(f, parameters)``: the method with the auto parameters its calibration chooses, or an
    exported model (``*.pt``) under the scan's intensity scale."""
    import torch

    if method.endswith(".pt"):
        from pipeline.models import intensity_scale
        from pipeline.reconstruct import ReconstructConfig
        from pipeline.reconstruct.adapters import _Network

        net = _Network(scan, ReconstructConfig(scan=scan.path, out="unused", model=method, progress=False),
                       torch.device("cpu"), rank=0)
        scale = net.measure_scale()

        def f(y, op):
            with intensity_scale(net.model, scale):
                return net.apply(y, op)

        return f, {"model": method, "intensity_scale": scale}

    from pipeline.classical import AutoClassical

    recon = AutoClassical(scan, method, device=torch.device("cpu"))  # every parameter auto
    recon.calibrate(lambda _: None)
    return recon.apply, recon.parameters()


def _modality_of(weights: str) -> str:
    from pipeline.train.export import read_export

    return str(read_export(weights)["modality"])


def case(scratch: Path, name: str, method: str, args) -> dict:
    from pipeline.data import open_scan
    from pipeline.estimate import estimate_error, estimate_pilot, pilot_estimate
    from pipeline.reconstruct.adapters import _SlabReader

    scan = open_scan(make_scan(scratch, name))
    depth = int(scan.metadata.volume_shape[0])
    y, op = _SlabReader(scan)(0, depth)
    ref = scan.reference.read_torch()
    f, params = _reconstructor(scan, method)
    t0 = time.perf_counter()
    x_hat = f(y, op)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    pilot = {"estimate": lambda: None, "undersmoothed": lambda: pilot_estimate(y, op),
             "default": lambda: estimate_pilot(y, op, scan.metadata.noise(), x_hat)}[args.pilot]()
    est = estimate_error(y, op, scan.metadata.noise(), f, x_hat=x_hat, draws=args.draws, folds=args.folds,
                         fraction=args.fraction, seed=args.seed, pilot=pilot)
    seconds = time.perf_counter() - t0
    peak = float(ref.abs().max())
    db = lambda m: 10.0 * math.log10(peak * peak / m)  # noqa: E731
    true_mag = db(float((x_hat.abs() - ref.abs()).double().square().mean()))
    true_cplx = db(float((x_hat - ref).abs().double().square().mean()))
    ps = est.psnr(peak)
    row = {"case": name, "method": method, "parameters": params, "true_psnr": true_mag, "true_psnr_complex": true_cplx,
           **ps, "bootstrap_psnr": db(est.bootstrap_mse), "error_db": ps["estimated_psnr"] - true_cplx,
           "bootstrap_error_db": db(est.bootstrap_mse) - true_cplx,
           "covered": ps["estimated_psnr_low"] <= true_cplx <= ps["estimated_psnr_high"],
           "seconds": seconds, "cost_vs_plain": seconds / max(plain, 1e-9), "estimate": est.to_dict()}
    print(f"{name:24s} {Path(method).stem:5s} true {true_mag:6.2f} (complex {true_cplx:6.2f}) | estimate "
          f"{ps['estimated_psnr']:6.2f} [{ps['estimated_psnr_low']:.2f}, {ps['estimated_psnr_high']:.2f}] "
          f"error {row['error_db']:+.2f} dB | bootstrap alone {row['bootstrap_psnr']:6.2f} error "
          f"{row['bootstrap_error_db']:+.2f} dB | {seconds:.0f} s = {row['cost_vs_plain']:.0f}x a reconstruction",
          flush=True)
    return row


_TIMED = """
import json, resource, sys, time
from pipeline.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _timed_cli(args: list[str], threads: int) -> dict:
    """``recon3d ARGS`` in a fresh process: the command's own wall time (imports excluded) and the
    process's peak RSS."""
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", _TIMED, *args], env=env, capture_output=True, text=True,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if done.returncode != 0:
        raise RuntimeError(f"recon3d {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def oracle_rms(scan, method: str, realisations: int, seed: int):
    """The per-voxel RMS error of ``method`` over ``realisations`` fresh noisy scans of the true
    volume (``A x`` re-measured with the scan's noise model; the method's parameters stay the ones
    chosen on the scan): the map a perfect uncertainty estimate would give, from the reference."""
    import torch

    from pipeline.reconstruct.uncertainty import _remeasure
    from pipeline.reconstruct.adapters import _SlabReader

    depth = int(scan.metadata.volume_shape[0])
    y, op = _SlabReader(scan)(0, depth)
    ref = scan.reference.read_torch().to(y.dtype if y.is_complex() else torch.float32)
    clean = op(ref)
    f, _ = _reconstructor(scan, method)
    total = torch.zeros(ref.shape, dtype=torch.float64)
    for m in range(realisations):
        noisy = _remeasure(scan.metadata.noise(), clean, torch.Generator().manual_seed(10_000 * seed + m),
                           op.measurement_mask())
        total += (f(noisy.to(y.dtype), op) - ref).abs().double().square()
    return (total / realisations).sqrt()


def map_case(scratch: Path, name: str, method: str, args) -> dict:
    """``reconstruct --uncertainty N`` against a plain reconstruction (cost, peak RSS) and the
    map against the true error: empirical coverage of ``x̂ ± 1.645 u``, Spearman per volume
    (against the voxel's |error|, and against the error's RMS over its 3×3×3 neighbourhood).
    With ``--oracle M``, also the ceiling: the true per-voxel RMS error over M fresh noise
    realisations (:func:`oracle_rms`) ranked against the same |error| (what a perfect map would
    score), and the map ranked against that true RMS."""
    import numpy as np
    import torch
    import zarr
    from scipy.stats import spearmanr

    from pipeline.data import open_scan

    scan_path = make_scan(scratch, name)
    target = f"--model={method}" if method.endswith(".pt") else f"--method={method}"
    outs = {k: scratch / f"map-{name}-{Path(method).stem}-{k}.ome.zarr" for k in ("plain", "map")}
    common = ["reconstruct", "--scan", str(scan_path), target, "--no-progress", "--overwrite"]
    plain = _timed_cli([*common, "--out", str(outs["plain"])], args.threads)
    mapped = _timed_cli([*common, "--out", str(outs["map"]), "--uncertainty", str(args.maps)], args.threads)
    group = zarr.open(str(outs["map"]), mode="r")
    ref = open_scan(scan_path).reference.read_torch()
    x = torch.from_numpy(np.asarray(group["complex" if "complex" in group else "0"]))
    u = torch.from_numpy(np.asarray(group["uncertainty/0"])).double()
    err = (x - ref).abs().double()
    local = torch.nn.functional.avg_pool3d(err[None, None] ** 2, 3, stride=1, padding=1)[0, 0].sqrt()
    row = {"case": name, "method": method, "draws": args.maps,
           "coverage_90": float((err <= 1.645 * u).double().mean()),
           "spearman": float(spearmanr(err.flatten().numpy(), u.flatten().numpy()).correlation),
           "spearman_local": float(spearmanr(local.flatten().numpy(), u.flatten().numpy()).correlation),
           "rms_true": float(err.square().mean().sqrt()), "rms_map": float(u.square().mean().sqrt()),
           "cost_vs_plain": mapped["seconds"] / plain["seconds"], "seconds_plain": plain["seconds"],
           "seconds_map": mapped["seconds"], "peak_rss_mb_plain": plain["peak_rss_mb"],
           "peak_rss_mb_map": mapped["peak_rss_mb"]}
    if args.oracle:
        true_rms = oracle_rms(open_scan(scan_path), method, args.oracle, args.seed)
        row.update({"oracle_realisations": args.oracle,
                    "spearman_ceiling": float(spearmanr(err.flatten().numpy(), true_rms.flatten().numpy()).correlation),
                    "spearman_map_vs_true_rms": float(spearmanr(true_rms.flatten().numpy(),
                                                                u.flatten().numpy()).correlation),
                    "coverage_90_true_rms": float((err <= 1.645 * true_rms).double().mean()),
                    "rms_true_rms": float(true_rms.square().mean().sqrt())})
        print(f"{name:24s} {Path(method).stem:8s} true RMS of {args.oracle} realisations: Spearman with |error| "
              f"{row['spearman_ceiling']:.2f} (the ceiling), map vs true RMS {row['spearman_map_vs_true_rms']:.2f}, "
              f"coverage(90%) of the true RMS {row['coverage_90_true_rms']:.3f}", flush=True)
    print(f"{name:24s} {Path(method).stem:8s} map of {args.maps}: coverage(90%) {row['coverage_90']:.3f}, Spearman "
          f"{row['spearman']:.2f} (vs local RMS {row['spearman_local']:.2f}), RMS map/true "
          f"{row['rms_map'] / row['rms_true']:.2f} | {row['seconds_map']:.1f} s vs {row['seconds_plain']:.1f} s = "
          f"{row['cost_vs_plain']:.1f}x, peak RSS {row['peak_rss_mb_map']:.0f} vs {row['peak_rss_mb_plain']:.0f} MB",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fbp,sense", help="fbp (CT), sense (MRI), tv (both), or exported model "
                        "files (*.pt), each run on the cases of its modality")
    parser.add_argument("--cases", default="held-out", help="comma-separated case names of benchmarks/classical.py, "
                                                           "or 'held-out'")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pilot", default="default", choices=["default", "undersmoothed", "estimate"],
                        help="the bootstrap's truth: what recon3d evaluate --estimate uses (the power-matched "
                             "pilot for parallel-beam CT, the undersmoothed one else), the undersmoothed pilot "
                             "(Ram-Lak FBP / SENSE without regularisation) for every scan, or the assessed "
                             "estimate itself (the earliest, optimistic variant)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    parser.add_argument("--maps", type=int, default=0, metavar="N",
                        help="instead: uncertainty maps of N draws (reconstruct --uncertainty N) against the truth "
                             "and their cost against a plain reconstruction; methods may include exported "
                             "model files (.pt) for scans of their modality")
    parser.add_argument("--oracle", type=int, default=0, metavar="M",
                        help="with --maps: also the true per-voxel RMS error over M noise realisations of the "
                             "reference (the ceiling any map can reach against one volume's |error|)")
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    names = [n for c in args.cases.split(",") for n in (HELD_OUT_CASES if c == "held-out" else [c])]
    unknown = [n for n in names if n not in CT_CASES and n not in MRI_CASES]
    if unknown:
        parser.error(f"unknown --cases {unknown}")
    methods = args.methods.split(",")
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="recon3d-uq-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"threads {args.threads}, draws {args.draws}, folds {args.folds}, held out {args.fraction:.0%}, "
          f"scratch {scratch}", flush=True)
    rows = []
    for name in names:
        for method in methods:
            if (method == "fbp" and name in MRI_CASES) or (method == "sense" and name in CT_CASES):
                continue
            if method.endswith(".pt") and not name.startswith(_modality_of(method)):
                continue
            rows.append(map_case(scratch, name, method, args) if args.maps else case(scratch, name, method, args))
    if rows and args.maps:
        print(f"\ncoverage of nominal 90 %: {min(r['coverage_90'] for r in rows):.3f}-"
              f"{max(r['coverage_90'] for r in rows):.3f} (target 0.80-0.98); Spearman per volume "
              f"{min(r['spearman'] for r in rows):.2f}-{max(r['spearman'] for r in rows):.2f} (target >= 0.5)"
              + (f", ceiling (true RMS) {min(r['spearman_ceiling'] for r in rows):.2f}-"
                 f"{max(r['spearman_ceiling'] for r in rows):.2f}" if args.oracle else "") + "; cost "
              f"{max(r['cost_vs_plain'] for r in rows):.1f}x at most (target <= 9x)")
    elif rows:
        errors = [abs(r["error_db"]) for r in rows]
        boot = [abs(r["bootstrap_error_db"]) for r in rows]
        print(f"\n|error| of the estimate: median {statistics.median(errors):.2f} dB, worst {max(errors):.2f} dB "
              f"(target 0.5 / 1.0); bootstrap alone: median {statistics.median(boot):.2f}, worst {max(boot):.2f}; "
              f"interval covers the truth in {sum(r['covered'] for r in rows)} of {len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
