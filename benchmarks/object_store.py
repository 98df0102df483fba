"""Object-store benchmark (issue 17): the same scan on a local S3 server and on local disk.

    .venv/bin/python benchmarks/object_store.py [--depth 64] [--repeat 2] [--scratch DIR]
        [--stream-threads 2]

Starts a moto S3 server on 127.0.0.1 (its own process, its objects in its memory), simulates one
MRI scan (``--depth`` slices of 256×256, 8 coils: 64 → about 0.57 GB) into it and the same scan
onto local disk — each as ``recon3d simulate`` writes it: on ``s3://`` sharded by default
(``--shard-chunks auto``), locally one file per chunk — then measures, local and s3 alternated
``--repeat`` times (the machine is shared; each ratio is against the local figure of the same
round):

* **sequential read** — every chunk along D of ``measurements`` and ``coil_maps``, one after
  another (plain zarr), decompressed MB/s;
* **sequential read by stored object** — the same through :meth:`ScanArray.read
  <pipeline.data.scan.ScanArray.read>` one stored object (a shard on s3, a chunk locally) at a
  time, with its presence and finite checks: a whole shard in one request;
* **stream** — one pass of :class:`pipeline.data.SlabStream` (``--stream-threads`` reader
  threads, default 2), MB/s delivered, in its default order (``order: auto``: shard by shard,
  each shard fetched whole once, on s3; shuffled on local disk), once more with each fetched
  shard decoded by zarr's own read instead of :mod:`pipeline.data._objectstore`'s decode pool
  (the same everywhere else: what the pool adds), and once with ``order: shuffle`` (each slab a
  range read of its shard on s3);
* **reconstruct** — ``recon3d reconstruct --method adjoint`` of the scan to an OME-Zarr image on
  the same store (s3 → s3, local → local), MB/s of measurements reconstructed;

each also on a third copy in the bucket written with ``--shard-chunks 0`` (one object per chunk);
and the requests the S3 server answered per GiB of decompressed data for each (counted from the
server's request log: all of them, and the GETs of stored chunk or shard objects alone).
Before the rounds, where the time of one whole shard read goes (``--shard-reads`` times, the
medians): the raw GET of its bytes, zarr's read of it, the fetch and decode of
:func:`~pipeline.data._objectstore.read_whole_shard`, and the same D-range from local disk,
each with this process's CPU time and the server's. moto
answers a byte range (a shard's index, one chunk of a shard) in time proportional to the whole
object, where a real object store takes time proportional to the range: reads of parts of
shards are slower here than they would be there. Prints Markdown tables; the owner records
them in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_line, print_table  # noqa: E402

GIB = 1 << 30
_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


class RequestCounter:
    """Counts the S3 server's requests: werkzeug logs one line per request answered on the
    server's stderr (``127.0.0.1 - - [..] "GET /bucket/key HTTP/1.1" 206 -``), read here in a thread."""

    def __init__(self, stream) -> None:
        self.count = 0
        self.object_gets = 0  # GETs of stored chunk/shard objects (``.../c/...``), whole or ranged
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            if '" ' in line and "HTTP/1." in line:
                self.count += 1
                line = re.sub(r"\x1b\[[\d;]*m", "", line)  # werkzeug colours the 206 lines
                if '"GET ' in line and "/c/" in line:
                    self.object_gets += 1

    def settle(self) -> int:
        """The count once the server has logged what it answered (its log trails the replies)."""
        last = -1
        while last != self.count:
            last = self.count
            time.sleep(0.3)
        return self.count


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server() -> tuple[subprocess.Popen, str, RequestCounter]:
    """A moto S3 server in its own process on a free port of 127.0.0.1 (objects in its memory),
    and the counter of its requests."""
    os.environ.update(_AWS_ENV)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    counter = RequestCounter(proc.stderr)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, endpoint, counter
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the moto server exited at start (is moto[server] installed?)")
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("the moto server did not start within 30 s")


def _sequential(path: str) -> int:
    """Read every chunk along D of the scan's measurements and coil maps; the bytes read."""
    from pipeline.data import open_scan

    scan = open_scan(path)
    total = 0
    for name in ("measurements", "coil_maps"):
        arr = scan.group[name]
        axis = list(arr.metadata.dimension_names).index("d")
        for d0 in range(0, arr.shape[axis], scan.chunk_depth):
            sel = [slice(None)] * arr.ndim
            sel[axis] = slice(d0, d0 + scan.chunk_depth)
            total += arr[tuple(sel)].nbytes
    return total


def _sequential_stored(path: str) -> int:
    """Read the scan's measurements and coil maps one stored object along D at a time through
    :meth:`ScanArray.read` (checks included); the bytes read."""
    from pipeline.data import open_scan

    scan = open_scan(path)
    total = 0
    for arr in (scan.measurements, scan.coil_maps):
        for d0 in range(0, arr.depth, arr.stored_depth):
            total += arr.read(slice(d0, d0 + arr.stored_depth)).nbytes
    return total


