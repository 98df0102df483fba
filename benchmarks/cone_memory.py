"""Peak memory and time of cone-beam ``recon3d simulate ct --geometry cone`` (and of its FDK
preprocessing) as the volume grows with the slab size fixed: the memory must follow the slab
and the block of detector rows, not the volume (issue 4).

    .venv/bin/python benchmarks/cone_memory.py [--sizes 256 512] [--angles 24]
        [--slab-mib 32 [128 ...]] [--rows-mib 32] [--whole] [--fdk] [--workers 1]
        [--threads 2] [--scratch DIR]

Each case runs ``pipeline.cli.main(["simulate", "ct", "--geometry", "cone", ...])`` (then
``["preprocess", SCAN, "--outputs", "fbp"]`` with ``--fdk``) in a fresh subprocess with
``pipeline.data.cone.SLAB_BYTES`` / ``ROW_BLOCK_BYTES`` set to ``--slab-mib`` / ``--rows-mib``
and ``MALLOC_MMAP_THRESHOLD_=131072`` (freed memory goes back to the kernel, so RSS follows the
live tensors). Peak memory is the child's ``VmHWM`` (reset through ``/proc/self/clear_refs``
after the imports and a tiny warm-up job) minus its ``VmRSS`` at that point: what the job
added above the idle process. Time: wall seconds and the child's CPU seconds (user + system,
all threads), the latter less sensitive to other load on a shared machine. ``--whole`` adds,
for every size, the same job with one slab and one row block as large as the volume and the
detector (the whole-volume computation the jobs did before), as a reference measured in the
same run, and each slab size's CPU seconds against it ("CPU / whole"; target 1.2 for issue
17.4). The figures of issue 4 came from
``--sizes 256 512 --angles 24 --slab-mib 32 --rows-mib 32 --whole --fdk`` (about 45 min on
2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import status_kib  # noqa: E402

MIB = 1 << 20


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(args.threads))
    import pipeline.data.cone as cone
    from pipeline.cli import main

    cone.SLAB_BYTES = int(args.slab_mib[0] * MIB)
    cone.ROW_BLOCK_BYTES = int(args.rows_mib * MIB)
    scan = str(Path(args.scratch) / f"cone{args.size}_{args.tag}.zarr")
    n = str(args.size)
    job = ["simulate", "ct", "--geometry", "cone", "--shape", n, n, n, "--angles",
           str(args.angles), "--noise-sigma", "0.01", "--out", scan, "--workers",
           str(args.workers), "--no-progress", "--overwrite"]
    # A tiny job first, so that lazy imports, thread pools and caches are in the baseline.
    warm = str(Path(args.scratch) / f"warm_{args.tag}.zarr")
    main(["simulate", "ct", "--geometry", "cone", "--shape", "6", "8", "8", "--angles", "4",
          "--out", warm, "--workers", str(args.workers), "--no-progress", "--overwrite"])
    main(["preprocess", warm, "--outputs", "fbp", "--workers", str(args.workers), "--no-progress"])
    shutil.rmtree(warm, ignore_errors=True)
    result = {}
    for phase, argv in (("simulate", job), ("fdk", ["preprocess", scan, "--outputs", "fbp",
                                                     "--workers", str(args.workers),
                                                     "--no-progress"])):
        if phase == "fdk" and not args.fdk:
            continue
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = status_kib("VmRSS")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        code = main(argv)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        if code:
            raise SystemExit(f"{phase} failed with exit code {code}")
        peak = status_kib("VmHWM")
        result[phase] = {"seconds": seconds, "cpu": cpu, "peak": (peak - base) * 1024,
                         "base": base * 1024}
    from pipeline.data import open_scan

    meta = open_scan(scan).metadata
    result["det_shape"] = list(meta.geometry.det_shape)
    print(json.dumps(result), flush=True)


def _run(args: argparse.Namespace, size: int, tag: str, slab_mib: float, rows_mib: float) -> dict:
    # OMP_NUM_THREADS: the CLI picks its own threads otherwise (pipeline.threads), overriding
    # a torch.set_num_threads of the child.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--tag", tag,
           "--angles", str(args.angles), "--slab-mib", str(slab_mib), "--rows-mib", str(rows_mib),
           "--workers", str(args.workers), "--threads", str(args.threads),
           "--scratch", str(args.scratch)] + (["--fdk"] if args.fdk else [])
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--angles", type=int, default=24)
    parser.add_argument("--slab-mib", type=float, nargs="+", default=[32.0],
                        help="one case per slab size (MiB); the row block stays --rows-mib")
    parser.add_argument("--rows-mib", type=float, default=32.0)
    parser.add_argument("--whole", action="store_true", help="also the whole-volume reference")
    parser.add_argument("--fdk", action="store_true",
                        help="also `recon3d preprocess --outputs fbp`")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/recon3d-bench-cone"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="pieces", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import torch
    from _common import machine_line, print_table

    torch.set_num_threads(args.threads)  # as the children: the machine line reports it
    args.scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            cases = [(f"pieces{slab:g}", slab, args.rows_mib) for slab in args.slab_mib]
            if args.whole:  # first: the pieces' CPU time is given against it
                cases.insert(0, ("whole", 1 << 20, 1 << 20))
            whole_cpu = {}
            for tag, slab, block in cases:
                res = _run(args, size, tag, slab, block)
                vol = size**3 * 4
                v, u = res["det_shape"]
                sino = v * args.angles * u * 4
                label = "whole volume" if tag == "whole" else f"{slab:g} / {block:g} MiB"
                for phase in ("simulate", "fdk"):
                    if phase not in res:
                        continue
                    r = res[phase]
                    if tag == "whole":
                        whole_cpu[phase] = r["cpu"]
                    ratio = f"{r['cpu'] / whole_cpu[phase]:.2f}" if phase in whole_cpu else "-"
                    rows.append([f"{phase} {size}³, A={args.angles}, (V, U)=({v}, {u})", label,
                                 f"{vol / MIB:.1f}", f"{sino / MIB:.1f}", f"{r['seconds']:.1f}",
                                 f"{r['cpu']:.1f}", ratio,
                                 f"{r['peak'] / MIB:.0f}", f"**{r['peak'] / vol:.2f}**"])
                shutil.rmtree(args.scratch / f"cone{size}_{tag}.zarr", ignore_errors=True)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    print_table(
        f"Cone beam, peak memory above the idle process (VmHWM − VmRSS), workers={args.workers}",
        ["job", "slab / row block", "volume MiB", "sinogram MiB", "wall s", "CPU s",
         "CPU / whole", "peak MiB",
         "peak / volume"], rows)
    print(f"\n{machine_line()}")


if __name__ == "__main__":
    main()
