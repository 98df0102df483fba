"""Threads per rank from the CPUs a process may use (pipeline/threads.py, issue 17.5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.threads import (CpuBudget, available_cpus, cgroup_cpu_quota, choose_threads, cpu_budget,
                              local_world_size, threads_per_rank)

ROOT = Path(__file__).resolve().parents[2]


def _files(files: dict[str, str]):
    """A ``read`` that sees only ``files`` (path → text)."""
    return lambda path: files.get(path)


def _budget(cpus: int, affinity: int | None = None, quota: float | None = None) -> CpuBudget:
    return CpuBudget(cpu_count=cpus, affinity=affinity, quota=quota)


# ------------------------------------------------------------------ cgroup quota
def test_cgroup_v2_max_is_no_limit():
    assert cgroup_cpu_quota(_files({"/sys/fs/cgroup/cpu.max": "max 100000\n"})) is None


def test_cgroup_v2_quota_in_cpus_rounds_down_to_whole_cpus():
    read = _files({"/sys/fs/cgroup/cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(read) == 1.5
    assert available_cpus(read=read, affinity=lambda: 8, cpu_count=lambda: 8) == 1


def test_cgroup_v2_own_cgroup_path_and_smallest_quota():
    read = _files({"/proc/self/cgroup": "0::/job/step\n",
                   "/sys/fs/cgroup/job/step/cpu.max": "200000 100000",
                   "/sys/fs/cgroup/cpu.max": "400000 100000"})
    assert cgroup_cpu_quota(read) == 2.0


def test_cgroup_v1_quota_and_unlimited():
    v1 = "/sys/fs/cgroup/cpu,cpuacct"
    assert cgroup_cpu_quota(_files({f"{v1}/cpu.cfs_quota_us": "300000\n",
                                    f"{v1}/cpu.cfs_period_us": "100000\n"})) == 3.0
    assert cgroup_cpu_quota(_files({f"{v1}/cpu.cfs_quota_us": "-1\n",
                                    f"{v1}/cpu.cfs_period_us": "100000\n"})) is None


def test_no_cgroup_files_no_quota_and_garbage_ignored():
    assert cgroup_cpu_quota(_files({})) is None
    assert cgroup_cpu_quota(_files({"/sys/fs/cgroup/cpu.max": "lots\n"})) is None


# ------------------------------------------------------------------ available CPUs
def test_affinity_smaller_than_cpu_count_wins():
    budget = cpu_budget(read=_files({}), affinity=lambda: 3, cpu_count=lambda: 64)
    assert budget.available == 3
    assert "affinity 3" in budget.describe() and "cgroup quota none" in budget.describe()


def test_unknown_affinity_and_cpu_count_still_give_one():
    assert cpu_budget(read=_files({}), affinity=lambda: None, cpu_count=lambda: None).available == 1
    assert _budget(4, affinity=4, quota=0.5).available == 1  # a quota under one CPU is still one


def test_this_process_has_at_least_one_cpu():
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


# ------------------------------------------------------------------ per rank and worker
def test_ranks_per_node_and_workers_divide():
    budget = _budget(64, affinity=16)
    assert threads_per_rank(budget=budget, env={}) == 16
    assert threads_per_rank(4, budget=budget, env={}) == 4
    assert threads_per_rank(4, workers=2, budget=budget, env={}) == 2
    assert threads_per_rank(None, budget=budget, env={"LOCAL_WORLD_SIZE": "8"}) == 2
    assert threads_per_rank(1, budget=budget, env={"LOCAL_WORLD_SIZE": "8"}) == 2  # torchrun's count wins


def test_never_below_one():
    assert threads_per_rank(8, workers=4, budget=_budget(2), env={}) == 1
    assert choose_threads(None, ranks_per_node=16, env={}, budget=_budget(2)).threads == 1
    assert choose_threads(1, workers=4, env={}, budget=_budget(2)).threads == 1


def test_bad_local_world_size_says_what_to_do():
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        local_world_size(env={"LOCAL_WORLD_SIZE": "two"})


# ------------------------------------------------------------------ precedence
def test_explicit_request_beats_omp_beats_automatic():
    budget = _budget(8, affinity=8)
    env = {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}
    explicit = choose_threads(5, what="training", env=env, budget=budget)
    assert (explicit.threads, explicit.source) == (5, "config")
    omp = choose_threads(None, what="training", env=env, budget=budget, parent_environ=lambda: None)
    assert (omp.threads, omp.source) == (3, "OMP_NUM_THREADS")
    auto = choose_threads(None, what="training", env={"LOCAL_WORLD_SIZE": "2"}, budget=budget)
    assert (auto.threads, auto.source) == (4, "auto")
    assert "8 CPUs available" in auto.reason and "2 ranks on this node" in auto.reason
    assert "run.threads or OMP_NUM_THREADS" in auto.reason


def test_explicit_values_are_shared_by_workers():
    assert choose_threads(4, workers=2, env={}, budget=_budget(8)).threads == 2
    assert choose_threads(None, workers=2, env={"OMP_NUM_THREADS": "1"}, budget=_budget(8)).threads == 1
    assert choose_threads(None, workers=3, env={}, budget=_budget(8)).threads == 2


def test_torchrun_default_omp_counts_as_unset():
    env = {"OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2"}
    budget = _budget(8)
    from_torchrun = choose_threads(None, env=env, budget=budget, parent_environ=lambda: "PATH=/bin\0HOME=/h\0")
    assert (from_torchrun.threads, from_torchrun.source) == (4, "auto")
    assert "torchrun's default" in from_torchrun.reason
    users = choose_threads(None, env=env, budget=budget, parent_environ=lambda: "OMP_NUM_THREADS=1\0")
    assert (users.threads, users.source) == (1, "OMP_NUM_THREADS")
    unreadable = choose_threads(None, env=env, budget=budget, parent_environ=lambda: None)
    assert unreadable.source == "OMP_NUM_THREADS"  # when unsure, the environment's value stands


def test_a_forced_count_that_oversubscribes_the_node_is_kept_and_warned_about():
    env = {"OMP_NUM_THREADS": "2", "LOCAL_WORLD_SIZE": "2"}
    omp = choose_threads(None, what="training", env=env, budget=_budget(2), parent_environ=lambda: None)
    assert (omp.threads, omp.source) == (2, "OMP_NUM_THREADS")
    assert "WARNING: 2 threads × 2 ranks on this node = 4 threads on 2 CPUs available" in omp.reason
    assert "unset OMP_NUM_THREADS" in omp.reason
    config = choose_threads(4, what="training", workers=2, env={}, budget=_budget(3))
    assert config.threads == 2 and "2 threads × 2 workers = 4 threads on 3 CPUs" in config.reason
    assert "lower run.threads" in config.reason
    # what fits the node says nothing more
    fits = choose_threads(None, env={"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, budget=_budget(2),
                          parent_environ=lambda: None)
    assert "WARNING" not in fits.reason
    assert "WARNING" not in choose_threads(2, env={}, budget=_budget(2)).reason


def test_bad_omp_value_falls_back_to_automatic_and_says_so():
    choice = choose_threads(None, env={"OMP_NUM_THREADS": "many"}, budget=_budget(2))
    assert choice.source == "auto" and "'many' ignored" in choice.reason


# ------------------------------------------------------------------ recon3d train
def test_train_logs_one_thread_per_rank_with_two_ranks_on_two_cpus(tmp_path):
    """``LOCAL_WORLD_SIZE=2`` on a machine of 2 (or fewer) usable CPUs: 1 torch thread per rank,
    said on stderr and recorded in the start event."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_train_conftest", ROOT / "tests/pipeline/train/conftest.py")
    helpers = importlib.util.module_from_spec(spec)  # the training tests' tiny config helpers
    spec.loader.exec_module(helpers)
    from pipeline.data import SimulateMRIConfig, simulate_mri

    if available_cpus() > 3:
        pytest.skip("needs a machine with 2 or 3 usable CPUs (2 ranks → 1 thread each)")
    scan = tmp_path / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=(8, 32, 32), coils=4, acceleration=4, calibration=8, chunk_depth=2,
                                   seed=0, noise_sigma=0.01, out=str(scan), progress=False))
    cfg = helpers.tiny_config(str(scan))
    cfg["run"].pop("threads")  # automatic
    config = helpers.write_config(tmp_path / "c.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), LOCAL_WORLD_SIZE="2")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(config), "--run-dir",
                           str(tmp_path / "run"), "--set", "run.max_steps=1"],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads per rank: 1 (" in proc.stderr and "2 ranks on this node" in proc.stderr
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in events if e.get("event") == "start")
    assert start["threads"] == 1 and start["threads_source"] == "auto"
