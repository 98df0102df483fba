"""The cost of a 1 TiB scan, written out: per-voxel rates measured here, extrapolated per stage.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scaling.py [--quick] [--threads T] [--json OUT]
                                                              [--gpu-rates KEY=VALUE,...]

Measured in this run, on small inputs, with ``--threads`` torch threads (default 1), each the
median of a few calls after a warm-up (``_common.time_call``), by default in this process's CPU
time (``--clock cpu``: a shared, loaded machine inflates wall time by up to 2× and CPU time far
less; the run prints the median wall / CPU ratio of its timed calls; ``--clock wall`` for
elapsed time):

* ``codec_*`` — zarr write (encode) and read (decode) of scan-like chunks with the codec
  recon3d writes by default (Blosc zstd level 3, byte shuffle, CRC32C: ``CodecConfig()``), to
  a scratch directory that the page cache holds (so the rate is the codec's, not a disk's):
  noisy CT line integrals (float32, chunks of 8 rows) and 4×-undersampled noisy 8-coil
  k-space (complex64, chunks of 2 slices); raw (decompressed) bytes per second, and the
  compression ratio;
* ``mri_fwdadj`` — ``MultiCoilMRI`` forward + adjoint, voxel·coils per second;
* ``par_fwd`` / ``par_adj`` / ``cone_fwd`` / ``cone_adj`` — ``ParallelBeamCT`` and
  ``ConeBeamCT`` voxel-ray updates per second (``N³·A / time``);
* ``net_infer_ct`` / ``net_infer_mri`` — the configs' model (``launch/configs/ct_ei.yaml``,
  ``mri_ei.yaml``: U-Net widths [16, 32] in artifact removal) backbone forward, untiled as
  ``recon3d reconstruct`` runs it by default, input voxels per second;
* training steps (``recon3d train``'s allocator, Adam, the configs' loss): ``ct_ei.yaml``
  (MC + EI, FBP initial) on an 8-slice slab at two angle counts and ``mri_ei.yaml`` at two
  coil counts, fitted as ``time / voxel = α + β·A`` (``α + β·C``): ``step_*_net`` is ``1/α``
  (voxels/s), ``step_*_op`` is ``1/β`` (voxel·angles or voxel·coils per second);
  ``ct_n2i.yaml`` in image mode (the only way cone-beam scans train) is ``step_n2i_img``.

Then, for a 1 TiB scan of each kind (shapes in ``SCANS``), each stage is a list of *terms*
``(kernel, work)``; its time on this machine is ``Σ work / rate`` (one process doing all of it,
one after the other), and on ``G`` GPUs in ``ceil(G / gpus_per_node)`` nodes it is the largest
of three overlapped pipelines: GPU compute ``Σ work / (gpu rate · G · efficiency)``, codec work
on the nodes' CPUs and storage traffic (see ``ASSUMPTIONS``). GPU rates are **recorded in
BENCHMARKS.md, not measured in this run** (``GPU_RATES``), overridable with ``--gpu-rates``.

Memory per rank of ``recon3d reconstruct --model`` comes from its own estimator
(:class:`pipeline.reconstruct.memory.MemoryModel`, :func:`~pipeline.reconstruct.memory.choose_slab`)
for the 1 TiB shapes, with the activation bytes per voxel measured on the configs' U-Net.

``--json OUT`` writes every rate, assumption, term and time, so the table can be re-derived
(``tests/test_scaling_benchmark.py`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine_line, print_table, time_call  # noqa: E402

TiB = 1 << 40
GiB = 1 << 30

#: H200 figures recorded in BENCHMARKS.md (units as the CPU rates: work per second).
GPU_RATES = {
    "par_fwd": 124.6e9,   # "Operators — CT (issue 3)", CUDA table, 256³ × 360
    "par_adj": 165.8e9,
    "cone_fwd": 12.3e9,
    "cone_adj": 6.6e9,
    # "Losses and models — memory of a training step (issue 5)": MC + EI + Adam step on a
    # 64×192×192 MRI slab (2.36 M voxels, 8 coils) takes 0.2 s on one H200: voxels per second.
    "ei_step_mri": 64 * 192 * 192 / 0.2,
    # NOT recorded anywhere: assumed. A multi-coil forward + adjoint moves ~50 bytes per voxel
    # per coil through HBM (coil image, FFTs, mask, coil sum); at ~2.5 TB/s effective: 5e10/s.
    "mri_fwdadj": 5e10,
}
GPU_RATE_SOURCE = {
    "par_fwd": "recorded (BENCHMARKS.md, Operators — CT (issue 3), H200, 256³×360)",
    "par_adj": "recorded (same table)",
    "cone_fwd": "recorded (same table)",
    "cone_adj": "recorded (same table)",
    "ei_step_mri": "recorded (BENCHMARKS.md, Losses and models (issue 5): 0.2 s per 64×192×192 MRI EI step, H200)",
    "mri_fwdadj": "ASSUMED, not recorded (≈50 B per voxel·coil through HBM at 2.5 TB/s)",
}

#: Every assumption the extrapolation makes (overridable where a flag says so).
ASSUMPTIONS = {
    "gpus_per_node": 8,
    "efficiency": 0.9,            # parallel efficiency of the slab-parallel stages over ranks
    "node_io_gbs": 5.0,           # storage read+write bandwidth per node, GB/s
    "local_io_gbs": 0.45,         # this machine's disk (BENCHMARKS.md, Training (issue 6): ~450 MB/s)
    "codec_threads_per_node": 32,  # CPU threads per GPU node decoding/encoding chunks
    "epochs": 1,
    # K of derived/n2i: preprocess --n2i-splits K as ct_n2i.yaml's num_splits (the script reads it)
    # reconstruct --memory-budget of the plan: the CLI default (1 GiB) does not fit even one
    # 16-slice chunk of these shapes (the memory table shows it; MRI's k-space and coil maps
    # alone are 2 GiB per slice), so the plan takes 64 GiB per rank.
    "memory_budget": "64GiB",
    # reconstruct --tile candidates (overlap 2 × the receptive radius, exact); see memory_models
    "tiles": [(128, 256, 256), (256, 512, 512)],
}

#: The 1 TiB scans. CT: float32 projections (rows D, angles A, columns U), volume N³.
#: MRI: complex64 k-space (C, D, kH, kW), stored with coil maps of the same size.
SCANS = {
    "ct_parallel": {"N": 4096, "A": 16384},
    "ct_cone": {"N": 4096, "A": 16384},
    "mri": {"C": 32, "D": 1024, "H": 2048, "W": 2048},
}


# ----------------------------------------------------------------------------- measurements
#: ``cpu``: this process's CPU time (user + system, all its threads), which a loaded machine
#: inflates far less than wall time; ``wall``: elapsed time. Set by ``--clock``.
CLOCK = "cpu"
#: (wall s, CPU s) of every timed call, to report how contended the run was.
TIMED: list[tuple[float, float]] = []


def _once(fn) -> float:
    """One call of ``fn`` in :data:`CLOCK` (its wall time through ``_common.time_call``)."""
    c0 = time.process_time()
    wall = time_call(fn, repeat=1, warmup=0)
    cpu = time.process_time() - c0
    TIMED.append((wall, cpu))
    return cpu if CLOCK == "cpu" else wall


def _time(fn, repeat: int) -> float:
    """Median of ``repeat`` calls after one warm-up, in :data:`CLOCK`."""
    fn()
    return statistics.median(_once(fn) for _ in range(repeat))


def _scan_like_ct(d: int, n: int, angles: int) -> torch.Tensor:
    from operators3d import shepp_logan_3d
    from operators3d.ct import ParallelBeamCT

    theta = torch.arange(angles, dtype=torch.float64) * (math.pi / angles)
    op = ParallelBeamCT(volume_shape=(d, n, n), angles=theta)
    with torch.no_grad():
        clean = op(shepp_logan_3d((d, n, n)).float())
    gen = torch.Generator().manual_seed(0)
    return clean + 0.01 * float(clean.abs().max()) * torch.randn(clean.shape, generator=gen)


def _mri_problem(coils: int, d: int, n: int):
    from operators3d import MultiCoilMRI, poisson_disc_mask, shepp_logan_3d, simulate_coil_maps

    gen = torch.Generator().manual_seed(0)
    maps = simulate_coil_maps(coils, (d, n, n))
    mask = poisson_disc_mask((n, n), 4, calibration=max(8, n // 10), generator=gen)
    op = MultiCoilMRI(mask=mask, coil_maps=maps)
    with torch.no_grad():
        clean = op(shepp_logan_3d((d, n, n)).to(torch.complex64))
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.complex64)
    y = (clean + 0.01 * float(clean.abs().max()) * noise) * mask.to(clean.dtype)
    return op, y


def measure_codec(data: torch.Tensor, chunk_depth: int, d_axis: int, scratch: str, repeat: int) -> dict:
    """Encode and decode rates (raw bytes/s) and the compression ratio of ``data`` with the default codec."""
    import zarr

    from pipeline.data.format import CodecConfig

    arr_np = data.numpy()
    chunks = list(arr_np.shape)
    chunks[d_axis] = chunk_depth
    path = tempfile.mkdtemp(dir=scratch)
    group = zarr.open_group(path, mode="w")
    arr = group.create_array("a", shape=arr_np.shape, chunks=tuple(chunks), dtype=arr_np.dtype,
                             compressors=CodecConfig().compressors(), config={"write_empty_chunks": True})

    def write():
        arr[...] = arr_np

    t_enc = _time(write, repeat)
    t_dec = _time(lambda: arr[...], repeat)
    stored = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name != "zarr.json")
    shutil.rmtree(path)
    return {"encode": arr_np.nbytes / t_enc, "decode": arr_np.nbytes / t_dec, "ratio": arr_np.nbytes / stored}


def measure_operators(quick: bool, repeat: int) -> dict:
    from operators3d.ct import ConeBeamCT, ParallelBeamCT, min_det_shape

    rates = {}
    c, d, n = (4, 8, 64) if quick else (8, 16, 256)
    op, y = _mri_problem(c, d, n)
    x = torch.randn((d, n, n), dtype=torch.complex64)
    with torch.no_grad():
        t = _time(lambda: op.adjoint(op(x)), repeat)
    rates["mri_fwdadj"] = c * d * n * n / t
    n, a = (48, 48) if quick else (128, 180)
    par = ParallelBeamCT(volume_shape=(n, n, n), angles=torch.arange(a, dtype=torch.float64) * math.pi / a)
    n_c, a_c = (24, 24) if quick else (64, 96)
    geo = dict(volume_shape=(n_c,) * 3, angles=torch.arange(a_c, dtype=torch.float64) * 2 * math.pi / a_c,
               src_dist=3.0 * n_c, det_dist=1.0 * n_c, det_spacing=4 / 3)
    cone = ConeBeamCT(det_shape=min_det_shape(**geo), **geo)
    for name, op, size, angles in (("par", par, n, a), ("cone", cone, n_c, a_c)):
        vol = torch.randn(op.domain_shape)
        with torch.no_grad():
            sino = op(vol)
            rates[f"{name}_fwd"] = size**3 * angles / _time(lambda: op(vol), repeat)
            rates[f"{name}_adj"] = size**3 * angles / _time(lambda: op.adjoint(sino), repeat)
    return rates


def _config(name: str):
    from pipeline.train.config import load_config

    return load_config(ROOT / "launch" / "configs" / name)


def _facts(modality: str, geometry: str):
    from pipeline.train.build import ScanFacts

    return ScanFacts(modality, geometry, None, 2 if modality == "mri" else 1)


def measure_inference(quick: bool, repeat: int) -> dict:
    """The configs' backbone forward (no grad), untiled, on an input slab: voxels/s."""
    from pipeline.models.receptive import _backbones, reconstructor_of
    from pipeline.train.build import build_model

    rates = {}
    d, n = (8, 32) if quick else (24, 128)  # about the 27 input slices of an 8-slice output slab, halo 9
    for key, cfg_name, facts in (("ct", "ct_ei.yaml", _facts("ct", "parallel")), ("mri", "mri_ei.yaml", _facts("mri", "cartesian"))):
        model = build_model(_config(cfg_name).model, facts).eval()
        backbone = _backbones(reconstructor_of(model))[0]
        x = torch.randn(1, facts.channels, d, n, n)
        with torch.no_grad():
            rates[f"net_infer_{key}"] = d * n * n / _time(lambda: backbone(x), repeat)
    return rates


