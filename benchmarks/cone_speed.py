"""Cone-beam projector speed on CPU against the parallel-beam projector measured in the same run.

For each case (a cubic and a non-cubic volume), prints per application: process CPU seconds
(the best of ``--repeat`` runs after a warm-up: on a shared machine CPU time is far steadier
than wall time; with one thread they agree on an idle machine) and
nanoseconds per voxel-ray update (``D·H·W·A`` updates) of ``ParallelBeamCT`` (half turn) and
``ConeBeamCT`` (full turn, the detector of ``min_det_shape``), forward and adjoint; the cone's
adjoint / forward ratio and cone / parallel per update; and the process CPU seconds of a
whole-volume cone forward (and adjoint) against the same computed by thin D-slabs the way
``pipeline/data/cone.py`` does it (``op.slab(s).rows(op.slab(s).rows_hit_by(...))``, summed),
as a ratio pieces / whole. Targets (issue 17.4): cone within 3× of parallel per update,
adjoint ≤ 1.3× forward, slab pieces ≤ 1.2× whole.

The cone rows are repeated for each kernel of ``--kernels`` (``RECON3D_CONE_KERNEL``: ``c``
the compiled CPU kernel of ``operators3d/ct/_cone_native.py``, ``torch`` the torch one), in
the same run and against the same parallel-beam figures; a kernel that cannot be used here
is reported and left out.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/cone_speed.py [--threads 1] [--quick] [--slab 8,16,32]
        [--kernels c,torch]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import machine_line, print_table  # noqa: E402
from operators3d.ct import ConeBeamCT, ParallelBeamCT, min_det_shape  # noqa: E402
from operators3d.ct import _cone_native  # noqa: E402


def _angles(num: int, full_turn: bool) -> torch.Tensor:
    span = 2 * math.pi if full_turn else math.pi
    return torch.arange(num, dtype=torch.float64) * span / num


def cone_op(shape, num_angles: int) -> ConeBeamCT:
    """The cone of ``benchmarks/ct.py`` (source at 3 N, detector at N, pitch 4/3) for a shape."""
    n = max(shape)
    geo = dict(volume_shape=tuple(shape), angles=_angles(num_angles, True), src_dist=3.0 * n,
               det_dist=1.0 * n, det_spacing=4 / 3)
    return ConeBeamCT(det_shape=min_det_shape(**geo), **geo)


def _cpu_time(fn, repeat: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def _pieces(op: ConeBeamCT, x: torch.Tensor, y: torch.Tensor, thick: int):
    num_d = op.domain_shape[0]

    def slabs():
        """Each D-slab's bounds, its operator and the detector rows it reaches."""
        for d0 in range(0, num_d, thick):
            d1 = min(num_d, d0 + thick)
            sub = op.slab(slice(d0, d1))
            yield d0, d1, sub, sub.rows_hit_by(slice(0, d1 - d0))

    def forward():
        out = torch.zeros(op.range_shape, dtype=x.dtype)
        for d0, d1, sub, hit in slabs():
            if hit.start < hit.stop:
                out[hit] += sub.rows(hit)(x[d0:d1])
        return out

    def adjoint():
        out = torch.empty(op.domain_shape, dtype=y.dtype)
        for d0, d1, sub, hit in slabs():
            out[d0:d1] = sub.rows(hit).adjoint(y[hit])
        return out

    return forward, adjoint


