"""Validation of the reference-free classical parameters (issue 14.3): auto against the oracle.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classical.py --methods fbp,sense,tv \\
        [--scratch DIR] [--cases NAME,...] [--json FILE]

For each simulated scan (16×128×128, and the held-out family of ``benchmarks/quality.py``:
``--cases held-out``; CT parallel beam with photon-counting noise, MRI 8 coils
Poisson-disc with complex Gaussian noise; made here when missing) it runs the ``recon3d``
commands in this process: ``reconstruct`` with the auto default and with every value of the
grid the calibration searches, then ``evaluate`` (PSNR over the whole volume against the
scan's reference), and prints per case the oracle-best grid setting, the auto setting, their
PSNRs and the gap, and the auto run's wall time. TV's grid is the calibration's lattice
``μ₀ 2^{j/2}`` (``μ₀`` read from the auto run's record) × its iteration counts.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import HELD_OUT, HELD_OUT_SEED  # noqa: E402  (the held-out family: one definition)

CT_CASES = {
    # name: (angles, photons, phantom)
    "ct-a60-i1e4": (60, 1e4, "ellipsoids"),
    "ct-a60-i1e3": (60, 1e3, "ellipsoids"),
    "ct-a60-i1e5": (60, 1e5, "ellipsoids"),
    "ct-a30-i1e4": (30, 1e4, "ellipsoids"),
    "ct-a180-i1e4": (180, 1e4, "ellipsoids"),
    "ct-a60-i1e4-shepp": (60, 1e4, "shepp-logan"),
    "ct-a60-i1e4-foam": (60, 1e4, "foam"),
}
MRI_CASES = {
    # name: (acceleration, sigma, phantom)
    "mri-r6-s0.01": (6, 0.01, "ellipsoids"),
    "mri-r6-s0.003": (6, 0.003, "ellipsoids"),
    "mri-r6-s0.03": (6, 0.03, "ellipsoids"),
    "mri-r4-s0.01": (4, 0.01, "ellipsoids"),
    "mri-r8-s0.01": (8, 0.01, "ellipsoids"),
    "mri-r6-s0.01-shepp": (6, 0.01, "shepp-logan"),
    "mri-r6-s0.01-foam": (6, 0.01, "foam"),
}
TV_DEFAULT = ("ct-a60-i1e4", "mri-r6-s0.01")
# The held-out family of benchmarks/quality.py (never used to tune anything), at its settings
# (CT 60 views, I0 = 10^4; MRI 6x, sigma 0.01) and seeds; its default shape where it gives none.
_DEFAULT_SHAPE = (16, 128, 128)
for _k, (_ph, _shape) in enumerate(HELD_OUT):
    _shape = tuple(_shape or _DEFAULT_SHAPE)
    _name = _ph if _shape == _DEFAULT_SHAPE else f"{_ph}-{_shape[1]}x{_shape[2]}"
    CT_CASES[f"ct-held-{_name}"] = (60, 1e4, _ph, _shape, HELD_OUT_SEED + _k)
    MRI_CASES[f"mri-held-{_name}"] = (6, 0.01, _ph, _shape, HELD_OUT_SEED + _k)
HELD_OUT_CASES = tuple(c for c in (*CT_CASES, *MRI_CASES) if "-held-" in c)


def _cli(*argv: str) -> None:
    from pipeline.cli import main

    code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"recon3d {' '.join(argv)} exited with {code}")


def scan(scratch: Path, name: str) -> str:
    path = scratch / f"{name}.zarr"
    if (path / "zarr.json").exists():
        return str(path)
    case = CT_CASES.get(name) or MRI_CASES[name]
    shape, seed = (case[3], case[4]) if len(case) > 3 else ((16, 128, 128), 1)
    common = ["--shape", *map(str, shape), "--seed", str(seed), "--out", str(path), "--no-progress"]
    if name in CT_CASES:
        angles, photons, phantom = case[:3]
        _cli("simulate", "ct", "--angles", str(angles), "--photons", str(photons), "--phantom", phantom, *common)
    else:
        accel, sigma, phantom = case[:3]
        _cli("simulate", "mri", "--coils", "8", "--acceleration", str(accel), "--calibration", "20",
             "--noise-sigma", str(sigma), "--phantom", phantom, *common)
    return str(path)


def psnr(out: Path, scan_path: str) -> float:
    report = out.with_suffix(".json")
    _cli("evaluate", str(out), "--reference", scan_path, "--no-object", "--json", str(report),
         "--workers", "1", "--scheduler", "sync")
    return float(json.loads(report.read_text())["psnr"])


def run(scratch: Path, scan_path: str, tag: str, method: str, options: list[str]) -> tuple[float, float, dict]:
    out = scratch / "out" / f"{tag}.ome.zarr"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    _cli("reconstruct", "--method", method, "--scan", scan_path, "--out", str(out), "--no-progress",
         "--scheduler", "sync", *options)
    seconds = time.perf_counter() - t0
    import zarr

    attrs = dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]
    value = psnr(out, scan_path)
    shutil.rmtree(out)
    return value, seconds, attrs


def grid(method: str, attrs: dict) -> list[tuple[dict, list[str]]]:
    from pipeline.classical import FBP_CUTOFFS, FBP_WINDOWS, SENSE_ITERATIONS, TV_ITERATIONS

    if method == "fbp":
        return [({"filter": w, "cutoff": c}, ["--filter", w, "--filter-cutoff", str(c)])
                for w in FBP_WINDOWS for c in FBP_CUTOFFS]
    if method == "sense":
        weights = sorted({r["l2_weight"] for r in attrs["calibration"]["candidates"]})
        return [({"l2_weight": lam, "iterations": k}, ["--l2-weight", repr(lam), "--sense-iters", str(k)])
                for lam in weights for k in SENSE_ITERATIONS]
    mu0 = attrs["calibration"]["weight_scale"]
    mus = [float(f"{mu0 * 2.0 ** (j / 2):.3g}") for j in range(-8, 3)]
    return [({"tv_weight": mu, "iterations": k}, ["--tv-weight", repr(mu), "--tv-iters", str(k)])
            for mu in mus for k in TV_ITERATIONS]


def validate(scratch: Path, name: str, method: str) -> dict:
    scan_path = scan(scratch, name)
    auto_psnr, seconds, attrs = run(scratch, scan_path, f"{name}-{method}-auto", method, [])
    chosen = attrs["calibration"]["chosen"]
    rows = []
    for setting, options in grid(method, attrs):
        value, _, _ = run(scratch, scan_path, f"{name}-{method}-grid", method, options)
        rows.append({**setting, "psnr": value})
    best = max(rows, key=lambda r: r["psnr"])
    result = {"case": name, "method": method, "auto": chosen, "auto_psnr": auto_psnr,
              "oracle": {k: v for k, v in best.items() if k != "psnr"}, "oracle_psnr": best["psnr"],
              "gap_db": best["psnr"] - auto_psnr, "auto_seconds": seconds,
              "calibration_seconds": attrs["calibration"].get("seconds"), "grid": rows}
    print(f"{name:20s} {method:5s} oracle {_fmt(result['oracle'])} {best['psnr']:.2f} dB | auto "
          f"{_fmt(chosen)} {auto_psnr:.2f} dB | gap {result['gap_db']:.2f} dB | auto run {seconds:.0f} s "
          f"(calibration {result['calibration_seconds']:.0f} s)", flush=True)
    return result


def _fmt(setting: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in setting.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="fbp,sense,tv")
    parser.add_argument("--cases", default=None, help="comma-separated case names, or 'held-out' for the held-out "
                        f"family (default: all of each method; tv: {', '.join(TV_DEFAULT)})")
    parser.add_argument("--scratch", default=None, help="folder for scans and outputs (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write every result (with the grids) here")
    args = parser.parse_args(argv)
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="recon3d-classical-"))
    (scratch / "out").mkdir(parents=True, exist_ok=True)
    results = []
    for method in args.methods.split(","):
        if args.cases:
            names = [n for c in args.cases.split(",") for n in (HELD_OUT_CASES if c == "held-out" else [c])]
            unknown = sorted(set(names) - set(CT_CASES) - set(MRI_CASES))
            if unknown:
                parser.error(f"unknown --cases {unknown}; choose from {sorted({*CT_CASES, *MRI_CASES})} or held-out")
        else:
            names = list(TV_DEFAULT) if method == "tv" else list(CT_CASES if method == "fbp" else MRI_CASES)
        for name in names:
            if method == "fbp" and name not in CT_CASES or method == "sense" and name not in MRI_CASES:
                continue
            results.append(validate(scratch, name, method))
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    worst = max((r["gap_db"] for r in results), default=math.nan)
    print(f"largest gap: {worst:.2f} dB over {len(results)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
