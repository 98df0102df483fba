"""Peak memory and time of one training step (forward + backward + Adam) of the self-supervised
losses with a 3D U-Net, plain, checkpointed per U-Net level (``checkpoint="level"``), the whole
network checkpointed around level checkpoints (``checkpoint="network"``), and tiled with
checkpointing per tile; figures for BENCHMARKS.md (issue 5).

    .venv/bin/python benchmarks/memory.py [--section ei|scaling|splitting|absolute|all]
                                           [--repeat N] [--threads T] [--device cpu|cuda]

Peak memory: each case runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=131072``
(freed heap goes back to the kernel, so RSS follows live tensors). The peak is
``VmHWM − VmRSS`` around one step (``/proc/self/clear_refs`` resets the high-water mark), after
a first step that creates Adam's state: it is what the step adds above the process's baseline,
which already holds the slab (``y``), the operator (coil maps, angles), the model and the
optimizer. With ``--device cuda`` it is ``torch.cuda.max_memory_allocated`` above the
allocated memory before the step.

Time: that allocator setting makes every large allocation page-fault afresh, which penalises
code that allocates per tile (a tiled 64×192×192 EI step took 25.5 s with it and 15.4 s
without, here). Where a section has a time target (``ei``, ``absolute``), the time comes from
a second subprocess with the allocator as ``recon3d train`` sets it
(``pipeline.allocator.keep_freed_memory``): the median of ``--repeat`` steps after the first
(at least 3 in ``ei``). Elsewhere the time of the memory run is shown,
for indication only.

Sections:

* ``ei`` — MC + EI (90° in-plane rotations) on an 8×256×256 CT slab (parallel beam, 90 angles,
  FBP initial estimate) and an 8×256×256 MRI slab (8 coils, 4× Poisson disc, Aᴴy initial
  estimate), ``UNet3D(widths=[16, 32])`` four ways (plain, level, network, tiled).
* ``scaling`` — the same EI step as the in-plane size grows 128 → 256 → 512 (fixed tile):
  bytes per slab voxel, plain and tiled.
* ``splitting`` — SSDU (MRI) and Noise2Inverse (CT, K = 4) steps, plain and tiled, 128 → 512.
* ``absolute`` — MC + EI with Adam, 2-level ``UNet3D`` widths [16, 32], 64×192×192 slab of
  8-coil MRI: the issue's absolute target (≤ 620 MB above baseline, ≤ 1.5× the plain time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_line, peak_memory_bytes, print_table  # noqa: E402

MiB = 2**20


# ----------------------------------------------------------------------------- one case
def _problem(modality: str, depth: int, size: int, *, coils: int = 8, angles: int = 90):
    """(op, y, channels, initial) of a simulated slab."""
    from operators3d import (
        GaussianNoise,
        MultiCoilMRI,
        poisson_disc_mask,
        shepp_logan_3d,
        simulate_coil_maps,
    )

    gen = torch.Generator().manual_seed(0)
    shape = (depth, size, size)
    x = shepp_logan_3d(shape)
    if modality == "mri":
        maps = simulate_coil_maps(coils, shape)
        mask = poisson_disc_mask((size, size), 4, calibration=max(8, size // 10), generator=gen)
        op = MultiCoilMRI(mask=mask, coil_maps=maps)
        clean = op(x.to(torch.complex64))
        sigma = 0.01 * float(clean.abs().max())
        y = GaussianNoise(sigma).sample(clean, generator=gen, mask=mask)
        return op, y.unsqueeze(0), 2, "adjoint"
    from operators3d.ct import ParallelBeamCT

    theta = torch.arange(angles, dtype=torch.float64) * (math.pi / angles)
    op = ParallelBeamCT(volume_shape=shape, angles=theta)
    clean = op(x.float())
    y = GaussianNoise(0.01 * float(clean.abs().max())).sample(clean, generator=gen)
    return op, y.unsqueeze(0), 1, "fbp"


def _loss(name: str):
    from operators3d import Rotate90
    from pipeline.losses import Noise2InverseLoss, SSDULoss, equivariant_imaging

    if name == "ei":
        return equivariant_imaging(transform=Rotate90, seed=0)
    if name == "ssdu":
        return SSDULoss(seed=0)
    if name == "n2i":
        return Noise2InverseLoss(4, seed=0)
    raise ValueError(f"unknown loss {name!r}")


def run_case(spec: dict) -> dict:
    """Build the slab, model and loss of ``spec`` and measure one training step."""
    from pipeline.models import ArtifactRemoval, TiledBackbone, UNet3D

    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    op, y, channels, initial = _problem(spec["modality"], spec["depth"], spec["size"])
    op, y = op.to(device), y.to(device)
    mode = spec["mode"]
    unet = UNet3D(channels, channels, widths=spec.get("widths", [16, 32]),
                  checkpoint=mode if mode in ("level", "network") else "none")
    backbone = unet
    if mode == "tiled":
        backbone = TiledBackbone(unet, tile_shape=spec["tile"], overlap=spec["overlap"],
                                 margin=spec.get("margin"), tiles_per_batch=spec.get("tpb", 1))
    model = ArtifactRemoval(backbone, initial=initial).to(device)
    loss = _loss(spec["loss"])
    model = loss.adapt_model(model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x_hat = model(y, op)
        out = loss(x_hat, y, op, model)
        out.total.backward()
        optimizer.step()
        return float(out.total.detach())

    t0 = time.perf_counter()
    step()  # creates Adam's state and warms up kernels
    first = time.perf_counter() - t0
    peaks, times = [], []
    for _ in range(spec.get("repeat", 1)):
        t0 = time.perf_counter()
        peak, _ = peak_memory_bytes(step)
        times.append(time.perf_counter() - t0)
        peaks.append(peak)
    peak = max(peaks)
    voxels = spec["depth"] * spec["size"] ** 2
    slab = y.nbytes + voxels * (8 if spec["modality"] == "mri" else 4)
    result = {
        "peak": peak,
        "time": statistics.median(times),
        "first": first,
        "voxels": voxels,
        "slab_bytes": slab,
        "y_bytes": y.nbytes,
    }
    if mode == "tiled":
        result["recompute"] = backbone.recompute_factor((spec["depth"], spec["size"], spec["size"]))
        result["exact"] = backbone.exact
    return result


DEVICE = "cpu"


def _subprocess(spec: dict, threads: int, *, fixed_mmap: bool) -> dict:
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(spec), "--threads", str(threads)],
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spec: dict, threads: int, *, timed: bool = False) -> dict:
    """``run_case`` in fresh subprocesses (so no freed heap of earlier cases counts).

    The peak comes from a process with ``MALLOC_MMAP_THRESHOLD_`` fixed (freed memory goes
    back to the kernel, so RSS follows live tensors). That setting also makes every large
    allocation page-fault afresh, which penalises code that allocates per tile; with
    ``timed``, the time comes from a second process with the allocator set as ``recon3d
    train`` sets it (:func:`pipeline.allocator.keep_freed_memory`: freed blocks stay in the
    heap), the median of ``spec["repeat"]`` steps; ``RECON3D_MALLOC=default`` times glibc's
    default instead.
    """
    spec = {"device": DEVICE, **spec}
    if spec["device"] != "cpu":  # torch's own allocator statistics: one run gives both
        return _subprocess(spec, threads, fixed_mmap=False)
    memory = _subprocess({**spec, "repeat": 1}, threads, fixed_mmap=True)
    if not timed:
        return memory
    timing = _subprocess({**spec, "train_allocator": True}, threads, fixed_mmap=False)
    return {**memory, "time": timing["time"]}


# ----------------------------------------------------------------------------- sections
# One (clipped) tile on 128², 1 × 2 tiles on 256² (recompute 1.06), 2 × 4 on 512² (1.10).
# (Thin tiles of 8×136×136 ran at half the speed per voxel on CPU with batch 1: oneDNN's
# batch-1 kernels are slow on small spatial shapes; tiles_per_batch=2 recovers most of it.)
TILE_2D = {"tile": [8, 264, 136], "overlap": [0, 8, 8]}


def _label(spec: dict) -> str:
    if spec["mode"] != "tiled":
        return spec["mode"]
    t, o = spec["tile"], spec["overlap"]
    return f"tiled {t[0]}×{t[1]}×{t[2]}, overlap {o[1]}"


def section_ei(threads: int, repeat: int) -> None:
    rows = []
    for modality in ("ct", "mri"):
        base = {"modality": modality, "depth": 8, "size": 256, "loss": "ei", "repeat": repeat}
        plain = measure({**base, "mode": "plain"}, threads, timed=True)
        for mode in ("plain", "level", "network", "tiled"):
            spec = {**base, "mode": mode, **(TILE_2D if mode == "tiled" else {})}
            r = plain if mode == "plain" else measure(spec, threads, timed=True)
            factor = r.get("recompute", 1.0)
            rows.append([
                modality.upper(), _label(spec), f"{r['peak'] / MiB:.0f}",
                f"{plain['peak'] / r['peak']:.2f}", f"{r['time']:.2f}",
                f"{r['time'] / plain['time']:.2f}", f"{factor:.2f}",
                f"{r['time'] / (plain['time'] * factor):.2f}" if mode == "tiled" else "",
            ])
            print(rows[-1], flush=True)
    print_table(
        "EI step (MC + EI, Rotate90, Adam), 8×256×256 slab, UNet3D [16, 32]: peak above baseline",
        ["slab", "mode", "peak MiB", "plain/peak (≥3)", "time s", "time/plain (≤1.4)",
         "recompute", "time/(plain×recompute) (≤1.1)"],
        rows,
    )


def _scaling(loss: str, modality: str, threads: int, repeat: int, sizes=(128, 256, 512)):
    rows = []
    per_voxel = {}
    for mode in ("plain", "tiled"):
        for size in sizes:
            spec = {"modality": modality, "depth": 8, "size": size, "loss": loss, "mode": mode,
                    "repeat": repeat, **(TILE_2D if mode == "tiled" else {})}
            r = measure(spec, threads)
            bpv = r["peak"] / r["voxels"]
            per_voxel[(mode, size)] = bpv
            rows.append([
                f"{loss.upper()} {modality.upper()}", _label(spec), f"8×{size}×{size}",
                f"{r['slab_bytes'] / MiB:.0f}", f"{r['peak'] / MiB:.0f}", f"{bpv:.0f}",
                f"{bpv / per_voxel[(mode, sizes[0])]:.2f}", f"{r['time']:.2f}",
                f"{r.get('recompute', 1.0):.2f}",
            ])
            print(rows[-1], flush=True)
    return rows


def section_scaling(threads: int, repeat: int) -> None:
    rows = _scaling("ei", "ct", threads, repeat) + _scaling("ei", "mri", threads, repeat)
    print_table(
        "EI step peak as the in-plane size grows (tile fixed): bytes per slab voxel",
        ["loss", "mode", "slab", "slab MiB (y + image)", "peak MiB", "B/voxel",
         "vs 128² (tiled ≤ 1.2)", "time s (fixed-mmap run)", "recompute"],
        rows,
    )


def section_splitting(threads: int, repeat: int) -> None:
    rows = _scaling("ssdu", "mri", threads, repeat) + _scaling("n2i", "ct", threads, repeat)
    print_table(
        "SSDU (MRI) and Noise2Inverse (CT, K = 4) steps as the in-plane size grows",
        ["loss", "mode", "slab", "slab MiB (y + image)", "peak MiB", "B/voxel",
         "vs 128² (tiled ≤ 1.2)", "time s (fixed-mmap run)", "recompute"],
        rows,
    )


# tile_shape_for((64, 192, 192), (2, 2, 2), (4, 4, 4), 2) and (1, 2, 2) with overlap 8.
ABSOLUTE_TILES = [
    {"tile": [34, 98, 98], "overlap": [4, 4, 4]},
    {"tile": [64, 100, 100], "overlap": [0, 8, 8]},
]


def section_absolute(threads: int, repeat: int) -> None:
    base = {"modality": "mri", "depth": 64, "size": 192, "loss": "ei", "repeat": repeat,
            "widths": [16, 32]}
    rows = []
    specs = [{**base, "mode": "plain"}, {**base, "mode": "level"}, {**base, "mode": "network"}]
    specs += [{**base, "mode": "tiled", **tile} for tile in ABSOLUTE_TILES]
    plain = None
    for spec in specs:
        r = measure(spec, threads, timed=True)
        plain = plain or r
        rows.append([
            _label(spec), f"{r['peak'] / 1e6:.0f}", f"{r['peak'] / r['voxels']:.0f}",
            f"{r['time']:.1f}", f"{r['time'] / plain['time']:.2f}",
            f"{r.get('recompute', 1.0):.2f}",
        ])
        print(rows[-1], flush=True)
    print_table(
        "Absolute: MC + EI (Rotate90) + Adam, UNet3D [16, 32], 64×192×192 MRI slab, 8 coils",
        ["mode", "peak MB above baseline (≤ 620)", "B/voxel", "time s", "time/plain (≤ 1.5)",
         "recompute"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("ei", "scaling", "splitting", "absolute", "all"),
                        default="all")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu",
                        help="cpu (peak RSS) or cuda (peak allocated by torch)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    if args.case:
        case = json.loads(args.case)
        if case.pop("train_allocator", False):
            from pipeline.allocator import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(run_case(case)))
        return
    where = machine_line() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"# benchmarks/memory.py — {where}, device {args.device}")
    if args.section in ("ei", "all"):
        section_ei(args.threads, max(args.repeat, 3))
    if args.section in ("scaling", "all"):
        section_scaling(args.threads, args.repeat)
    if args.section in ("splitting", "all"):
        section_splitting(args.threads, args.repeat)
    if args.section in ("absolute", "all"):
        section_absolute(args.threads, args.repeat)


if __name__ == "__main__":
    main()
