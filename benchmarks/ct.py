"""CT projector benchmark: speed (GUPS) against scikit-image in the same run, and peak memory.

Prints, for ``ParallelBeamCT`` at 128³ × 180 angles (float32), forward and adjoint time in
giga voxel-ray updates per second (``N³ · A / time``) beside ``skimage.transform.radon`` /
``iradon(filter_name=None)`` applied slice by slice; ``ConeBeamCT`` at 128³ × 180; and the peak
memory of the parallel forward and adjoint at 256³ × 360 as a multiple of the volume plus
sinogram bytes (each case in a fresh process, so that freed heap of an earlier case cannot
hide a peak). Where CUDA is present the same projectors are timed on the GPU (float32).

Usage::

    python benchmarks/ct.py                 # everything (CPU; CUDA rows where present)
    python benchmarks/ct.py --quick         # 64³ × 90 instead of 128³ × 180, no skimage
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine_line, peak_memory_bytes, print_table, time_call  # noqa: E402
from operators3d.ct import ConeBeamCT, ParallelBeamCT, min_det_shape  # noqa: E402


def _angles(num: int, full_turn: bool = False) -> torch.Tensor:
    span = 2 * math.pi if full_turn else math.pi
    return torch.arange(num, dtype=torch.float64) * span / num


def _cone(n: int, num_angles: int) -> ConeBeamCT:
    geo = dict(volume_shape=(n, n, n), angles=_angles(num_angles, True), src_dist=3.0 * n,
               det_dist=1.0 * n, det_spacing=4 / 3)
    return ConeBeamCT(det_shape=min_det_shape(**geo), **geo)


def _gups(n: int, num_angles: int, seconds: float) -> float:
    return n**3 * num_angles / seconds / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_pair(op, device: str, repeat: int) -> tuple[float, float]:
    x = torch.randn(op.domain_shape, device=device)
    with torch.no_grad():
        y = op(x)
        _sync(device)
        fwd = time_call(lambda: (op(x), _sync(device)), repeat=repeat)
        adj = time_call(lambda: (op.adjoint(y), _sync(device)), repeat=repeat)
    return fwd, adj


def _skimage_times(n: int, num_angles: int) -> tuple[float, float] | None:
    """Per-slice radon / iradon(filter_name=None) over all n slices of an n³ volume."""
    try:
        from skimage.transform import iradon, radon
    except ImportError:
        return None
    import numpy as np

    rng = np.random.default_rng(0)
    theta = np.arange(num_angles) * 180.0 / num_angles
    vol = rng.standard_normal((n, n, n)).astype(np.float32)
    yy, xx = np.mgrid[:n, :n]
    vol *= ((xx - n // 2) ** 2 + (yy - n // 2) ** 2) < (n // 2) ** 2  # radon's circle
    t0 = time.perf_counter()
    sino = [radon(vol[d], theta=theta, circle=True) for d in range(n)]
    t_radon = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in sino:
        iradon(s, theta=theta, filter_name=None, circle=True)
    t_iradon = time.perf_counter() - t0
    return t_radon, t_iradon


def memory_case(which: str, n: int, num_angles: int) -> dict:
    """Peak bytes of one parallel-beam application (run in its own process)."""
    op = ParallelBeamCT(volume_shape=(n, n, n), angles=_angles(num_angles))
    vol_bytes = 4 * n**3
    sino_bytes = 4 * math.prod(op.range_shape)
    with torch.no_grad():
        if which == "forward":
            arg = torch.randn(op.domain_shape)
            peak, _ = peak_memory_bytes(lambda: op(arg))
        else:
            arg = torch.randn(op.range_shape)
            peak, _ = peak_memory_bytes(lambda: op.adjoint(arg))
    return {"which": which, "peak": peak, "volume": vol_bytes, "sinogram": sino_bytes}


def _memory_rows(n: int, num_angles: int) -> list[list[object]]:
    rows = []
    for which in ("forward", "adjoint"):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-case", which, "--n", str(n),
             "--angles", str(num_angles)],
            capture_output=True, text=True, check=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])
        data = res["volume"] + res["sinogram"]
        rows.append([
            f"parallel {which}", f"{n}³ × {num_angles}", f"{res['volume'] / 2**20:.0f}",
            f"{res['sinogram'] / 2**20:.0f}", f"{res['peak'] / 2**20:.0f}",
            f"{res['peak'] / data:.2f}", "≤ 2",
        ])
    return rows


def _cuda_rows(n: int, num_angles: int) -> list[list[object]]:
    rows = []
    for size, count in ((n, num_angles), (256, 360)):
        for kind in ("parallel", "cone"):
            if kind == "parallel":
                op = ParallelBeamCT(volume_shape=(size,) * 3, angles=_angles(count))
            else:
                op = _cone(size, count)
            op.to("cuda")
            f, a = _time_pair(op, "cuda", repeat=10 if kind == "parallel" else 3)
            x = torch.randn(op.domain_shape, device="cuda")
            with torch.no_grad():
                peak_f, y = peak_memory_bytes(lambda: op(x))
                peak_a, _ = peak_memory_bytes(lambda: op.adjoint(y))
            rows.append([
                f"{kind} (ours)", "cuda", f"{size}³ × {count}", f"{f:.4f}",
                f"{_gups(size, count, f):.2f}", f"{a:.4f}", f"{_gups(size, count, a):.2f}",
                f"{a / f:.2f}", f"{peak_f / 2**30:.2f} / {peak_a / 2**30:.2f}",
            ])
            del op, x, y
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, no skimage")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-case", choices=("forward", "adjoint"))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--angles", type=int, default=360)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-cone", action="store_true", help="skip the cone-beam row")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case, args.n, args.angles)))
        return

    n, num_angles = (64, 90) if args.quick else (128, 180)
    print(machine_line())
    if args.cuda_only:
        print(f"device: {torch.cuda.get_device_name()}")
        print_table(
            "CT projectors on CUDA, float32 (GUPS = N³·A / time)",
            ["projector", "device", "size", "forward s", "forward GUPS", "adjoint s",
             "adjoint GUPS", "adjoint / forward", "peak GiB fwd / adj"],
            _cuda_rows(n, num_angles),
        )
        return
    rows = []
    par = ParallelBeamCT(volume_shape=(n, n, n), angles=_angles(num_angles))
    fwd, adj = _time_pair(par, "cpu", repeat=5)
    sk = None if args.quick else _skimage_times(n, num_angles)
    rows.append([
        "parallel (ours)", "cpu", f"{n}³ × {num_angles}", f"{fwd:.3f}",
        f"{_gups(n, num_angles, fwd):.3f}", f"{adj:.3f}", f"{_gups(n, num_angles, adj):.3f}",
        f"{adj / fwd:.2f}",
    ])
    if sk is not None:
        rows.append([
            "skimage radon/iradon per slice", "cpu", f"{n}³ × {num_angles}", f"{sk[0]:.2f}",
            f"{_gups(n, num_angles, sk[0]):.4f}", f"{sk[1]:.2f}",
            f"{_gups(n, num_angles, sk[1]):.4f}", f"{sk[1] / sk[0]:.2f}",
        ])
    if not args.no_cone:
        cone = _cone(n, num_angles)
        cfwd, cadj = _time_pair(cone, "cpu", repeat=3)
        rows.append([
            f"cone (ours), detector {cone.range_shape[0]}×{cone.range_shape[2]}", "cpu",
            f"{n}³ × {num_angles}", f"{cfwd:.2f}", f"{_gups(n, num_angles, cfwd):.3f}",
            f"{cadj:.2f}", f"{_gups(n, num_angles, cadj):.3f}", f"{cadj / cfwd:.2f}",
        ])
    if torch.cuda.is_available():
        rows += [r[:-1] for r in _cuda_rows(n, num_angles)]
    print_table(
        f"CT projectors, float32, {torch.get_num_threads()} threads (GUPS = N³·A / time)",
        ["projector", "device", "size", "forward s", "forward GUPS", "adjoint s",
         "adjoint GUPS", "adjoint / forward"],
        rows,
    )
    if sk is not None:
        print(
            f"\nparallel vs skimage per slice: forward {sk[0] / fwd:.1f}× faster, "
            f"adjoint {sk[1] / adj:.1f}× faster (target ≥ 3×; ≥ 0.15 GUPS; adjoint ≤ 1.5× forward)"
        )
    if not args.no_memory:
        mem_n, mem_a = (128, 180) if args.quick else (args.n, args.angles)
        print_table(
            "Peak memory of one application (CPU, float32, fresh process per case)",
            ["case", "size", "volume MiB", "sinogram MiB", "peak MiB", "peak / (vol + sino)",
             "target"],
            _memory_rows(mem_n, mem_a),
        )


if __name__ == "__main__":
    main()
