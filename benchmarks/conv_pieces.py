"""A backbone pass with its 3D convolutions whole against in pieces (issue 17.2).

``recon3d reconstruct --model`` runs the backbone's convolutions in pieces on CPU
(``pipeline/reconstruct/pieces.py``), so the convolution library's workspace is one piece's
instead of ~100 B per voxel. This prints, for U-Nets and inputs of the reconstruct benchmarks,
the time of one inference pass (median of ``--repeat``) and the RSS high-water above the
resident size before it, whole and in pieces, in the same process and the same round, with the
dispatcher's count of the tensors the pass allocates (the estimate's activation term) and the
largest difference of the outputs.

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
from pipeline.reconstruct.memory import _LiveBytes, piece_workspace  # noqa: E402
from pipeline.reconstruct.pieces import PIECE_VOXELS, pieces_for  # noqa: E402

from _common import machine_line, peak_memory_bytes  # noqa: E402

CASES = {  # name: (channels, input D, H = W, widths)
    "mri-256": (2, 59, 256, (4, 8)),
    "ct-128": (1, 243, 128, (4, 8)),
    "mri-256-wide": (2, 40, 256, (16, 32)),
}


def _pass(net: torch.nn.Module, x: torch.Tensor, pieces: bool) -> tuple[torch.Tensor, float, float]:
    """(output, seconds, MiB of RSS high-water above the resident size before)."""

    def run() -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        if pieces:
            with pieces_for("cpu"):  # as reconstruct runs it: pieces, their buffers from the heap
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
    print(f"pieces of {PIECE_VOXELS} output voxels; RSS high-water above the resident size before each pass\n")
    print("| case (C×D×H×W, U-Net) | threads | load | whole s | pieces s | **pieces / whole** | whole MiB | "
          "pieces MiB | counted MiB | pieces − counted MiB (estimate's workspace) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
            with _LiveBytes() as live:
                y = net(x)
            counted = live.peak / 2**20
            del y
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                times: dict[bool, list[float]] = {False: [], True: []}
                mem: dict[bool, list[float]] = {False: [], True: []}
                outs: dict[bool, torch.Tensor] = {}
                for _ in range(max(1, args.repeat)):
                    for pieces in (False, True):
                        y, s, mib = _pass(net, x, pieces)
                        times[pieces].append(s)
                        mem[pieces].append(mib)
                        outs[pieces] = y
                        del y
                diff = (outs[True] - outs[False]).abs().max().item()
                del outs
                whole, piece = statistics.median(times[False]), statistics.median(times[True])
                print(f"| {name} ({c}×{d}×{hw}×{hw}, {list(widths)}) | {threads} | {os.getloadavg()[0]:.1f} | "
                      f"{whole:.2f} | {piece:.2f} | **{piece / whole:.2f}** | {max(mem[False]):.0f} | "
                      f"{max(mem[True]):.0f} | {counted:.0f} | {max(mem[True]) - counted:.0f} "
                      f"({piece_workspace(widths[0]) / 2**20:.0f}) | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
