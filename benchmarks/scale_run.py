"""A whole scan through every stage, as a user runs it, at a given size (issue 17.2).

    .venv/bin/python benchmarks/scale_run.py --modality mri --gib 32 --scratch DIR [--keep]
        [--steps 50] [--stages simulate,read,preprocess,train,export,reconstruct,evaluate]

Runs the real commands, each in its own process tree, one after another:

* ``recon3d simulate`` — a scan of about ``--gib`` GiB (measurements, coil maps and reference,
  decompressed): MRI ``D × 256 × 256``, 8 coils, 4× Poisson disc; CT parallel beam
  ``D × 128 × 128``, 192 angles, 182 detector columns (the diagonal). Only D grows with ``--gib``: the
  in-plane size fixes what one slab costs, the scan size must not change it;
* **read** — the reference: one process reads and decodes every chunk of every array of the
  scan, nothing else (plain zarr): the rate the disk and the codec allow here;
* ``recon3d preprocess`` (MRI: ``derived/adjoint``; CT: ``derived/fbp``);
* ``torchrun --nproc_per_node=2 … train`` — ``--steps`` steps of the shipped recipe
  (``launch/configs/mri_ei.yaml`` / ``ct_ei.yaml``) on this scan, no validation, one checkpoint
  at the end;
* ``recon3d export``, then ``recon3d reconstruct --model`` of the whole scan (slab from the
  default ``--memory-budget``), then ``recon3d evaluate`` against the reference.

For each stage: the wall time; the **largest peak RSS of any one process** of its tree, exact
(the kernel's high-water mark, ``ru_maxrss`` of the waited-for processes via ``wait4``); which
process that was (sampled every 0.5 s with psutil); the peak PSS of the whole tree; the bytes it
read and wrote (decompressed: arrays' shapes × item sizes); its rate in Mvoxel/s (volume voxels
processed per second) and GB/s (bytes read per second), and that rate against the raw read's.

Prints Markdown tables and writes ``DIR/scale_<modality>_<gib>.json``. Disk: the scan takes
about half its decompressed size (the k-space is 3/4 zeros), the outputs a few GiB; DIR is
cleaned unless ``--keep``. The owner records the figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_line, print_table  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20
STAGES = ("simulate", "read", "preprocess", "train", "export", "reconstruct", "evaluate")

#: In-plane geometry of each modality; only D grows with the scan size.
MRI = {"hw": 256, "coils": 8}
CT = {"hw": 128, "angles": 192, "det": 182}


def slice_bytes(modality: str) -> int:
    """Decompressed bytes of the scan per D-slice (measurements, coil maps, reference)."""
    if modality == "mri":
        n, c = MRI["hw"], MRI["coils"]
        return c * n * n * 8 * 2 + n * n * 8  # k-space and coil maps (complex64), complex reference
    n = CT["hw"]
    return CT["angles"] * CT["det"] * 4 + n * n * 4  # projections and reference (float32)


def depth_for(modality: str, gib: float, chunk: int = 8) -> int:
    """The fewest D-slices, a multiple of ``chunk``, that make at least ``gib`` GiB."""
    d = -(-int(gib * GIB) // slice_bytes(modality))
    return max(chunk, -(-d // chunk) * chunk)


# ----------------------------------------------------------------------------- process trees
class TreeWatch:
    """Samples each process of a tree (RSS, PSS, command line) every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss: dict[int, tuple[int, str]] = {}
        self.peak_pss_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _name(proc) -> str:
        try:
            cmd = proc.cmdline()
        except Exception:  # noqa: BLE001 - gone or unreadable
            return "?"
        text = " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd[:6]))
        return text[:90]

    def _sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return
        pss = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except self._psutil.Error:
                continue
            pss += getattr(info, "pss", info.rss)
            old = self.peak_rss.get(proc.pid)
            if old is None or info.rss > old[0]:
                self.peak_rss[proc.pid] = (info.rss, old[1] if old else self._name(proc))
        self.peak_pss_total = max(self.peak_pss_total, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def largest(self) -> tuple[int, str]:
        return max(self.peak_rss.values(), default=(0, "?"))


def run_stage(name: str, argv: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``argv`` with its output in ``log``; the stage's time and memory."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        watch = TreeWatch(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    watch.stop()
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage {name} failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    sampled, who = watch.largest()
    return {"stage": name, "seconds": seconds, "max_rss": usage.ru_maxrss * 1024, "sampled_max_rss": sampled,
            "largest_process": who, "peak_pss_tree": watch.peak_pss_total}


# ----------------------------------------------------------------------------- the stages
def array_bytes(path: Path, names: list[str] | None = None) -> dict[str, int]:
    """Decompressed bytes of each array under a zarr group (recursively), by path."""
    import zarr

    found: dict[str, int] = {}

    def walk(group, prefix: str) -> None:
        for key, member in group.members():
            full = f"{prefix}{key}"
            if isinstance(member, zarr.Array):
                found[full] = int(member.nbytes)
            else:
                walk(member, full + "/")

    walk(zarr.open_group(str(path), mode="r"), "")
    if names is not None:
        return {k: v for k, v in found.items() if k in names}
    return found


def read_child(scan: str) -> None:
    """Read and decode every chunk of every top-level array of the scan (plain zarr, D-chunk by
    D-chunk), print the bytes."""
    import numpy as np
    import zarr

    group = zarr.open_group(scan, mode="r")
    total = 0
    for key, arr in group.arrays():
        d_axis = 1 if arr.ndim == 4 else 0
        step = arr.chunks[d_axis]
        for d0 in range(0, arr.shape[d_axis], step):
            index = (slice(None), slice(d0, d0 + step)) if d_axis == 1 else (slice(d0, d0 + step),)
            total += np.asarray(arr[index]).nbytes
    print(json.dumps({"bytes": total}))


def train_config(modality: str, scan: Path, steps: int, out: Path) -> Path:
    import yaml

    recipe = ROOT / "launch" / "configs" / ("mri_ei.yaml" if modality == "mri" else "ct_ei.yaml")
    cfg = yaml.safe_load(recipe.read_text())
    cfg["run"] = {**cfg.get("run", {}), "max_steps": steps}
    cfg["data"]["scans"] = [str(scan)]
    cfg.pop("validation", None)  # no validation: scans [] (the default)
    cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "every": steps}
    cfg["logging"] = {**cfg.get("logging", {}), "tensorboard": False, "progress": False}
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", choices=("mri", "ct"), default="mri")
    ap.add_argument("--gib", type=float, default=32.0, help="decompressed scan size (default 32)")
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to `recon3d train --set` (repeatable), e.g. model.activation_checkpointing=level")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose among {', '.join(STAGES)}")

    py = sys.executable
    cli = [py, "-m", "pipeline.cli"]
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    depth = depth_for(args.modality, args.gib)
    tag = f"{args.modality}_{args.gib:g}"
    scan, run_dir, model, recon = (scratch / f"{tag}.zarr", scratch / f"run_{tag}", scratch / f"model_{tag}.pt",
                                   scratch / f"recon_{tag}.ome.zarr")
    hw = MRI["hw"] if args.modality == "mri" else CT["hw"]
    voxels = depth * hw * hw
    print(machine_line())
    print(f"{args.modality} scan {depth}×{hw}×{hw} ({voxels / 1e6:.0f} Mvoxel), about "
          f"{depth * slice_bytes(args.modality) / GIB:.2f} GiB decompressed; scratch {scratch}", flush=True)
    results: list[dict] = []
    info: dict = {"modality": args.modality, "depth": depth, "hw": hw, "voxels": voxels, "gib": args.gib,
                  "train_overrides": args.overrides}
    earlier = scratch / f"scale_{tag}.json"
    if earlier.is_file() and set(stages) != set(STAGES):
        # A partial rerun (e.g. train onwards with another model) keeps the other stages' figures.
        old = json.loads(earlier.read_text())
        results = [r for r in old["stages"] if r["stage"] not in stages]
        info = {**old["info"], "train_overrides": args.overrides if "train" in stages
                else old["info"].get("train_overrides")}
        depth, voxels = int(info["depth"]), int(info["voxels"])  # the scan made then
        print(f"kept the figures of {', '.join(r['stage'] for r in results)} from {earlier}")

    def log(name: str) -> Path:
        return scratch / f"{tag}_{name}.log"

    for stage in stages:
        if stage == "simulate":
            if args.modality == "mri":
                argv = cli + ["simulate", "mri", "--shape", str(depth), str(hw), str(hw), "--coils", str(MRI["coils"]),
                              "--acceleration", "4", "--noise-sigma", "0.05", "--chunk-depth", "8"]
            else:
                argv = cli + ["simulate", "ct", "--shape", str(depth), str(hw), str(hw), "--angles",
                              str(CT["angles"]), "--det-count", str(CT["det"]), "--noise-sigma", "0.01",
                              "--chunk-depth", "8"]
            res = run_stage(stage, argv + ["--out", str(scan), "--overwrite", "--workers", "2", "--no-progress"],
                            log(stage))
            written = array_bytes(scan)
            res.update(bytes_read=0, bytes_written=sum(written.values()), voxels=voxels)
            info["scan_arrays"] = written
            info["scan_bytes"] = sum(written.values())
        elif stage == "read":
            res = run_stage(stage, [py, __file__, "--read-child", str(scan)], log(stage))
            res.update(bytes_read=json.loads(log(stage).read_text().strip().splitlines()[-1])["bytes"],
                       bytes_written=0, voxels=voxels)
        elif stage == "preprocess":
            res = run_stage(stage, cli + ["preprocess", str(scan), "--outputs",
                                          "adjoint" if args.modality == "mri" else "fbp", "--workers", "2",
                                          "--no-progress"], log(stage))
            arrays = array_bytes(scan)
            derived = sum(v for k, v in arrays.items() if k.startswith("derived/"))
            res.update(bytes_read=sum(v for k, v in arrays.items() if k in ("measurements", "coil_maps")),
                       bytes_written=derived, voxels=voxels)
        elif stage == "train":
            cfg = train_config(args.modality, scan, args.steps, scratch / f"{tag}_train.yaml")
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli",
                    "train", str(cfg), "--run-dir", str(run_dir)]
            for item in args.overrides:
                argv += ["--set", item]
            res = run_stage(stage, argv, log(stage))
            res.update(bytes_read=None, bytes_written=None, voxels=None, steps=args.steps)
        elif stage == "export":
            res = run_stage(stage, cli + ["export", str(run_dir), "--out", str(model)], log(stage))
            res.update(bytes_read=None, bytes_written=None, voxels=None)
        elif stage == "reconstruct":
            shutil.rmtree(recon, ignore_errors=True)
            res = run_stage(stage, cli + ["reconstruct", "--scan", str(scan), "--model", str(model), "--out",
                                          str(recon), "--no-progress"], log(stage))
            arrays = array_bytes(scan)
            res.update(bytes_read=sum(v for k, v in arrays.items() if k in ("measurements", "coil_maps")),
                       bytes_written=sum(array_bytes(recon).values()), voxels=voxels)
            import zarr

            info["reconstruct_memory"] = dict(zarr.open_group(str(recon), mode="r").attrs.get("recon3d", {})).get(
                "memory")
        elif stage == "evaluate":
            out_json = scratch / f"{tag}_evaluate.json"
            res = run_stage(stage, cli + ["evaluate", str(recon), "--reference", str(scan), "--json",
                                          str(out_json)], log(stage))
            info["evaluate"] = json.loads(out_json.read_text())
            recon_bytes = array_bytes(recon)
            level0 = sum(v for k, v in recon_bytes.items() if k.split("/")[-1] == "0")
            ref = array_bytes(scan, ["reference"]).get("reference", 0)
            res.update(bytes_read=level0 + ref, bytes_written=0, voxels=voxels)
        results = [r for r in results if r["stage"] != stage] + [res]
        results.sort(key=lambda r: STAGES.index(r["stage"]))
        (scratch / f"scale_{tag}.json").write_text(json.dumps({"info": info, "stages": results}, indent=1))

    read_rate = next((r["bytes_read"] / r["seconds"] for r in results if r["stage"] == "read"), None)
    rows = []
    for r in results:
        gbs = r["bytes_read"] / r["seconds"] / 1e9 if r.get("bytes_read") else None
        mvs = r["voxels"] / r["seconds"] / 1e6 if r.get("voxels") else None
        if r["stage"] == "train":
            mvs_text = f"{r['steps'] / r['seconds']:.3f} steps/s"
        else:
            mvs_text = f"{mvs:.2f}" if mvs else "—"
        rows.append([r["stage"], f"{r['seconds']:.0f}", f"{r['max_rss'] / MIB:.0f}",
                     f"{r['max_rss'] / info.get('scan_bytes', depth * slice_bytes(args.modality)):.4f}",
                     r["largest_process"][:48], f"{r['peak_pss_tree'] / MIB:.0f}", mvs_text,
                     f"{gbs:.3f}" if gbs else "—",
                     f"{gbs * 1e9 / read_rate:.2f}" if gbs and read_rate else "—"])
    print_table(f"{args.modality}, {depth}×{hw}×{hw}, {info.get('scan_bytes', 0) / GIB:.2f} GiB decompressed",
                ["stage", "s", "max RSS, one process (MiB)", "/ scan", "that process", "tree PSS (MiB)",
                 "Mvoxel/s", "GB/s read", "/ raw read"], rows)
    if "reconstruct_memory" in info:
        print("reconstruct:", json.dumps(info["reconstruct_memory"]))
    if "evaluate" in info:
        print("evaluate:", json.dumps(info["evaluate"])[:600])
    if not args.keep:
        for p in (scan, run_dir, recon, model):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--read-child":
        read_child(sys.argv[2])
    else:
        main()
