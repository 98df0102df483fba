"""Operator benchmarks: MRI (and CT, where benchmarks/ct.py exists), figures for BENCHMARKS.md.

    .venv/bin/python benchmarks/operators.py [--section mri|ct|all] [--repeat N]

MRI: forward + adjoint of a 16-coil hybrid-space operator on 8×256×256 and 32×256×256 slabs
(complex64) against the bare ``torch.fft.fft2`` + ``ifft2`` of the same coil images in the same
run (target ratio ≤ 1.3); peak memory of forward + adjoint in units of the coil-image bytes
(target ≤ 2.5, measured in a fresh subprocess so no freed heap of earlier cases counts);
bytes autograd keeps for backward after a forward with gradients (target 0); ESPIRiT coil-map
estimation and ``sense_cg`` time on 32×256×256 with 16 coils.

The physical reference is the FFT itself: a forward + adjoint must transform every coil image
twice, so the bare FFT pair is the floor; everything else (coil weighting, mask, coil sum) is
elementwise work that the fused operator does in cache-sized blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    machine_line,
    peak_memory_bytes,
    print_table,
    saved_tensor_bytes,
    time_call,
)

from operators3d import (  # noqa: E402
    MultiCoilMRI,
    estimate_coil_maps,
    poisson_disc_mask,
    sense_cg,
    shepp_logan_3d,
    simulate_coil_maps,
)

NUM_COILS, SIZE = 16, 256


def _mri_case(depth: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(NUM_COILS, depth, SIZE, SIZE, dtype=torch.complex64, generator=gen)
    mask = poisson_disc_mask((SIZE, SIZE), 4, calibration=24, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    x = torch.randn(depth, SIZE, SIZE, dtype=torch.complex64, generator=gen)
    coil_images = torch.randn(NUM_COILS, depth, SIZE, SIZE, dtype=torch.complex64, generator=gen)
    return op, x, coil_images


def _memory_child(depth: int) -> None:
    """Runs in a fresh process: prints peak bytes of bare FFT pair and operator pair."""
    op, x, coil_images = _mri_case(depth)
    op.adjoint(op(x))  # first call builds nothing persistent, but warms the FFT plans

    def bare():
        return torch.fft.ifft2(torch.fft.fft2(coil_images, norm="ortho"), norm="ortho")

    def fused():
        return op.adjoint(op(x))

    peak_bare, _ = peak_memory_bytes(bare)
    peak_op, _ = peak_memory_bytes(fused)
    print(json.dumps({"bare": peak_bare, "op": peak_op, "coil_bytes": coil_images.nbytes}))


def _memory(depth: int) -> dict:
    env = dict(os.environ)
    # A fixed mmap threshold stops glibc from keeping freed tensors resident, so RSS follows
    # the live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(depth)],
        capture_output=True, text=True, check=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_mri(repeat: int) -> None:
    rows, mem_rows = [], []
    for depth in (8, 32):
        op, x, coil_images = _mri_case(depth)
        y = op(x)

        def bare_pair():
            return torch.fft.ifft2(torch.fft.fft2(coil_images, norm="ortho"), norm="ortho")

        t_fft = time_call(lambda: torch.fft.fft2(coil_images, norm="ortho"), repeat=repeat)
        t_ifft = time_call(lambda: torch.fft.ifft2(coil_images, norm="ortho"), repeat=repeat)
        t_bare = time_call(bare_pair, repeat=repeat)
        t_fwd = time_call(lambda: op(x), repeat=repeat)
        t_adj = time_call(lambda: op.adjoint(y), repeat=repeat)
        t_pair = time_call(lambda: op.adjoint(op(x)), repeat=repeat)
        rows.append([
            f"{NUM_COILS}×{depth}×{SIZE}×{SIZE}",
            f"{t_fft * 1e3:.1f}", f"{t_fwd * 1e3:.1f}", f"{t_fwd / t_fft:.2f}",
            f"{t_ifft * 1e3:.1f}", f"{t_adj * 1e3:.1f}", f"{t_adj / t_ifft:.2f}",
            f"{t_bare * 1e3:.1f}", f"{t_pair * 1e3:.1f}", f"**{t_pair / t_bare:.2f}**",
        ])
        mem = _memory(depth)
        xg = x.clone().requires_grad_()
        saved, _ = saved_tensor_bytes(lambda: op(xg))
        mem_rows.append([
            f"{NUM_COILS}×{depth}×{SIZE}×{SIZE}",
            f"{mem['coil_bytes'] / 2**20:.0f}",
            f"{mem['bare'] / mem['coil_bytes']:.2f}",
            f"**{mem['op'] / mem['coil_bytes']:.2f}**",
            f"{saved}",
        ])
    print_table(
        "MRI hybrid operator vs bare torch.fft (complex64, ms, median)",
        ["coil images", "fft2", "forward", "ratio", "ifft2", "adjoint", "ratio",
         "fft2+ifft2", "fwd+adj", "ratio (≤1.3)"],
        rows,
    )
    print_table(
        "MRI peak memory of forward+adjoint (× coil-image bytes) and bytes saved for backward",
        ["coil images", "coil MiB", "bare fft2+ifft2", "operator (≤2.5)", "saved for backward"],
        mem_rows,
    )

    # Classical baselines on a realistic slab.
    depth = 32
    gen = torch.Generator().manual_seed(1)
    shape = (depth, SIZE, SIZE)
    x = shepp_logan_3d(shape).to(torch.complex64)
    maps = simulate_coil_maps(NUM_COILS, shape)
    mask = poisson_disc_mask((SIZE, SIZE), 4, calibration=24, generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    y = op(x)
    t_normal = time_call(lambda: op.normal(x), repeat=repeat)
    t_espirit = time_call(lambda: estimate_coil_maps(y, calibration=24), repeat=1, warmup=0)
    iters = 30
    t_sense = time_call(lambda: sense_cg(y, op, num_iters=iters, tol=0.0), repeat=1, warmup=0)
    print_table(
        f"Coil maps and SENSE on {depth}×{SIZE}×{SIZE}, {NUM_COILS} coils (s)",
        ["step", "time (s)", "note"],
        [
            ["estimate_coil_maps (ESPIRiT, 24² calibration, kernel 6)", f"{t_espirit:.2f}",
             "eigen-decompositions on a 64×64 grid, interpolated"],
            [f"sense_cg, {iters} CG iterations", f"{t_sense:.2f}",
             f"{t_sense / iters * 1e3:.0f} ms per iteration"],
            ["one normal AᴴA (blocked, no full k-space)", f"{t_normal:.3f}", ""],
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("mri", "ct", "all"), default="all")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    print(f"# benchmarks/operators.py — {machine_line()}")
    if args.section in ("mri", "all"):
        bench_mri(args.repeat)
    if args.section in ("ct", "all"):
        ct = Path(__file__).resolve().parent / "ct.py"
        if ct.exists():
            import ct as ct_bench  # noqa: E402

            # ct.py's own options, not this script's (--section, --repeat): only the threads
            ct_bench.main([] if args.threads is None else ["--threads", str(args.threads)])
        else:
            print("\n(CT section: benchmarks/ct.py not present)")


if __name__ == "__main__":
    main()
