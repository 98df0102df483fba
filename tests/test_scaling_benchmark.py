"""``benchmarks/scaling.py --quick --json``: the 1 TiB table re-derived from its own rates.

The script measures per-voxel rates and extrapolates each stage of a 1 TiB scan as
``Σ work / rate``; this test runs it in a subprocess (no timing is asserted) and recomputes every
time, byte count and bound from the JSON's terms, rates and assumptions, so a change to the
arithmetic, a missing stage or a GPU count that does not speed anything up fails here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "simulate", "preprocess", "train 1 epoch", "reconstruct")
SCANS = ("ct_parallel", "ct_cone", "mri")
CODEC = {"codec_enc_ct", "codec_dec_ct", "codec_enc_mri", "codec_dec_mri"}
TiB = 1 << 40


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick", "--json", str(out),
                           "--gpu-rates", "cone_adj=7e9"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def test_every_stage_of_every_scan_is_there_once(result):
    pairs = [(r["scan"], r["stage"]) for r in result["rows"]]
    assert sorted(pairs) == sorted((s, st) for s in SCANS for st in STAGES)
    for scan in SCANS:  # and in the printed table
        for stage in STAGES:
            assert any(line.startswith(f"| {scan} ") and f"| {stage} " in line for line in result["stdout"].splitlines())


def test_the_scans_are_one_tebibyte(result):
    ct = result["scans"]["ct_parallel"]
    assert ct["N"] * ct["A"] * ct["N"] * 4 == TiB
    mri = result["scans"]["mri"]
    assert mri["C"] * mri["D"] * mri["H"] * mri["W"] * 8 == TiB
    ingest = {r["scan"]: r for r in result["rows"] if r["stage"] == "ingest"}
    assert ingest["ct_parallel"]["bytes_read"] == TiB  # raw projections in
    assert ingest["mri"]["bytes_read"] == 2 * TiB  # k-space and coil maps


def _cpu_time(row, result):
    total = 0.0
    for kernel, work in row["terms"]:
        scale = result["threads"] if result["clock"] == "cpu" else 1  # rates per CPU second
        rate = result["assumptions"]["local_io_gbs"] * 1e9 if kernel == "io" else result["cpu_rates"][kernel] * scale
        total += work / rate
    return total


def _gpu_time(row, result, gpus):
    a, cpu, gpu = result["assumptions"], result["cpu_rates"], result["gpu_rates"]
    nodes = math.ceil(gpus / a["gpus_per_node"])
    compute = codec = storage = 0.0
    for kernel, work in row["terms"]:
        if kernel == "io":
            storage += work / (a["node_io_gbs"] * 1e9 * nodes)
        elif kernel in CODEC:
            per_thread = cpu[kernel] if result["clock"] == "cpu" else cpu[kernel] / result["threads"]
            codec += work / (per_thread * a["codec_threads_per_node"] * nodes * a["efficiency"])
        else:
            compute += work / (gpu[kernel] * gpus * a["efficiency"])
    return max(compute, codec, storage), nodes


def test_times_are_work_over_rate(result):
    for row in result["rows"]:
        assert row["terms"], row
        for g in result["gpus"]:
            t = row["times"][str(g)]
            assert t["cpu_s"] == pytest.approx(_cpu_time(row, result), rel=1e-9)
            expect, nodes = _gpu_time(row, result, g)
            assert t["gpu_s"] == pytest.approx(expect, rel=1e-9)
            assert t["nodes"] == nodes
            assert t["gpu_groups"][t["gpu_bound"]] == pytest.approx(t["gpu_s"])


def test_stored_bytes_are_the_storage_terms(result):
    for row in result["rows"]:
        io = sum(w for k, w in row["terms"] if k == "io")
        assert io == pytest.approx(row["bytes_read"] + row["bytes_written"], rel=1e-9), row["stage"]


def test_more_gpus_is_faster_and_every_gpu_row_beats_this_cpu(result):
    assert result["gpus"] == [8, 64]
    for row in result["rows"]:
        t8, t64 = row["times"]["8"], row["times"]["64"]
        assert t64["gpu_s"] < t8["gpu_s"], row
        assert t64["nodes"] == 8 and t8["nodes"] == 1
        assert t8["gpu_s"] < t8["cpu_s"], row


def test_gpu_rates_are_the_recorded_ones_and_overridable(result):
    gpu, recorded = result["gpu_rates"], result["gpu_recorded"]
    assert recorded["par_fwd"] == 124.6e9 and recorded["par_adj"] == 165.8e9  # BENCHMARKS.md, H200
    assert recorded["cone_fwd"] == 12.3e9
    assert recorded["cone_adj"] == 7e9 and gpu["cone_adj"] == 7e9  # the --gpu-rates override
    speedup = recorded["ei_step_mri"] / result["cpu_rates"]["ei_step_mri"]
    for k in ("net_infer_ct", "net_infer_mri", "step_ct_net", "step_mri_net", "step_n2i_img"):
        assert gpu[k] == pytest.approx(result["cpu_rates"][k] * speedup)
    assert "recorded" in result["stdout"] and "not measured in this run" in result["stdout"]


def test_halo_overhead_and_memory_plan(result):
    for key in ("ct_parallel", "mri"):
        plan = result["reconstruct_plan"][key]
        assert plan["overhead"] >= 1.0 and plan["recompute"] >= 1.0
        from pipeline.reconstruct.memory import parse_bytes

        budget = parse_bytes(result["assumptions"]["memory_budget"])
        assert 0 < plan["estimated_peak"] <= budget
        row = next(r for r in result["rows"] if r["scan"] == key and r["stage"] == "reconstruct")
        net = next(w for k, w in row["terms"] if k.startswith("net_infer"))
        s = result["scans"][key]
        voxels = s["N"] ** 3 if key != "mri" else s["D"] * s["H"] * s["W"]
        assert net == pytest.approx(voxels * plan["overhead"] * plan["recompute"])


def test_bad_gpu_rate_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--quick", "--gpu-rates", "warp=9"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "--gpu-rates" in proc.stderr