def _step(cfg_name: str, facts, op, y):
    """One training step of ``cfg_name``'s model and loss (Adam), as ``pipeline/train/loop.py`` builds them."""
    from pipeline.train.build import build_loss, build_model

    torch.manual_seed(0)
    cfg = _config(cfg_name)
    loss = build_loss(cfg.loss, facts, seed=0)
    model = loss.adapt_model(build_model(cfg.model, facts)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = loss(model(y, op), y, op, model)
        out.total.backward()
        optimizer.step()

    return step


def _interleaved(steps: dict, repeat: int) -> dict:
    """Median time of each step, the steps timed in turn (so a load change hits all alike)."""
    for fn in steps.values():
        fn()  # warm-up: Adam's state, kernels, tables
    samples: dict = {k: [] for k in steps}
    for _ in range(repeat):
        for k, fn in steps.items():
            samples[k].append(_once(fn))
    return {k: statistics.median(v) for k, v in samples.items()}


def _fit(x1: float, t1: float, x2: float, t2: float, voxels: int) -> tuple[float, float, bool]:
    """``time / voxel = α + β·x`` through two points, and whether β was floored: at 1 % of the
    time per voxel and unit at ``x2``, so a noisy pair never gives a negative or zero cost."""
    raw = (t2 - t1) / (x2 - x1) / voxels
    beta = max(raw, 0.01 * t2 / voxels / x2)
    alpha = max(t1 / voxels - beta * x1, 1e-12)
    return alpha, beta, beta > raw


def measure_training(quick: bool, repeat: int) -> dict:
    from operators3d import shepp_logan_3d
    from operators3d.ct import ParallelBeamCT

    d, n = (4, 32) if quick else (8, 96)
    voxels = d * n * n
    angle_pair, coil_pair = ((16, 64), (2, 8)) if quick else ((30, 360), (2, 16))
    x = shepp_logan_3d((d, n, n)).float()
    steps = {}
    for a in angle_pair:
        op = ParallelBeamCT(volume_shape=(d, n, n), angles=torch.arange(a, dtype=torch.float64) * math.pi / a)
        with torch.no_grad():
            y = op(x)
        steps[f"ct_{a}"] = _step("ct_ei.yaml", _facts("ct", "parallel"), op, y.unsqueeze(0))
    for c in coil_pair + ((8,) if 8 not in coil_pair else ()):
        op, y = _mri_problem(c, d, n)
        steps[f"mri_{c}"] = _step("mri_ei.yaml", _facts("mri", "cartesian"), op, y.unsqueeze(0))
    k = _config("ct_n2i.yaml").loss.terms[0].num_splits
    steps["n2i_image"] = _step("ct_n2i.yaml", _facts("ct", "cone"), None, torch.randn(1, k, d, n, n))
    t = _interleaved(steps, max(repeat, 1) + (0 if quick else 2))
    rates: dict[str, float] = {}
    alpha, beta, ct_floored = _fit(angle_pair[0], t[f"ct_{angle_pair[0]}"], angle_pair[1], t[f"ct_{angle_pair[1]}"],
                                   voxels)
    rates["step_ct_net"], rates["step_ct_op"] = 1 / alpha, 1 / beta
    alpha, beta, mri_floored = _fit(coil_pair[0], t[f"mri_{coil_pair[0]}"], coil_pair[1], t[f"mri_{coil_pair[1]}"],
                                    voxels)
    rates["step_mri_net"], rates["step_mri_op"] = 1 / alpha, 1 / beta
    rates["ei_step_mri"] = voxels / t["mri_8"]  # the recorded GPU figure's counterpart (8 coils)
    rates["step_n2i_img"] = voxels / t["n2i_image"]
    return {"rates": rates, "slab": [d, n, n], "angles": list(angle_pair), "coils": list(coil_pair), "step_s": t,
            "beta_floored": [name for name, f in (("ct", ct_floored), ("mri", mri_floored)) if f]}


# ----------------------------------------------------------------------------- memory per rank
def memory_models(scans: dict, tiles: list[tuple[int, int, int]]) -> tuple[dict, list[list[object]], dict]:
    """Reconstruct's memory estimator for the 1 TiB shapes: per-rank peak against slab and tile,
    the halo overhead, and the slab ``choose_slab`` picks from a budget.

    The plan (what the stage times use) is, among untiled and ``tiles``, the choice whose slab
    from ``ASSUMPTIONS["memory_budget"]`` computes the fewest voxels per output voxel
    (halo overhead × tile recompute)."""
    from pipeline.models.receptive import _backbones, model_halo, reconstructor_of
    from pipeline.models.tiling import TiledBackbone
    from pipeline.reconstruct.halo import _input, _slabs
    from pipeline.reconstruct.memory import (MemoryModel, activation_bytes_per_voxel, choose_slab, first_width,
                                             format_bytes, parse_bytes, piece_workspace, rolling_activation_bytes,
                                             ROLLED_HEAP)
    from pipeline.train.build import build_model

    rows, plan, info = [], {}, {}
    budget = parse_bytes(ASSUMPTIONS["memory_budget"])
    for key, cfg_name, facts in (("ct_parallel", "ct_ei.yaml", _facts("ct", "parallel")),
                                 ("mri", "mri_ei.yaml", _facts("mri", "cartesian"))):
        model = build_model(_config(cfg_name).model, facts)
        radius, multiple, _ = model_halo(model)
        backbones = _backbones(reconstructor_of(model))
        per_voxel = activation_bytes_per_voxel(backbones, facts.channels, multiple, torch.device("cpu"))
        s = scans[key]
        if key == "mri":
            shape = (s["D"], s["H"], s["W"])
            data, image = 2 * s["C"] * s["H"] * s["W"] * 8, s["H"] * s["W"] * 8  # k-space + coil maps
        else:
            shape = (s["N"],) * 3
            data, image = s["A"] * s["N"] * 4, s["N"] ** 2 * 4
        # untiled on CPU the backbone rolls along D (pipeline.models.rolling): output bytes per
        # voxel plus a few slices per layer; tiles are estimated as whole passes (an upper bound)
        rolled = rolling_activation_bytes(backbones, facts.channels, multiple, shape[1:])
        info[key] = {"halo": radius, "multiple": multiple, "activation_bytes_per_voxel": per_voxel,
                     "rolled_bytes_per_voxel": rolled[0], "rolled_bytes_per_plane_voxel": rolled[1],
                     "data_bytes_per_slice": data, "image_bytes_per_slice": image}

        def overhead(slab: int) -> float:
            return sum(hi - lo for lo, hi in (_input(a, b, radius, multiple, shape[0])
                                              for a, b in _slabs(shape[0], slab))) / shape[0]

        best = None
        for t in [None, *tiles]:
            mm = MemoryModel(shape=shape, data_per_slice=data, image_per_slice=image,
                             activation_per_voxel=per_voxel if t else rolled[0],
                             activation_per_plane=0.0 if t else rolled[1], tile=t, tiles_per_batch=1, staged=True,
                             workers=1, workspace=piece_workspace(first_width(backbones)) + (0 if t else ROLLED_HEAP))
            tiled = TiledBackbone(backbones[0], tile_shape=t, overlap=2 * radius) if t else None

            def recompute(slab: int) -> float:
                return tiled.recompute_factor((mm.input_slices(slab, radius, multiple),) + shape[1:]) if tiled else 1.0

            try:
                slab = choose_slab(mm, budget, chunk=16, halo=radius, multiple=multiple)
            except ValueError:
                slab = None
            for d in sorted({8, 16, 64, 256} | ({slab} if slab else set())):
                rows.append([key, "none" if t is None else "×".join(map(str, t)), d, mm.input_slices(d, radius, multiple),
                             f"{overhead(d):.2f}", f"{recompute(d):.2f}", format_bytes(mm.estimate(d, radius, multiple)),
                             "← chosen from the budget" if d == slab else ""])
            if slab is not None:
                cost = overhead(slab) * recompute(slab)
                if best is None or cost < best["overhead"] * best["recompute"]:
                    best = {"tile": list(t) if t else None, "slab": slab, "overhead": overhead(slab),
                            "recompute": recompute(slab), "estimated_peak": mm.estimate(slab, radius, multiple)}
        if best is None:
            raise RuntimeError(f"{key}: no tile of {tiles} fits --memory-budget {format_bytes(budget)}")
        plan[key] = best
    return plan, rows, info


# ----------------------------------------------------------------------------- the 1 TiB model
COMPUTE = ("par_fwd", "par_adj", "cone_fwd", "cone_adj", "mri_fwdadj", "net_infer_ct", "net_infer_mri",
           "step_ct_net", "step_ct_op", "step_mri_net", "step_mri_op", "step_n2i_img")
NETWORK = ("net_infer_ct", "net_infer_mri", "step_ct_net", "step_mri_net", "step_n2i_img")
CODEC = ("codec_enc_ct", "codec_dec_ct", "codec_enc_mri", "codec_dec_mri")


def gpu_rates(cpu: dict, recorded: dict) -> dict:
    """Per-GPU rates of every compute kernel. Operators: ``recorded``. Network kernels: the CPU
    rate times the recorded EI step's speed-up (recorded H200 step ÷ this run's CPU step, same
    loss and network). A training step's operator part (``step_*_op``): its CPU rate times the
    operator's speed-up (CPU ÷ GPU time of a forward + adjoint pair)."""
    out = {k: recorded[k] for k in ("par_fwd", "par_adj", "cone_fwd", "cone_adj", "mri_fwdadj")}
    speedup = recorded["ei_step_mri"] / cpu["ei_step_mri"]
    for k in NETWORK:
        out[k] = cpu[k] * speedup
    pair = lambda r: 1 / r["par_fwd"] + 1 / r["par_adj"]  # noqa: E731
    out["step_ct_op"] = cpu["step_ct_op"] * pair(cpu) / pair(recorded)
    out["step_mri_op"] = cpu["step_mri_op"] * cpu["mri_fwdadj"] ** -1 / recorded["mri_fwdadj"] ** -1
    out["network_speedup"] = speedup
    return out


def stages(scans: dict, ratio: dict, plan: dict, k_n2i: int) -> list[dict]:
    """Every stage of every 1 TiB scan as terms ``[kernel, work]`` (``io``: stored bytes)."""
    rows = []

    def add(scan, stage, terms, read, written, note=""):
        rows.append({"scan": scan, "stage": stage, "terms": [[k, float(w)] for k, w in terms if w],
                     "bytes_read": float(read), "bytes_written": float(written), "note": note})

    for key in ("ct_parallel", "ct_cone"):
        n, a = scans[key]["N"], scans[key]["A"]
        v, p, img = n**3, n * a * n * 4, n**3 * 4
        r = ratio["ct"]
        kind = "par" if key == "ct_parallel" else "cone"
        add(key, "ingest", [("io", p), ("codec_enc_ct", p), ("io", p / r)], p, p / r,
            "reads raw float32 projections, writes them compressed")
        add(key, "simulate", [(f"{kind}_fwd", v * a), ("codec_enc_ct", p), ("io", p / r)], 0, p / r,
            "one forward projection of the volume (the reference volume it also writes is not counted)")
        derived = img * (1 + k_n2i)
        add(key, "preprocess", [("io", p / r), ("codec_dec_ct", p), (f"{kind}_adj", 2 * v * a),
                                ("codec_enc_ct", derived), ("io", derived / r)], p / r, derived / r,
            f"FBP/FDK + {k_n2i} Noise2Inverse FBPs of A/{k_n2i} angles each = 2 backprojections")
        if key == "ct_parallel":
            add(key, "train 1 epoch", [("io", p / r), ("codec_dec_ct", p), ("step_ct_net", v), ("step_ct_op", v * a)],
                p / r, 0, "ct_ei.yaml: MC + EI, every slab once")
            ov, rec = plan["ct_parallel"]["overhead"], plan["ct_parallel"]["recompute"]
            add(key, "reconstruct", [("io", p * ov / r), ("codec_dec_ct", p * ov), ("par_adj", v * a * ov),
                                     ("net_infer_ct", v * ov * rec), ("codec_enc_ct", img), ("io", img / r)],
                p * ov / r, img / r, f"--model: FBP initial + U-Net on input slabs (halo overhead {ov:.2f}×, tiles {rec:.2f}×)")
        else:
            stack = img * k_n2i
            add(key, "train 1 epoch", [("io", stack / r), ("codec_dec_ct", stack), ("step_n2i_img", v)], stack / r, 0,
                f"ct_n2i.yaml in image mode on derived/n2i (K = {k_n2i}): cone slabs have no operator")
            add(key, "reconstruct", [("io", img / r), ("codec_dec_ct", img), ("codec_enc_ct", img), ("io", img / r)],
                img / r, img / r, "--method fdk copies derived/fbp (a model is refused: cone rays cross slabs)")
    s = scans["mri"]
    c, v = s["C"], s["D"] * s["H"] * s["W"]
    ks = c * v * 8
    both = 2 * ks  # k-space + coil maps of the same shape
    r = ratio["mri"]
    add("mri", "ingest", [("io", both), ("codec_enc_mri", both), ("io", both / r)], both, both / r,
        "k-space and coil maps (2 × 1 TiB raw)")
    add("mri", "simulate", [("mri_fwdadj", 0.5 * c * v), ("codec_enc_mri", both), ("io", both / r)], 0, both / r,
        "one forward (half of a forward + adjoint pair)")
    add("mri", "preprocess", [("io", both / r), ("codec_dec_mri", both), ("mri_fwdadj", 0.5 * c * v),
                              ("codec_enc_mri", v * 8), ("io", v * 8 / r)], both / r, v * 8 / r,
        "derived/adjoint: zero-filled Aᴴy, complex64")
    add("mri", "train 1 epoch", [("io", both / r), ("codec_dec_mri", both), ("step_mri_net", v), ("step_mri_op", v * c)],
        both / r, 0, "mri_ei.yaml: MC + EI, every slab once")
    ov, rec = plan["mri"]["overhead"], plan["mri"]["recompute"]
    add("mri", "reconstruct", [("io", both * ov / r), ("codec_dec_mri", both * ov), ("mri_fwdadj", 0.5 * c * v * ov),
                               ("net_infer_mri", v * ov * rec), ("codec_enc_ct", v * 4), ("io", v * 4 / ratio["ct"])],
        both * ov / r, v * 4 / ratio["ct"],
        f"--model: Aᴴy initial + U-Net (halo overhead {ov:.2f}×, tiles {rec:.2f}×); writes the float32 magnitude")
    # the MRI reconstruct writes a float32 image: its stored bytes use the CT (float32) ratio
    return rows


def times(row: dict, cpu: dict, gpu: dict, assumptions: dict, threads: int, gpus: int, clock: str) -> dict:
    """This machine's time (every term one after the other) and the time on ``gpus`` GPUs (the
    slowest of three overlapped pipelines: GPU compute, codec on the nodes' CPUs, storage).

    With ``clock == "cpu"`` a rate is work per CPU second: this machine's time is the CPU
    seconds over ``threads`` (perfect scaling assumed) and one codec thread runs at the rate;
    with ``"wall"`` the rate is the ``threads``-thread rate and one codec thread gets 1/threads."""
    cpu_terms = {}
    for k, w in row["terms"]:
        rate = assumptions["local_io_gbs"] * 1e9 if k == "io" else cpu[k] * (threads if clock == "cpu" else 1)
        cpu_terms[k] = cpu_terms.get(k, 0.0) + w / rate
    nodes = math.ceil(gpus / assumptions["gpus_per_node"])
    eff = assumptions["efficiency"]
    per_thread = 1 if clock == "cpu" else threads
    groups = {"gpu compute": 0.0, "codec (node CPUs)": 0.0, "storage": 0.0}
    for k, w in row["terms"]:
        if k == "io":
            groups["storage"] += w / (assumptions["node_io_gbs"] * 1e9 * nodes)
        elif k in CODEC:
            groups["codec (node CPUs)"] += w / (cpu[k] / per_thread * assumptions["codec_threads_per_node"] * nodes * eff)
        elif k in COMPUTE:
            groups["gpu compute"] += w / (gpu[k] * gpus * eff)
        else:
            raise KeyError(f"stage {row['stage']!r} of {row['scan']!r}: unknown kernel {k!r}")
    bound = max(groups, key=groups.get)
    return {"cpu_s": sum(cpu_terms.values()), "cpu_bound": max(cpu_terms, key=cpu_terms.get),
            "nodes": nodes, "gpu_s": groups[bound], "gpu_bound": bound, "gpu_groups": groups}


def _duration(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def _tib(b: float) -> str:
    return f"{b / TiB:.2f} TiB" if b >= TiB / 100 else f"{b / GiB:.1f} GiB"


def _parse_rates(text: str | None) -> dict:
    rates = dict(GPU_RATES)
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in GPU_RATES or not value:
            raise SystemExit(f"--gpu-rates: KEY=VALUE with KEY in {sorted(GPU_RATES)}, got {item!r}")
        rates[key.strip()] = float(value)
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs (< 30 s; for the test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every measurement (default 1)")
    parser.add_argument("--json", help="write rates, assumptions, terms and times here")
    parser.add_argument("--gpu-rates", help="override recorded GPU rates: KEY=VALUE,... (keys: %s)" % ", ".join(GPU_RATES))
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time kernels by this process's CPU time (default: robust on a shared machine) or wall time")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed calls per kernel (median; default 3, --quick 1); training steps take 2 more rounds")
    parser.add_argument("--scratch", default=None, help="directory for the codec's scratch arrays (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = args.clock
    TIMED.clear()
    from pipeline.allocator import keep_freed_memory

    keep_freed_memory()  # as recon3d train and reconstruct --memory fast
    recorded = _parse_rates(args.gpu_rates)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    repeat = args.repeat or (1 if args.quick else 3)
    scratch = tempfile.mkdtemp(prefix="recon3d-scaling-", dir=args.scratch)
    try:
        ct_data = _scan_like_ct(8, 64, 48) if args.quick else _scan_like_ct(32, 256, 360)
        _, mri_y = _mri_problem(4, 4, 64) if args.quick else _mri_problem(8, 16, 256)
        ct_codec = measure_codec(ct_data, 8, 0, scratch, repeat)
        mri_codec = measure_codec(mri_y, 2, 1, scratch, repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cpu = {"codec_enc_ct": ct_codec["encode"], "codec_dec_ct": ct_codec["decode"],
           "codec_enc_mri": mri_codec["encode"], "codec_dec_mri": mri_codec["decode"]}
    ratio = {"ct": ct_codec["ratio"], "mri": mri_codec["ratio"]}
    cpu.update(measure_operators(args.quick, repeat))
    cpu.update(measure_inference(args.quick, repeat))
    training = measure_training(args.quick, repeat)
    cpu.update(training["rates"])
    gpu = gpu_rates(cpu, recorded)
    k_n2i = _config("ct_n2i.yaml").loss.terms[0].num_splits
    plan, memory_rows, memory_info = memory_models(SCANS, [tuple(t) for t in ASSUMPTIONS["tiles"]])
    rows = stages(SCANS, ratio, plan, k_n2i)
    for row in rows:
        row["times"] = {str(g): times(row, cpu, gpu, ASSUMPTIONS, args.threads, g, args.clock) for g in args.gpus}
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_start

    units = {"codec": "raw GB/s", "mri_fwdadj": "voxel·coils/s", "par": "GUPS", "cone": "GUPS",
             "net": "voxels/s", "step_ct_op": "voxel·angles/s", "step_mri_op": "voxel·coils/s", "step": "voxels/s",
             "ei_step_mri": "voxels/s"}

    def unit(k):
        return units.get(k) or units.get(k.split("_")[0]) or ""

    def show(k, r):
        return f"{r / 1e9:.3g}" if unit(k) in ("raw GB/s", "GUPS") else f"{r:.3g}"

    print(f"# benchmarks/scaling.py{' --quick' if args.quick else ''} — {machine_line()}")
    contention = statistics.median(w / max(c, 1e-9) for w, c in TIMED)
    print(f"threads {args.threads} (used for every CPU rate); clock {args.clock} (rates are work per "
          f"{'CPU second of this process' if args.clock == 'cpu' else 'wall second'}); load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after; wall / CPU time of the timed calls: median {contention:.2f}; {elapsed:.0f} s")
    print_table("Rates measured in this run (CPU) and the per-GPU rates used",
                ["kernel", "unit", "this CPU", "per GPU", "GPU source"],
                [[k, unit(k), show(k, cpu[k]), show(k, gpu[k]) if k in gpu else "(node CPUs)",
                  GPU_RATE_SOURCE.get(k, "derived: × network speed-up %.0f" % gpu["network_speedup"]
                                      if k in NETWORK else ("derived: CPU rate × operator speed-up" if k in gpu else "—"))]
                 for k in sorted(cpu)])
    print(f"\ncompression ratio (default codec, this run's data): CT {ratio['ct']:.2f}, MRI {ratio['mri']:.2f}")
    d, n, _ = training["slab"]
    print(f"training steps on a {d}×{n}×{n} slab (median s, steps timed in turn): "
          + ", ".join(f"{k} {v:.3f}" for k, v in training["step_s"].items())
          + f"; fitted per voxel: CT α = {1e6 / cpu['step_ct_net']:.2f} µs + β = {1e9 / cpu['step_ct_op']:.2f} ns × angles, "
          f"MRI α = {1e6 / cpu['step_mri_net']:.2f} µs + β = {1e9 / cpu['step_mri_op']:.2f} ns × coils"
          + (f" (β floored for {', '.join(training['beta_floored'])}: the larger case was not slower; "
             "rerun on a quieter machine)" if training["beta_floored"] else ""))
    print_table("Memory per rank of recon3d reconstruct --model on the 1 TiB shapes (pipeline/reconstruct/memory.py)",
                ["scan", "tile", "output slab", "input slices", "halo overhead", "tile recompute", "estimated peak", ""],
                memory_rows)
    for key, info in memory_info.items():
        p = plan[key]
        print(f"{key}: halo {info['halo']}, grid {info['multiple']}, {info['activation_bytes_per_voxel']:.0f} "
              f"activation B/voxel whole (tiles), {info['rolled_bytes_per_voxel']:.0f} B/voxel + "
              f"{info['rolled_bytes_per_plane_voxel']:.0f} B/plane voxel rolled (untiled; measured), "
              f"{info['data_bytes_per_slice'] / GiB:.2f} GiB data and "
              f"{info['image_bytes_per_slice'] / 2**20:.0f} MiB image per slice; plan at --memory-budget "
              f"{ASSUMPTIONS['memory_budget']}: tile {p['tile']}, slab {p['slab']}, {p['overhead']:.2f}× halo × "
              f"{p['recompute']:.2f}× tile recompute")
    header = ["scan", "stage", "read (stored)", "written (stored)", "this CPU", "CPU bound"]
    for g in args.gpus:
        header += [f"{g} GPUs", "nodes", "bound"]
    table = []
    for row in rows:
        line = [row["scan"], row["stage"], _tib(row["bytes_read"]), _tib(row["bytes_written"]),
                _duration(row["times"][str(args.gpus[0])]["cpu_s"]), row["times"][str(args.gpus[0])]["cpu_bound"]]
        for g in args.gpus:
            t = row["times"][str(g)]
            line += [_duration(t["gpu_s"]), t["nodes"], t["gpu_bound"]]
        table.append(line)
    print_table("A 1 TiB scan, per stage: CT 4096³ from 4096 rows × 16384 angles × 4096 columns float32; "
                "MRI 32 coils × 1024×2048×2048 complex64 (+ coil maps of the same size)", header, table)
    print("\nGPU rates are recorded in BENCHMARKS.md (H200), not measured in this run; "
          f"mri_fwdadj on GPU is assumed. Assumptions: {json.dumps(ASSUMPTIONS)}; the network kernels' GPU rates "
          f"are this run's CPU rates × {gpu['network_speedup']:.0f} (recorded H200 EI step ÷ this run's CPU EI step); "
          "every stage is parallel over D-slabs (training: data parallel over slabs); cone-beam FDK's row blocks "
          "are counted without read amplification.")
    result = {"machine": machine_line(), "threads": args.threads, "quick": args.quick, "clock": args.clock,
              "wall_over_cpu": contention,
              "load": [load_before[0], load_after[0]], "seconds": elapsed, "cpu_rates": cpu, "gpu_rates": gpu,
              "gpu_recorded": recorded, "gpu_rate_source": GPU_RATE_SOURCE, "compression_ratio": ratio,
              "assumptions": {**ASSUMPTIONS, "tiles": [list(t) for t in ASSUMPTIONS["tiles"]]},
              "scans": SCANS, "reconstruct_plan": plan, "memory": memory_info, "training": training,
              "n2i_splits": k_n2i, "gpus": args.gpus, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
