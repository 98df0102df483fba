"""Reconstruction benchmark (issue 7): throughput and peak memory of ``recon3d reconstruct``.

    .venv/bin/python benchmarks/reconstruct.py [--scratch DIR] [--depth 512] [--keep]
        [--cases read,adjoint,model] [--workers 1] [--slab 8] [--memory-budget 1GiB] [--tile D,H,W|none]
        [--widths 4,8]

On a simulated 3D MRI scan of 8 coils × D × 256 × 256 (D = 512: 4.25 GiB of measurements, coil
maps and reference; made here, untimed, when missing), each case runs in a fresh subprocess:

* **read** — the reference: zarr reads and decodes every chunk of the arrays a reconstruction
  needs (measurements and coil maps), one after another in one process, nothing else. It runs
  before and after the reconstructions; ratios are against the mean of the two, so load that
  changes during the run biases neither side.
* **adjoint** — ``reconstruct(method="adjoint")`` (zero-filled ``Aᴴy`` per slab, slab = one
  output chunk of 16 slices, no halo), magnitude + complex arrays, pyramid of 3 levels.
* **model** — ``reconstruct(model=...)`` with a small untrained network (a 2-level U-Net of
  widths 4, 8, or ``--widths``, on an ``Aᴴy`` initial estimate, receptive radius 9: halo 9, slabs of ``--slab``
  slices, 8 by default, so every slab reads 26–27), backbone tiles of :data:`TILE` (``--tile
  none``: untiled, as ``recon3d reconstruct`` runs a model trained on tiles), under the
  scan's intensity scale. ``--slab 0``: the slab ``--memory-budget`` chooses (the default of
  ``recon3d reconstruct``); the table then also gives the chosen slab, the halo overhead (input
  slices computed / output slices) and the estimated peak next to the measured one, the whole
  process's max RSS, which is what the estimate stands for (``pipeline/reconstruct/memory.py``).

Throughput is output voxels (D·H·W) per second of the whole job (reads, compute, writes,
completion records, pyramid). Peak memory is the PSS of the process (and any children), sampled
every 0.2 s: above the idle footprint after imports (as ``benchmarks/data.py``) and in total,
both relative to the scan size (target ≤ 1/8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, run_monitored_child, scan_bytes  # noqa: E402

#: Backbone tiles of the model case: 2×2 in-plane tiles, exact (overlap 2 × radius).
TILE = (32, 144, 144)
GIB = 1 << 30
MIB = 1 << 20


def _scan(scratch: Path, depth: int) -> str:
    """The simulated MRI scan (made when missing, untimed)."""
    from pipeline.data import SimulateMRIConfig, simulate_mri

    path = scratch / "mri.zarr"
    if not (path / "zarr.json").exists():
        t0 = time.perf_counter()
        simulate_mri(SimulateMRIConfig(out=str(path), shape=(depth, 256, 256), coils=8, acceleration=4.0,
                                       calibration=24, noise_sigma=0.05, seed=0, workers=2, progress=False))
        print(f"(simulated the {depth}×256×256 8-coil MRI scan in {time.perf_counter() - t0:.0f} s)")
    return str(path)


def _weights(scratch: Path, widths: tuple[int, ...] = (4, 8)) -> str:
    """An untrained U-Net (widths 4, 8 by default) as an export file: speed does not depend on training."""
    import torch

    from pipeline.train.build import ScanFacts, build_model
    from pipeline.losses.registry import MCTerm
    from pipeline.train.config import LossConfig, ModelConfig
    from pipeline.train.export import EXPORT_FORMAT

    path = scratch / ("unet.pt" if tuple(widths) == (4, 8) else f"unet_{'_'.join(map(str, widths))}.pt")
    if not path.exists():
        cfg = ModelConfig(widths=list(widths))
        torch.manual_seed(0)
        net = build_model(cfg, ScanFacts("mri", "cartesian", None, 2))
        torch.save({"format": EXPORT_FORMAT, "state_dict": net.state_dict(), "model_config": cfg.model_dump(mode="json"),
                    "loss_config": LossConfig(terms=[MCTerm(name="mc")]).model_dump(mode="json"),
                    "modality": "mri", "channels": 2, "step": 0, "source": "benchmarks/reconstruct.py"}, path)
    return str(path)


def _slab_text(memory: dict | None) -> str:
    """The model case's slab, its overhead and estimated peak (from the output's attributes)."""
    if not memory:
        return "slab ?"
    return (f"slab {memory['slab']} from {memory['slab_from']}, {memory['overhead']:.2f}x slices computed, "
            f"estimated peak {memory['estimated_peak'] / MIB:.0f} MiB")


# ----------------------------------------------------------------------------- children
def _child(case: str, scan: str, scratch: Path, workers: int, slab: int, budget: str,
           tile: tuple[int, int, int] | None, widths: tuple[int, ...]) -> None:
    """Runs in a fresh process; prints READY after imports, then one JSON line of results."""
    import numpy as np
    import torch

    from pipeline.data import open_scan
    from pipeline.reconstruct import ReconstructConfig, reconstruct
    from pipeline.allocator import return_freed_memory_to_os

    torch.set_num_threads(2)
    if not os.environ.get("RECON3D_BENCH_GLIBC_DEFAULT"):
        # As the CLI does; RECON3D_BENCH_MMAP_THRESHOLD (bytes) tries another threshold.
        return_freed_memory_to_os(int(os.environ.get("RECON3D_BENCH_MMAP_THRESHOLD", 1 << 20)))
    import resource

    print("READY", flush=True)
    sys.stdin.readline()  # the parent has taken the baseline
    idle_rss = _rss()
    t0 = time.perf_counter()
    result: dict = {}
    if case.startswith("read"):
        s = open_scan(scan)
        total = 0
        for name in ("measurements", "coil_maps"):
            arr = s.group[name]
            cd = arr.chunks[1]
            for d0 in range(0, arr.shape[1], cd):
                total += np.asarray(arr[:, d0 : d0 + cd]).nbytes
        result["bytes"] = total
    else:
        out = scratch / f"{case}.ome.zarr"
        shutil.rmtree(out, ignore_errors=True)
        if case == "adjoint":
            config = ReconstructConfig(scan=scan, out=str(out), method="adjoint", pyramid=3, workers=workers,
                                       progress=False)
        else:
            config = ReconstructConfig(scan=scan, out=str(out), model=_weights(scratch, widths), chunks=(8, 256, 256),
                                       slab=slab or None, memory_budget=budget, tile=tile, workers=workers,
                                       progress=False)
        res = reconstruct(config)
        assert res.complete, res
        if case == "model":
            import zarr

            result["memory"] = dict(zarr.open_group(str(out), mode="r").attrs.get("recon3d", {})).get("memory")
        shutil.rmtree(out, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    # The exact high-water mark (the PSS samples can miss a short peak), above the idle RSS.
    result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["maxrss_above"] = result["maxrss"] - idle_rss
    print(json.dumps(result), flush=True)


def _rss() -> int:
    """This process's resident set size (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run_child(case: str, scan: str, scratch: Path, workers: int, slab: int, budget: str, tile: str,
               widths: str) -> dict:
    result, monitor = run_monitored_child(
        [sys.executable, __file__, "--child", case, "--scratch", str(scratch), "--scan", scan,
         "--workers", str(workers), "--slab", str(slab), "--memory-budget", budget, "--tile", tile,
         "--widths", widths], case)
    result.update(peak=monitor.peak, idle=monitor.baseline, above=monitor.peak_above_baseline)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/recon3d-bench-reconstruct"))
    parser.add_argument("--depth", type=int, default=512, help="D of the simulated MRI scan (512: 4.25 GiB)")
    parser.add_argument("--cases", default="read,adjoint,model", help="comma-separated: read, adjoint, model")
    parser.add_argument("--workers", type=int, default=1, help="slabs at once (default: 1)")
    parser.add_argument("--slab", type=int, default=8,
                        help="output slab of the model case, a multiple of 8 (default: 8; input: slab + 2 x 9); "
                        "0: chosen from --memory-budget")
    parser.add_argument("--memory-budget", default="1GiB", help="with --slab 0 (default: 1GiB)")
    parser.add_argument("--tile", default=",".join(map(str, TILE)),
                        help="backbone tiles of the model case, D,H,W (default: %(default)s); none: untiled")
    parser.add_argument("--widths", default="4,8", help="the model case's U-Net widths (default 4,8; the recipes': 16,32)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch scan")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scan", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tile = None if args.tile == "none" else tuple(int(t) for t in args.tile.split(","))
    widths = tuple(int(w) for w in args.widths.split(","))
    if tile is not None and len(tile) != 3:
        parser.error(f"--tile is D,H,W or none, got {args.tile!r}")
    if args.child:
        _child(args.child, args.scan, args.scratch, args.workers, args.slab, args.memory_budget, tile, widths)
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.scratch).free
    if free < 8 * GIB:
        raise SystemExit(f"benchmarks/reconstruct.py: needs ~6 GiB free in {args.scratch}, has {free / GIB:.1f}")
    print(machine_line(), f" load {os.getloadavg()[0]:.1f}")
    try:
        scan = _scan(args.scratch, args.depth)
        size = scan_bytes(scan)
        voxels = args.depth * 256 * 256
        cases = [c for c in args.cases.split(",") if c]
        results = {}
        order = (["read-before"] if "read" in cases else []) + [c for c in cases if c != "read"] + \
            (["read-after"] if "read" in cases else [])
        for case in order:
            load = os.getloadavg()[0]
            results[case] = _run_child(case, scan, args.scratch, args.workers, args.slab, args.memory_budget,
                                       args.tile, args.widths)
            results[case]["load"] = f"{load:.1f} → {os.getloadavg()[0]:.1f}"
        read_s = [results[c]["seconds"] for c in ("read-before", "read-after") if c in results]
        ref_rate = voxels / (sum(read_s) / len(read_s)) if read_s else None
        rows = []
        for case, r in results.items():
            rate = voxels / r["seconds"]
            label = {"read-before": "zarr read + decode (measurements, coil maps), before",
                     "read-after": "zarr read + decode, after",
                     "adjoint": f"reconstruct --method adjoint --pyramid 3, workers {args.workers}",
                     "model": f"reconstruct --model (U-Net {args.widths}; halo 9; "
                              f"{'untiled' if tile is None else 'tiles ' + 'x'.join(map(str, tile))}; "
                              f"{_slab_text(r.get('memory'))}), workers {args.workers}"}[case]
            rows.append([label, r["load"], f"{r['seconds']:.1f}", f"{rate / 1e6:.2f}",
                         f"{rate / ref_rate:.2f}" if ref_rate else "-", f"{r['above'] / MIB:.0f}",
                         f"{r['maxrss_above'] / MIB:.0f}", f"{r['maxrss'] / MIB:.0f}",
                         f"**{r['above'] / size:.3f}**", f"{r['peak'] / MIB:.0f}", f"{r['peak'] / size:.3f}"])
        print_table(f"Reconstruction of a {size / GIB:.2f} GiB MRI scan ({args.depth}×256×256, 8 coils); "
                    "peak PSS relative to the scan (target ≤ 0.125)",
                    ["job", "load avg", "s", "Mvoxel/s", "vs read", "peak MiB above idle", "max RSS MiB above idle",
                     "max RSS MiB (the estimate's)",
                     "above idle / scan",
                     "peak MiB total", "total / scan"], rows)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
