"""Data benchmarks (issue 4): stream throughput, peak memory on a ≥ 4 GiB scan, codecs.

    .venv/bin/python benchmarks/data.py [--section codec|stream|memory|checksum|all] [--scratch DIR]
        [--depth 512] [--ct-size 1024] [--crc-depth 64] [--crc-ct-size 384] [--repeats 7] [--keep]

* **stream** — decompressed MB/s that :class:`pipeline.data.SlabStream` delivers to the loop
  (measurements plus the operator's coil maps for MRI) with 2 reader threads
  (``worker_type="thread"``, the default) and with 2 DataLoader worker processes
  (``worker_type="process"``), against zarr reading and decoding the same chunks sequentially
  in this process, in the same run (target ≥ 80 %). The sequential read runs before and after
  the two stream passes; the ratio is against the mean of the two, so load that changes during
  the run biases neither path. A second table gives the CPU seconds each spends per GB
  (worker processes included), which load on a shared machine moves much less than MB/s.
  Makes the scans of the memory section (untimed) if they are missing.
* **memory** — peak memory (PSS summed over the process and its workers, above the process's
  idle footprint after imports) of ``simulate mri`` writing a ≥ 4 GiB scan, ``ingest ct`` of a
  4 GiB projection stack, and one full pass of the stream over the simulated scan (2 reader
  threads; 2 worker processes), relative to the scan size (target ≤ 1/8). Each runs in a
  fresh subprocess.
* **codec** — compression ratio and decode MB/s of the default compressor (Blosc zstd level 3
  with byte shuffle; without the CRC32C, which the checksum section measures) against
  uncompressed chunks, on simulated CT (Poisson noise) and MRI (Gaussian noise, 4× mask)
  measurements.
* **checksum** — the cost of the CRC32C every chunk carries by default: the zarr sequential
  read and the 2-reader-thread stream (MB/s and CPU s per GB) of the same MRI and CT scans
  with and without it (twins copied chunk by chunk, so they differ only in the codec),
  alternated over ``--repeats`` passes in one run (best pass MB/s and median CPU s per GB;
  target: within 5 %), and the
  CRC32C and Blosc decode rates that explain the ratio. Needs ~3 GiB of scratch.

Scratch data go to ``--scratch`` (default ``/tmp/recon3d-bench-data``) and are deleted at the
end unless ``--keep`` (a later ``--section stream --keep`` run reuses them); the script checks
the free disk first (it needs about 14 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, print_table, run_monitored_child, scan_bytes  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


def _mri_config(scratch: Path, depth: int):
    from pipeline.data import SimulateMRIConfig

    return SimulateMRIConfig(out=str(scratch / "mri.zarr"), shape=(depth, 256, 256), coils=8,
                             acceleration=4.0, calibration=24, noise_sigma=0.05, seed=0,
                             workers=2, progress=False)


def _projection_file(scratch: Path, angles: int, rows: int, cols: int) -> Path:
    """A (A, V, U) float32 transmission stack ``1000 · exp(−p) · (1 + 0.03 n)``, written in blocks."""
    path = scratch / "projections.npy"
    if path.exists():
        return path
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(angles, rows, cols))
    v = np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
    u = np.linspace(-1, 1, cols, dtype=np.float32)[None, :]
    rng = np.random.default_rng(0)
    for a0 in range(0, angles, 64):
        a1 = min(a0 + 64, angles)
        theta = (np.arange(a0, a1, dtype=np.float32) * np.pi / angles)[:, None, None]
        p = 2.0 * np.clip(1 - (u * np.cos(theta) + 0.3 * np.sin(theta)) ** 2 - 0.5 * v**2, 0, None)
        noise = rng.standard_normal(p.shape, dtype=np.float32)
        out[a0:a1] = 1000.0 * np.exp(-p) * (1 + 0.03 * noise)
    out.flush()
    del out
    return path


def _make_stream_scans(scratch: Path, depth: int, ct_size: int) -> None:
    """The MRI and CT scans of the memory section, made here (untimed) when they are missing."""
    from pipeline.data import IngestCTConfig, ingest_ct, simulate_mri

    if not (scratch / "mri.zarr").exists():
        t0 = time.perf_counter()
        simulate_mri(_mri_config(scratch, depth))
        print(f"(simulated the MRI scan, D = {depth}, in {time.perf_counter() - t0:.0f} s)")
    if not (scratch / "ct.zarr").exists():
        t0 = time.perf_counter()
        _projection_file(scratch, ct_size, ct_size, ct_size)
        ingest_ct(IngestCTConfig(source=str(scratch / "projections.npy"), out=str(scratch / "ct.zarr"),
                                 i0=1000.0, workers=2, progress=False))
        (scratch / "projections.npy").unlink()
        print(f"(ingested the {ct_size}³ CT stack in {time.perf_counter() - t0:.0f} s)")


# ----------------------------------------------------------------------------- children
def _child(phase: str, scratch: Path, depth: int) -> None:
    """Runs in a fresh process; prints READY after imports, then a JSON line of results."""
    import torch

    torch.set_num_threads(2)
    from pipeline.data import (
        IngestCTConfig,
        SlabStream,
        SlabStreamConfig,
        ingest_ct,
        simulate_mri,
    )

    print("READY", flush=True)
    sys.stdin.readline()  # the parent has taken the baseline
    t0 = time.perf_counter()
    result: dict = {}
    if phase == "simulate":
        simulate_mri(_mri_config(scratch, depth))
        result["scan"] = str(scratch / "mri.zarr")
    elif phase == "ingest":
        ingest_ct(IngestCTConfig(source=str(scratch / "projections.npy"), out=str(scratch / "ct.zarr"),
                                 i0=1000.0, workers=2, progress=False))
        result["scan"] = str(scratch / "ct.zarr")
    elif phase in ("stream-thread", "stream-process"):
        stream = SlabStream(SlabStreamConfig(scans=(str(scratch / "mri.zarr"),), num_workers=2, seed=0,
                                             worker_type=phase.split("-")[1]))
        count = 0
        for y, op, _ in stream:
            count += y.numel() * y.element_size() + op.coil_maps.numel() * op.coil_maps.element_size()
        result["scan"] = str(scratch / "mri.zarr")
        result["delivered"] = count
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result), flush=True)


def _run_child(phase: str, scratch: Path, depth: int) -> dict:
    result, monitor = run_monitored_child(
        [sys.executable, __file__, "--child", phase, "--scratch", str(scratch), "--depth", str(depth)],
        phase, interval=0.25)
    result["peak"] = monitor.peak_above_baseline
    result["baseline"] = monitor.baseline
    return result


# ----------------------------------------------------------------------------- sections
def memory_section(scratch: Path, depth: int, ct_size: int) -> None:
    rows = []
    sim = _run_child("simulate", scratch, depth)
    size = scan_bytes(sim["scan"])
    rows.append(["simulate mri 8 coils " + f"{depth}×256×256", f"{size / GIB:.2f}", f"{sim['seconds']:.0f}",
                 f"{sim['peak'] / MIB:.0f}", f"**{sim['peak'] / size:.3f}**"])
    angles = v = u = ct_size
    t0 = time.perf_counter()
    _projection_file(scratch, angles, v, u)
    print(f"(wrote a {angles}×{v}×{u} float32 projection stack in {time.perf_counter() - t0:.0f} s)")
    ing = _run_child("ingest", scratch, depth)
    size_ct = scan_bytes(ing["scan"])
    rows.append([f"ingest ct .npy {angles}×{v}×{u}", f"{size_ct / GIB:.2f}", f"{ing['seconds']:.0f}",
                 f"{ing['peak'] / MIB:.0f}", f"**{ing['peak'] / size_ct:.3f}**"])
    for worker_type, label in (("thread", "2 reader threads"), ("process", "2 worker processes")):
        st = _run_child(f"stream-{worker_type}", scratch, depth)
        rows.append([f"stream, full pass, {label}", f"{size / GIB:.2f}", f"{st['seconds']:.0f}",
                     f"{st['peak'] / MIB:.0f}", f"**{st['peak'] / size:.3f}**"])
    print_table("Peak memory over a ≥ 4 GiB scan (PSS of process + workers above idle, target ≤ 0.125)",
                ["job", "scan GiB", "s", "peak MiB", "peak / scan"], rows)
    print(f"(idle footprint after imports, not counted: {sim['baseline'] / MIB:.0f} MiB)")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _sequential_read(scan, names: list[str]) -> tuple[int, float, float]:
    """zarr reads of every chunk along D of ``names``, one after another (plain zarr).

    Returns bytes, wall seconds and CPU seconds.
    """
    arrays = [scan.group[n] for n in names]
    total = 0
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for d0 in range(0, scan.metadata.measurement_depth, scan.chunk_depth):
        d1 = min(d0 + scan.chunk_depth, scan.metadata.measurement_depth)
        for arr in arrays:
            axis = list(arr.metadata.dimension_names).index("d")
            sel = [slice(None)] * arr.ndim
            sel[axis] = slice(d0, d1)
            block = arr[tuple(sel)]
            total += block.nbytes
    return total, time.perf_counter() - t0, _cpu_seconds() - c0


def _stream_pass(path: str, workers: int, worker_type: str, *,
                 max_samples: int | None = None) -> tuple[int, float, float]:
    """One pass of the stream; bytes delivered, wall seconds, CPU seconds (workers included)."""
    import gc

    from pipeline.data import SlabStream, SlabStreamConfig

    stream = SlabStream(SlabStreamConfig(scans=(path,), num_workers=workers, worker_type=worker_type,
                                         seed=1, prefetch_factor=4))
    total, count = 0, 0
    c0, t0 = _cpu_seconds(), time.perf_counter()  # includes the readers' start-up (a fork: ~0.1 s)
    for y, op, _ in stream:
        total += y.numel() * y.element_size()
        if getattr(op, "coil_maps", None) is not None:
            total += op.coil_maps.numel() * op.coil_maps.element_size()
        count += 1
        if max_samples is not None and count >= max_samples:
            break
    seconds = time.perf_counter() - t0
    del stream  # stops and reaps the worker processes, so that their CPU time is counted
    gc.collect()
    return total, seconds, _cpu_seconds() - c0


def stream_section(scratch: Path, depth: int, ct_size: int) -> None:
    from pipeline.data import open_scan

    _make_stream_scans(scratch, depth, ct_size)
    rows, cpu_rows = [], []
    cases = [("MRI 8 coils, 256², chunk 2 slices", scratch / "mri.zarr", ["measurements", "coil_maps"]),
             ("CT ingested stack, chunk ≈ 8 MiB", scratch / "ct.zarr", ["measurements"])]
    for name, path, arrays in cases:
        scan = open_scan(path)
        seq_bytes, seq_before, cpu_before = _sequential_read(scan, arrays)
        rates, cpu = {}, {}
        for worker_type in ("thread", "process"):
            st_bytes, st_s, st_cpu = _stream_pass(str(path), 2, worker_type)
            if st_bytes != seq_bytes:
                raise RuntimeError(f"{name}: the stream delivered {st_bytes} bytes, zarr read {seq_bytes}")
            rates[worker_type], cpu[worker_type] = st_bytes / st_s / 1e6, st_cpu / (st_bytes / 1e9)
        _, seq_after, cpu_after = _sequential_read(scan, arrays)
        before, after = seq_bytes / seq_before / 1e6, seq_bytes / seq_after / 1e6
        seq = (before + after) / 2
        rows.append([name, f"{seq_bytes / GIB:.2f}", f"{before:.0f} / {after:.0f}",
                     f"{rates['thread']:.0f}", f"**{rates['thread'] / seq:.2f}**",
                     f"{rates['process']:.0f}", f"**{rates['process'] / seq:.2f}**"])
        seq_cpu = (cpu_before + cpu_after) / 2 / (seq_bytes / 1e9)
        cpu_rows.append([name, f"{seq_cpu:.2f}", f"{cpu['thread']:.2f}", f"{cpu['process']:.2f}"])
    print_table("Stream throughput (decompressed MB/s to the training loop; ratio to the mean "
                "sequential rate, target ≥ 0.8)",
                ["scan", "GiB read", "zarr sequential MB/s before / after", "2 threads MB/s", "ratio",
                 "2 processes MB/s", "ratio"], rows)
    print_table("CPU seconds per GB delivered (user + system, worker processes included)",
                ["scan", "zarr sequential", "2 threads", "2 processes"], cpu_rows)


def _recode(scan, name: str, codec, dest: Path, depth: int) -> tuple[object, object]:
    """The first ``depth`` D-slices of an array, written with the default codec and with none."""
    import zarr

    from pipeline.data.format import CodecConfig

    src = scan.group[name]
    axis = list(src.metadata.dimension_names).index("d")
    shape = list(src.shape)
    shape[axis] = min(depth, shape[axis])
    sel = [slice(None)] * src.ndim
    sel[axis] = slice(0, shape[axis])
    data = src[tuple(sel)]
    out = []
    for label, cfg in (("default", CodecConfig(checksum=False)),
                       ("none", CodecConfig(compressor="none", checksum=False))):
        g = zarr.open_group(dest / f"{name}-{label}.zarr", mode="w")
        arr = g.create_array("a", shape=tuple(shape), chunks=src.chunks, dtype=src.dtype,
                             compressors=cfg.compressors(), dimension_names=src.metadata.dimension_names)
        arr[...] = data
        out.append(arr)
    return out[0], out[1]


def _decode_rate(arr, repeat: int = 3) -> float:
    axis = list(arr.metadata.dimension_names).index("d")
    cd = arr.chunks[axis]
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for d0 in range(0, arr.shape[axis], cd):
            sel = [slice(None)] * arr.ndim
            sel[axis] = slice(d0, d0 + cd)
            arr[tuple(sel)]
        best = min(best, time.perf_counter() - t0)
    return arr.nbytes / best / 1e6


def codec_section(scratch: Path) -> None:
    from pipeline.data import SimulateCTConfig, open_scan, simulate_ct

    ct_path = scratch / "ct_sim.zarr"
    if not ct_path.exists():
        t0 = time.perf_counter()
        simulate_ct(SimulateCTConfig(out=str(ct_path), shape=(16, 256, 256), angles=256, photons=1e4,
                                     phantom="foam", seed=0, workers=2, progress=False))
        print(f"(simulated CT 16×256×256, 256 angles in {time.perf_counter() - t0:.0f} s)")
    mri_path = scratch / "mri.zarr"
    if not mri_path.exists():
        from pipeline.data import simulate_mri

        simulate_mri(_mri_config(scratch, 64))
    rows = []
    for label, path, depth in (("CT (D, A, U), Poisson I0=1e4", ct_path, 16),
                               ("MRI (C, D, kH, kW), σ=0.05, 4× mask", mri_path, 64)):
        scan = open_scan(path)
        comp, raw = _recode(scan, "measurements", None, scratch / "codec", depth)
        ratio = raw.nbytes_stored() / comp.nbytes_stored()
        rate_c, rate_r = _decode_rate(comp), _decode_rate(raw)
        rows.append([label, f"{comp.nbytes / MIB:.0f}", f"**{ratio:.2f}**", f"{rate_c:.0f}", f"{rate_r:.0f}",
                     f"{rate_c / rate_r:.2f}"])
    print_table("Default codec (Blosc zstd 3 + shuffle) vs uncompressed",
                ["measurements", "MiB", "ratio", "decode MB/s zstd", "read MB/s none", "zstd / none"], rows)


def _twin(src_path: Path, dst_path: Path, *, checksum: bool) -> None:
    """A copy of a scan whose arrays differ only in the CRC32C codec (same data, chunks, Blosc).

    Copies chunk by chunk, so the pair differs in nothing but the checksum: the comparison
    is not blurred by two simulations or two ingest runs.
    """
    import zarr

    from pipeline.data.format import CodecConfig

    src = zarr.open_group(str(src_path), mode="r")
    dst = zarr.open_group(str(dst_path), mode="w", zarr_format=3)
    dst.attrs.update(dict(src.attrs))
    codec = CodecConfig(checksum=checksum)
    for name in src.array_keys():
        a = src[name]
        b = dst.create_array(name, shape=a.shape, chunks=a.chunks, dtype=a.dtype, fill_value=a.fill_value,
                             compressors=codec.compressors(), dimension_names=a.metadata.dimension_names,
                             config={"write_empty_chunks": True})
        names = a.metadata.dimension_names
        if names is None or "d" not in names:
            b[...] = a[...]
            continue
        axis = list(names).index("d")
        step = a.chunks[axis]
        for d0 in range(0, a.shape[axis], step):
            sel = [slice(None)] * a.ndim
            sel[axis] = slice(d0, d0 + step)
            b[tuple(sel)] = a[tuple(sel)]


def _crc_and_decode_rates(path: Path) -> tuple[float, float, float]:
    """GB/s of CRC32C over the stored bytes of the measurements' chunks, of Blosc decoding them,
    and the compression ratio: what a checksum costs next to the decode it rides on."""
    import google_crc32c
    import numcodecs
    import zarr

    arr = zarr.open_group(str(path), mode="r")["measurements"]
    root = path / "measurements" / "c"
    blobs = [p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()][:32]
    payloads = [b[:-4] for b in blobs]
    stored = sum(len(b) for b in payloads)
    t0 = time.perf_counter()
    for _ in range(5):
        for b in payloads:
            google_crc32c.value(b)
    crc = 5 * stored / (time.perf_counter() - t0) / 1e9
    blosc = numcodecs.Blosc()
    t0 = time.perf_counter()
    raw = 0
    for b in payloads:
        raw += len(blosc.decode(b))
    dec = raw / (time.perf_counter() - t0) / 1e9
    del arr
    return crc, dec, raw / stored


def checksum_section(scratch: Path, depth: int, ct_size: int, repeats: int) -> None:
    """Read and stream rates of the same scans with and without CRC32C, alternated in one run."""
    import statistics

    from pipeline.data import IngestCTConfig, SimulateMRIConfig, ingest_ct, open_scan, simulate_mri

    base = scratch / "crc"
    base.mkdir(parents=True, exist_ok=True)
    mri_src, ct_src = base / "mri_src.zarr", base / "ct_src.zarr"
    t0 = time.perf_counter()
    if not mri_src.exists():
        simulate_mri(SimulateMRIConfig(out=str(mri_src), shape=(depth, 256, 256), coils=8, acceleration=4.0,
                                       calibration=24, noise_sigma=0.05, seed=0, workers=2, progress=False))
    if not ct_src.exists():
        _projection_file(base, ct_size, ct_size, ct_size)
        ingest_ct(IngestCTConfig(source=str(base / "projections.npy"), out=str(ct_src), i0=1000.0, workers=2,
                                 progress=False))
        (base / "projections.npy").unlink()
    cases = [(f"MRI 8 coils {depth}×256², chunk 2 slices", mri_src, ["measurements", "coil_maps"]),
             (f"CT ingested {ct_size}³ stack, chunk ≈ 8 MiB", ct_src, ["measurements"])]
    for _, src, _ in cases:
        for label, flag in (("crc", True), ("plain", False)):
            if not (base / f"{src.stem}-{label}.zarr").exists():
                _twin(src, base / f"{src.stem}-{label}.zarr", checksum=flag)
    print(f"(made the scans and their twins in {time.perf_counter() - t0:.0f} s)")
    rows, cpu_rows, pass_rows, why_rows = [], [], [], []
    for name, src, arrays in cases:
        paths = {label: base / f"{src.stem}-{label}.zarr" for label in ("crc", "plain")}
        seq: dict[str, list[float]] = {"crc": [], "plain": []}
        thr: dict[str, list[float]] = {"crc": [], "plain": []}
        seq_cpu: dict[str, list[float]] = {"crc": [], "plain": []}
        thr_cpu: dict[str, list[float]] = {"crc": [], "plain": []}
        gib = 0.0
        for label in ("plain", "crc"):  # warm-up (page cache, thread pools, imports), untimed
            _stream_pass(str(paths[label]), 2, "thread")
        for rep in range(repeats):
            # Alternate the order each repeat, so a load change during the run hits both alike.
            for label in (("crc", "plain") if rep % 2 == 0 else ("plain", "crc")):
                scan = open_scan(paths[label])
                nbytes, seconds, cpu_s = _sequential_read(scan, arrays)
                seq[label].append(nbytes / seconds / 1e6)
                seq_cpu[label].append(cpu_s / (nbytes / 1e9))
                st_bytes, st_s, st_cpu = _stream_pass(str(paths[label]), 2, "thread")
                if st_bytes != nbytes:
                    raise RuntimeError(f"{name}: the stream delivered {st_bytes} bytes, zarr read {nbytes}")
                thr[label].append(st_bytes / st_s / 1e6)
                thr_cpu[label].append(st_cpu / (st_bytes / 1e9))
                gib = nbytes / GIB
        # MB/s: the best pass of each (the one other jobs on the machine disturbed least);
        # CPU s per GB: the median (CPU time moves much less with load than wall time).
        best = {k: {lab: max(v[lab]) for lab in v} for k, v in (("seq", seq), ("thr", thr))}
        med = {k: {lab: statistics.median(v[lab]) for lab in v} for k, v in (("seq", seq_cpu), ("thr", thr_cpu))}
        rows.append([name, f"{gib:.2f}", f"{best['seq']['plain']:.0f}", f"{best['seq']['crc']:.0f}",
                     f"**{best['seq']['crc'] / best['seq']['plain']:.3f}**", f"{best['thr']['plain']:.0f}",
                     f"{best['thr']['crc']:.0f}", f"**{best['thr']['crc'] / best['thr']['plain']:.3f}**"])
        cpu_rows.append([name, f"{med['seq']['plain']:.2f}", f"{med['seq']['crc']:.2f}",
                         f"**{med['seq']['crc'] / med['seq']['plain']:.3f}**",
                         f"{med['thr']['plain']:.2f}", f"{med['thr']['crc']:.2f}",
                         f"**{med['thr']['crc'] / med['thr']['plain']:.3f}**"])
        pass_rows.append([name, " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(seq["plain"], seq["crc"])),
                          " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(thr["plain"], thr["crc"]))])
        crc_rate, dec_rate, ratio = _crc_and_decode_rates(paths["crc"])
        why_rows.append([name, f"{ratio:.2f}", f"{crc_rate:.1f}", f"{dec_rate:.2f}",
                         f"{dec_rate / ratio / crc_rate:.3f}"])
    print_table(f"Checksum cost: the same scans with and without CRC32C (best of {repeats} alternated "
                "passes; ratio with / without, target ≥ 0.95)",
                ["scan", "GiB read", "zarr sequential MB/s without", "with", "ratio",
                 "stream 2 threads MB/s without", "with", "ratio"], rows)
    print_table(f"CPU seconds per GB delivered (median of {repeats}; less load-sensitive than MB/s; "
                "ratio with / without, target ≤ 1.05)",
                ["scan", "sequential without", "with", "ratio", "stream 2 threads without", "with", "ratio"],
                cpu_rows)
    print_table("Each pass, MB/s without/with (in run order)", ["scan", "zarr sequential", "stream 2 threads"],
                pass_rows)
    print_table("Why: CRC32C runs over the stored (compressed) bytes, Blosc decodes to the raw bytes",
                ["scan", "compression ratio", "CRC32C GB/s (stored)", "Blosc decode GB/s (raw)",
                 "CRC time / decode time"], why_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="all", choices=["codec", "stream", "memory", "checksum", "all"])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/recon3d-bench-data"))
    parser.add_argument("--depth", type=int, default=512, help="D of the simulated MRI scan (512: 4.25 GiB)")
    parser.add_argument("--ct-size", type=int, default=1024,
                        help="A = V = U of the ingested projection stack (1024: 4 GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch scans")
    parser.add_argument("--crc-depth", type=int, default=64,
                        help="checksum section: D of its MRI scan (64: 0.5 GiB read per pass)")
    parser.add_argument("--crc-ct-size", type=int, default=384,
                        help="checksum section: A = V = U of its CT stack (384: 216 MiB)")
    parser.add_argument("--repeats", type=int, default=7, help="checksum section: alternated passes")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.scratch, args.depth)
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.scratch).free
    if args.section == "checksum" and free < 4 * GIB:
        raise SystemExit(f"benchmarks/data.py: the checksum section needs ~3 GiB free in {args.scratch}")
    if args.section in ("memory", "stream", "all") and free < 16 * GIB:
        raise SystemExit(f"benchmarks/data.py: needs ~14 GiB free in {args.scratch}, has {free / GIB:.1f}")
    print(machine_line())
    try:
        if args.section in ("memory", "all"):
            memory_section(args.scratch, args.depth, args.ct_size)
        if args.section in ("stream", "all"):
            stream_section(args.scratch, args.depth, args.ct_size)
        if args.section in ("codec", "all"):
            codec_section(args.scratch)
        if args.section in ("checksum", "all"):
            checksum_section(args.scratch, args.crc_depth, args.crc_ct_size, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
