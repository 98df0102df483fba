"""Training throughput, data wait, checkpoint save/load and SIGTERM-to-exit times of
``recon3d train`` with 1 and 2 processes; figures for BENCHMARKS.md (issue 6).

    .venv/bin/python benchmarks/train.py [--steps 30] [--shape 32 128 128] [--coils 8]
                                         [--slab 8] [--widths 16 32] [--workers 2]

It simulates an MRI scan (8 coils, 4× Poisson disc), trains MC + EI (90° rotations) with a
``UNet3D`` on ``--slab``-slice slabs under ZeRO-2, once alone and once under
``torchrun --nproc_per_node=2`` (each rank with one torch thread per core it owns), and reads
``metrics.jsonl``: voxels/s (all ranks), the fraction of each step spent waiting for the next
slab, and the checkpoint events (seconds and bytes). A resume of the last checkpoint gives the
load time. Finally a 2-process run gets SIGTERM once it has logged 3 steps; the table gives
the time from the signal to the job's exit and what the run itself logged (signal → saved).
The reference for voxels/s is the same step measured in the same run with 1 process: the
2-process figure shows what data parallelism gives on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_line, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _config(scan: str, args, steps: int, threads: int) -> dict:
    return {
        "run": {"max_steps": steps, "seed": 0, "threads": threads},
        "data": {"scans": [scan], "slab_thickness": args.slab, "num_workers": args.workers},
        "model": {"widths": list(args.widths)},
        "loss": {"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate90"}]},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every": max(1, steps // 2), "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }


def _launch(nproc: int, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=0", "-m", "pipeline.cli", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    steps, events = [], []
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            (events if "event" in rec else steps).append(rec)
    return steps, events


def _wait(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{err[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--slab", type=int, default=8)
    parser.add_argument("--widths", type=int, nargs="+", default=(16, 32))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="recon3d-bench-train-"))
    scan = str(tmp / "mri.zarr")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "simulate", "mri", "--shape", *map(str, args.shape),
                    "--coils", str(args.coils), "--acceleration", "4", "--noise-sigma", "0.01",
                    "--chunk-depth", str(args.slab), "--seed", "0", "--out", scan, "--no-progress"],
                   check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    cores = os.cpu_count() or 1
    rows, ckpt_rows = [], []
    for nproc in (1, 2):
        run = tmp / f"run{nproc}"
        cfg = tmp / f"c{nproc}.yaml"
        cfg.write_text(yaml.safe_dump(_config(scan, args, args.steps, max(1, cores // nproc))))
        t0 = time.perf_counter()
        _wait(_launch(nproc, ["train", str(cfg), "--run-dir", str(run)]), f"train on {nproc}")
        wall = time.perf_counter() - t0
        steps, events = _records(run)
        body = steps[2:]  # the first steps pay for workers starting and allocator warm-up
        vox = statistics.median(r["voxels_per_s"] for r in body)
        wait = statistics.mean(r["data_wait_fraction"] for r in body)
        step_s = statistics.median(r["step_s"] for r in body)
        rows.append([nproc, len(steps), f"{step_s:.3f}", f"{vox / 1e6:.3f}", f"{wait:.3f}", f"{wall:.0f}"])
        # Load: resume the last checkpoint with one more step.
        _wait(_launch(nproc, ["train", str(cfg), "--run-dir", str(run), "--resume", "auto",
                              "--set", f"run.max_steps={args.steps + 1}"]), f"resume on {nproc}")
        _, events = _records(run)
        saves = [e for e in events if e["event"] == "checkpoint"]
        load = [e for e in events if e["event"] == "resume"][-1]
        mib = saves[0]["bytes"] / 2**20
        save_s = statistics.median(e["seconds"] for e in saves)
        ckpt_rows.append([nproc, f"{mib:.2f}", f"{save_s:.3f}", f"{mib / save_s:.0f}", f"{load['seconds']:.3f}",
                          f"{mib / load['seconds']:.0f}"])
    base = float(rows[0][3])
    for r in rows:
        r.append(f"{float(r[3]) / base:.2f}")
    print_table(f"Training throughput: MRI {args.shape[0]}×{args.shape[1]}×{args.shape[2]}, {args.coils} coils, "
                f"slab {args.slab}, UNet3D {list(args.widths)}, MC + EI, ZeRO-2, {args.workers} DataLoader workers/rank",
                ["processes", "steps", "step s (median)", "Mvoxel/s (all ranks)", "data wait fraction (target < 0.1)",
                 "wall s", "Mvoxel/s ÷ 1 process"], rows)
    print_table("Checkpoints (model + Adam state, every rank's shards and state files)",
                ["processes", "MiB", "save s", "save MiB/s", "load s (incl. universal check)", "load MiB/s"], ckpt_rows)

    # SIGTERM → saved → exit.
    run = tmp / "sigterm"
    cfg = tmp / "c_sig.yaml"
    cfg.write_text(yaml.safe_dump(_config(scan, args, 10_000, max(1, cores // 2))))
    proc = _launch(2, ["train", str(cfg), "--run-dir", str(run)])
    while True:
        steps, _ = _records(run)
        if len(steps) >= 3 or proc.poll() is not None:
            break
        time.sleep(0.2)
    t0 = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and its workers, as a scheduler would
    proc.communicate()
    exit_s = time.perf_counter() - t0
    steps, events = _records(run)
    stop = [e for e in events if e["event"] == "stop"]
    logged = f"{stop[-1]['seconds_after_signal']:.2f}" if stop else "n/a"
    print_table("SIGTERM to exit (2 processes)",
                ["median step s", "signal → saved (logged by rank 0) s", "signal → job exited s", "exit status",
                 "saved step"],
                [[f"{statistics.median(r['step_s'] for r in steps):.3f}", logged, f"{exit_s:.2f}", proc.returncode,
                  (run / "checkpoints" / "latest").read_text() if (run / "checkpoints" / "latest").exists() else "none"]])
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