def _stream(path: str, threads: int = 2, order: str = "auto") -> int:
    """One pass of the slab stream with ``threads`` reader threads in ``order``; the bytes delivered."""
    from pipeline.data import SlabStream, SlabStreamConfig

    total = 0
    config = SlabStreamConfig(scans=(path,), num_workers=threads, seed=1, prefetch_factor=4, order=order)
    for y, op, _ in SlabStream(config):
        total += y.numel() * y.element_size() + op.coil_maps.numel() * op.coil_maps.element_size()
    return total


class _ZarrDecode:
    """Within it, fetched shards are decoded by zarr's own read (no :func:`shard_layout
    <pipeline.data._objectstore.shard_layout>`): the same stream, the same fetch order, only
    each shard's decode is zarr's (one thread per shard) instead of the decode pool."""

    def __enter__(self) -> None:
        from pipeline.data import _objectstore

        self._saved = _objectstore.shard_layout
        _objectstore.shard_layout = lambda array: None

    def __exit__(self, *exc: object) -> None:
        from pipeline.data import _objectstore

        _objectstore.shard_layout = self._saved


def _stream_zarr_decode(path: str, threads: int) -> int:
    with _ZarrDecode():
        return _stream(path, threads)


def _server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process ``pid`` has used (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shard_breakdown(remote: str, local: str, server_pid: int, times: int) -> list[list[str]]:
    """Rows of the whole-shard table: shard 0 of ``measurements`` read ``times`` times each way,
    the medians of wall time, this process's CPU time and the server's."""
    import numpy as np
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    from pipeline.data import _objectstore, open_scan
    from pipeline.data.store import chunk_key

    arr, here = open_scan(remote).measurements, open_scan(local).measurements
    depth = arr.stored_depth
    sel = tuple(slice(0, depth) if axis == arr.d_axis else slice(None) for axis in range(len(arr.shape)))
    store, key = arr.array.store_path.store, chunk_key(arr.array, 0)
    size = len(sync(store.get(key, default_buffer_prototype())))
    ways = {
        f"raw GET of its {size / 1e6:.0f} MB (s3fs: HEAD + GET)":
            lambda: sync(store.get(key, default_buffer_prototype())),
        "zarr's read of the whole shard": lambda: np.asarray(arr.array[sel]),
        f"one GET + decode pool ({_objectstore.DECODE_THREADS} threads), finite check":
            lambda: _objectstore.read_whole_shard(arr, 0, check_finite=True),
        f"local disk: ScanArray.read of D 0:{depth} ({depth // arr.chunk_depth} chunk files)":
            lambda: here.read(slice(0, depth)),
    }
    rows = []
    for name, fn in ways.items():
        wall, cpu, server = [], [], []
        for _ in range(times):
            w0, c0, s0 = time.perf_counter(), time.process_time(), _server_cpu(server_pid)
            fn()
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
            server.append(_server_cpu(server_pid) - s0)
        server_ms = f"{statistics.median(server) * 1e3:.0f}" if "local" not in name else "—"
        rows.append([name, f"{statistics.median(wall) * 1e3:.0f}", f"{statistics.median(cpu) * 1e3:.0f}", server_ms])
    return rows


def _reconstruct(path: str, out: str) -> int:
    """``recon3d reconstruct --method adjoint`` of ``path`` to ``out``; the measurement bytes."""
    from pipeline.cli import main
    from pipeline.data import open_scan

    if main(["reconstruct", "--method", "adjoint", "--scan", path, "--out", out, "--workers", "2",
             "--no-progress", "--overwrite"]) != 0:
        raise RuntimeError(f"reconstruct {path} → {out} failed")
    return int(open_scan(path).group["measurements"].nbytes)


def _remove(url: str) -> None:
    """Delete ``url`` (a folder or zarr group, local or in the store) if it exists."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _raw_get_rate(url: str) -> float:
    """MB/s of plain GETs of the stored objects under ``url`` (compressed bytes, no decoding):
    what the server itself delivers to one client thread."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    keys = [k for k in fs.find(path) if "/c/" in k]
    t0 = time.perf_counter()
    total = sum(len(fs.cat_file(k)) for k in keys)
    return total / (time.perf_counter() - t0) / 1e6


def _measure(fn, counter: RequestCounter) -> tuple[int, float, int, int]:
    """``fn()``'s bytes, its seconds, the requests it made and its GETs of stored objects."""
    before, t0 = counter.settle(), time.perf_counter()
    gets = counter.object_gets
    nbytes = fn()
    seconds = time.perf_counter() - t0
    return nbytes, seconds, counter.settle() - before, counter.object_gets - gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=64, help="D of the MRI scan (64: about 0.57 GB)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of local and s3, alternated")
    parser.add_argument("--scratch", type=Path, default=None, help="local folder (default: a temporary one)")
    parser.add_argument("--stream-threads", type=int, default=2, help="reader threads of the stream")
    parser.add_argument("--shard-reads", type=int, default=7, help="reads of one shard each way (0: none)")
    args = parser.parse_args()

    import fsspec.config

    from pipeline.cli import main as recon3d
    from pipeline.data import inspect_scan

    server, endpoint, counter = start_server()
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    fsspec.config.conf["s3"] = dict(options)  # what --storage-options does for a command
    import s3fs

    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="recon3d-object-store-"))
    scratch.mkdir(parents=True, exist_ok=True)
    local, remote, chunked = str(scratch / "mri.zarr"), "s3://bench/mri.zarr", "s3://bench/mri-chunks.zarr"
    simulate = ["simulate", "mri", "--shape", str(args.depth), "256", "256", "--coils", "8", "--acceleration", "4",
                "--noise-sigma", "0.05", "--seed", "0", "--workers", "2", "--no-progress", "--overwrite"]
    targets = {"local": (local, str(scratch / "out.ome.zarr"), []), "s3": (remote, "s3://bench/out.ome.zarr", []),
               "s3 unsharded": (chunked, "s3://bench/out-chunks.ome.zarr", ["--shard-chunks", "0"])}
    try:
        s3fs.S3FileSystem(**options).mkdir("bench")
        setup = {}
        for label, (target, _, extra) in targets.items():
            t0, n0 = time.perf_counter(), counter.settle()
            if recon3d([*simulate, "--out", target, *extra]) != 0:
                raise RuntimeError(f"simulate → {target} failed")
            setup[label] = (time.perf_counter() - t0, counter.settle() - n0)
        info = inspect_scan(remote)
        size = sum(a.nbytes for a in info.arrays)
        shards = {a.name: a.shards for a in info.arrays}
        print(f"# object store (moto) vs local disk\n\n{machine_line()}\nload: {os.getloadavg()}\n"
              f"scan: MRI {args.depth}×256×256, 8 coils, {size / GIB:.2f} GiB decompressed; "
              f"s3 shards: {json.dumps({k: v for k, v in shards.items() if v})}")
        print("simulate: " + ", ".join(f"{lab} {sec:.1f} s" + (f" ({n / (size / GIB):.0f} requests/GiB written)"
                                                               if lab != "local" else "")
                                       for lab, (sec, n) in setup.items()))
        print(f"the server's plain GET rate (stored objects, compressed, one thread): "
              f"{_raw_get_rate(remote):.0f} MB/s")
        if args.shard_reads > 0:
            print_table(f"One whole shard (measurements, shard 0), median of {args.shard_reads} reads, "
                        f"load {os.getloadavg()[0]:.1f}",
                        ["how", "wall ms", "this process CPU ms", "server CPU ms"],
                        _shard_breakdown(remote, local, server.pid, args.shard_reads))
        threads = args.stream_threads
        work = {"sequential read": lambda p, o: _sequential(p),
                "sequential read by stored object": lambda p, o: _sequential_stored(p),
                f"stream ({threads} threads, order auto)": lambda p, o: _stream(p, threads),
                f"stream ({threads} threads, order auto), shards decoded by zarr":
                    lambda p, o: _stream_zarr_decode(p, threads),
                f"stream ({threads} threads, order shuffle)": lambda p, o: _stream(p, threads, "shuffle"),
                "reconstruct adjoint": _reconstruct}
        results: dict[str, dict[str, list[tuple[int, float, int, int]]]] = {k: {lab: [] for lab in targets}
                                                                          for k in work}
        for _ in range(args.repeat):
            for name, fn in work.items():
                for label, (path, out, _) in targets.items():
                    _remove(out)  # each round reconstructs anew (a complete output is not redone)
                    results[name][label].append(_measure(lambda: fn(path, out), counter))
        rows = []
        for name, per in results.items():
            rates = {lab: [b / s / 1e6 for b, s, _, _ in per[lab]] for lab in per}
            ratios = [s3 / lo for s3, lo in zip(rates["s3"], rates["local"])]
            on_s3 = [lab for lab in per if lab != "local"]
            requests = {lab: statistics.median(n / (b / GIB) for b, _, n, _ in per[lab]) for lab in on_s3}
            gets = {lab: statistics.median(g / (b / GIB) for b, _, _, g in per[lab]) for lab in on_s3}
            rows.append([name, " ".join(f"{r:.0f}" for r in rates["local"]), " ".join(f"{r:.0f}" for r in rates["s3"]),
                         " ".join(f"{r:.2f}" for r in ratios), f"{statistics.median(ratios):.2f}",
                         f"{requests['s3']:.0f}", f"{gets['s3']:.0f}",
                         " ".join(f"{r:.0f}" for r in rates["s3 unsharded"]), f"{requests['s3 unsharded']:.0f}"])
        print_table("Throughput, MB/s decompressed (each round: local, s3, s3 unsharded)",
                    ["what", "local MB/s", "s3 MB/s", "ratio per round", "median ratio", "s3 requests/GiB",
                     "s3 object GETs/GiB", "s3 unsharded MB/s", "unsharded requests/GiB"], rows)
        print(f"\nload after: {os.getloadavg()}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