def run_case(shape, num_angles: int, repeat: int, thicks: list[int],
             kernels: list[str]) -> tuple[list, list]:
    """The rows of both tables for one case: one per kernel, the parallel beam measured once."""
    updates = math.prod(shape) * num_angles
    par = ParallelBeamCT(volume_shape=shape, angles=_angles(num_angles, False))
    cone = cone_op(shape, num_angles)
    x = torch.randn(shape)
    ns = lambda t: t / updates * 1e9  # noqa: E731
    size = "×".join(map(str, shape)) + f" × {num_angles}"
    det = f"{cone.range_shape[0]}×{cone.range_shape[2]}"
    speed, slabs = [], []
    with torch.no_grad():
        yp = par(x)
        pf = _cpu_time(lambda: par(x), repeat)
        pa = _cpu_time(lambda: par.adjoint(yp), repeat)
        for kernel in kernels:
            os.environ["RECON3D_CONE_KERNEL"] = kernel
            yc = cone(x)
            cf = _cpu_time(lambda: cone(x), repeat)
            ca = _cpu_time(lambda: cone.adjoint(yc), repeat)
            speed.append([size, det, kernel, f"{pf:.3f}", f"{pa:.3f}", f"{cf:.3f}", f"{ca:.3f}",
                          f"{ns(pf):.2f} / {ns(pa):.2f}", f"{ns(cf):.2f} / {ns(ca):.2f}",
                          f"{ca / cf:.2f}", f"{cf / pf:.2f} / {ca / pa:.2f}"])
            for thick in thicks:
                fwd_p, adj_p = _pieces(cone, x, yc, thick)
                sf = _cpu_time(fwd_p, repeat)
                sa = _cpu_time(adj_p, repeat)
                slabs.append([size, kernel, str(thick), f"{cf:.3f}", f"{sf:.3f}",
                              f"{sf / cf:.2f}", f"{ca:.3f}", f"{sa:.3f}", f"{sa / ca:.2f}"])
    return speed, slabs


def _kernels(given: str) -> list[str]:
    """The kernels of ``--kernels`` that this machine can run (the compiled one needs a C
    compiler); says why one is left out."""
    kernels = [k.strip() for k in given.split(",") if k.strip()]
    for k in kernels:
        if k not in ("c", "torch"):
            raise SystemExit(f"--kernels: each must be 'c' or 'torch', got {k!r}")
    if "c" in kernels:
        lib, why = _cone_native.load()
        if lib is None:
            print(f"compiled kernel left out: {why}")
            kernels.remove("c")
        else:
            print(f"compiled kernel: {lib._name} (OpenMP: {bool(lib.cone_c_has_openmp())})")
    return kernels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64³ × 90 and 40×56×72 × 60")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--slab", default="8",
                        help="slab thicknesses (slices), comma-separated, e.g. 8,16,32")
    parser.add_argument("--kernels", default="c,torch",
                        help="cone kernels to time, comma-separated: c (compiled), torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = ([((64, 64, 64), 90), ((40, 56, 72), 60)] if args.quick
             else [((128, 128, 128), 180), ((80, 112, 144), 120)])
    print(machine_line())
    print("load average (1, 5, 15 min) at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    kernels = _kernels(args.kernels)
    try:
        thicks = [int(t) for t in args.slab.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--slab: comma-separated positive integers, got {args.slab!r}")
    if not thicks or min(thicks) < 1:
        raise SystemExit(f"--slab: comma-separated positive integers, got {args.slab!r}")
    speed, slabs = [], []
    for shape, num_angles in cases:
        s, p = run_case(shape, num_angles, args.repeat, thicks, kernels)
        speed += s
        slabs += p
    print_table(
        f"Cone vs parallel, float32, CPU, {torch.get_num_threads()} thread(s)",
        ["size", "detector", "kernel", "parallel fwd s", "parallel adj s", "cone fwd s",
         "cone adj s",
         "parallel ns/update fwd / adj", "cone ns/update fwd / adj", "cone adj / fwd",
         "cone / parallel fwd / adj"],
        speed,
    )
    print_table(
        "Cone by D-slabs (pipeline/data/cone.py pattern) vs whole, process CPU seconds",
        ["size", "kernel", "slab", "whole fwd", "pieces fwd", "pieces / whole fwd", "whole adj",
         "pieces adj", "pieces / whole adj"],
        slabs,
    )
    print("load average (1, 5, 15 min) at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
