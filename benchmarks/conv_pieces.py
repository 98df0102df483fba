"""A backbone pass whole, with its 3D convolutions in pieces, and rolled along D (issue 17.2).

``recon3d reconstruct --model`` runs the backbone on CPU rolled along D
(``pipeline/models/rolling.py``: a few slices per layer at a time) with the convolutions left
whole in pieces (``pipeline/reconstruct/pieces.py``: the convolution library's workspace one
piece's instead of ~100 B per voxel). This prints, for U-Nets and inputs of the reconstruct
benchmarks, the time of one inference pass (median of ``--repeat``) and the RSS high-water
above the resident size before it, whole, in pieces and rolled (as reconstruct runs it), in
the same process and the same round, with the dispatcher's count of the tensors the whole and
the rolled pass allocate (the estimate's activation term) and the largest difference of the
outputs from the whole pass's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_pieces.py --threads 1,2

Memory does not depend on the machine's load; times do (both columns run alternately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.allocator import return_freed_memory_to_os  # noqa: E402
from pipeline.models import UNet3D  # noqa: E402
from pipeline.models.rolling import CHUNK_VOXELS, rolling  # noqa: E402
from pipeline.reconstruct.memory import _LiveBytes  # noqa: E402
from pipeline.reconstruct.pieces import PIECE_VOXELS, pieces_for  # noqa: E402

from _common import machine_line, peak_memory_bytes  # noqa: E402

CASES = {  # name: (channels, input D, H = W, widths)
    "mri-256": (2, 59, 256, (4, 8)),
    "ct-128": (1, 243, 128, (4, 8)),
    "mri-256-wide": (2, 40, 256, (16, 32)),
    "mri-256-recipe": (2, 96, 256, (16, 32)),
}
MODES = ("whole", "pieces", "rolled")


def _pass(net: torch.nn.Module, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, float, float]:
    """(output, seconds, MiB of RSS high-water above the resident size before)."""

    def run() -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        if mode == "whole":
            y = net(x)
        else:
            with pieces_for("cpu"):  # pieces, their buffers from the heap
                if mode == "rolled":  # as reconstruct runs it
                    with rolling():
                        y = net(x)
                else:
                    y = net(x)
        return y, time.perf_counter() - t

    peak, (y, seconds) = peak_memory_bytes(run)
    return y, seconds, peak / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per column (median; default 3)")
    ap.add_argument("--quick", action="store_true", help="small inputs (for the test)")
    args = ap.parse_args()
    return_freed_memory_to_os()  # reconstruct's default allocator (--memory lean)
    print(machine_line(), f"torch threads {args.threads}")
    print(f"pieces of {PIECE_VOXELS} output voxels, rolled in chunks of {CHUNK_VOXELS} input voxels; RSS "
          "high-water above the resident size before each pass\n")
    print("| case (C×D×H×W, U-Net) | threads | load | whole s | pieces s | rolled s | pieces / whole | "
          "**rolled / whole** | whole MiB | pieces MiB | **rolled MiB** | counted MiB whole / rolled | "
          "max abs diff pieces / rolled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        c, d, hw, widths = CASES[name]
        if args.quick:
            d, hw = 12, 48
        torch.manual_seed(0)
        net = UNet3D(c, c, widths=list(widths)).eval()
        x = torch.randn(1, c, d, hw, hw)
        with torch.no_grad():
            with _LiveBytes() as live:
                net(x[:, :, :4, :16, :16])
            counted = {}
            for mode in ("whole", "rolled"):
                with _LiveBytes() as live:
                    if mode == "rolled":
                        with rolling():
                            y = net(x)
                    else:
                        y = net(x)
                counted[mode] = live.peak / 2**20
                del y
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                times: dict[str, list[float]] = {m: [] for m in MODES}
                mem: dict[str, list[float]] = {m: [] for m in MODES}
                outs: dict[str, torch.Tensor] = {}
                for _ in range(max(1, args.repeat)):
                    for mode in MODES:
                        y, sec, mib = _pass(net, x, mode)
                        times[mode].append(sec)
                        mem[mode].append(mib)
                        outs[mode] = y
                        del y
                diff = [(outs[m] - outs["whole"]).abs().max().item() for m in ("pieces", "rolled")]
                del outs
                t = {m: statistics.median(times[m]) for m in MODES}
                print(f"| {name} ({c}×{d}×{hw}×{hw}, {list(widths)}) | {threads} | {os.getloadavg()[0]:.1f} | "
                      f"{t['whole']:.2f} | {t['pieces']:.2f} | {t['rolled']:.2f} | {t['pieces'] / t['whole']:.2f} | "
                      f"**{t['rolled'] / t['whole']:.2f}** | {max(mem['whole']):.0f} | {max(mem['pieces']):.0f} | "
                      f"**{max(mem['rolled']):.0f}** | {counted['whole']:.0f} / {counted['rolled']:.0f} | "
                      f"{diff[0]:.1e} / {diff[1]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
