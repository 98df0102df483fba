"""The launch scripts on CPU (gloo): two torchrun agents on loopback as two "nodes", a stop by
SIGTERM that saves and resumes exactly, a dead rank that ends the job instead of hanging, the
retry loop that resumes after a crash, and the SLURM template (with stand-ins for srun and
scontrol) saving on SIGUSR1 and requeueing.

Each test starts real ``torchrun`` agents through ``launch/*.sh``, as users do; the workers
are found from outside through the process tree. The uninterrupted two-"node" run of the
first test is the reference loss sequence of the others (same world size, same config).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.train import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "launch" / "train_local.sh"
MULTINODE = ROOT / "launch" / "torchrun_multinode.sh"
MAX_STEPS = 30  # long enough (≈ 0.2 s a step here) for a signal to land mid-run
JOB_TIMEOUT = 300  # a wedged job fails the test instead of hanging the suite
DEAD_RANK_BOUND = 120  # seconds from a kill -9 to the job's non-zero exit


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    from pipeline.data import SimulateMRIConfig, simulate_mri

    tmp = tmp_path_factory.mktemp("launch")
    scan = tmp / "mri.zarr"
    simulate_mri(SimulateMRIConfig(shape=(8, 32, 32), coils=4, acceleration=4, calibration=8,
                                   chunk_depth=2, seed=0, noise_sigma=0.01, out=str(scan), progress=False))
    cfg = {
        "run": {"max_steps": MAX_STEPS, "seed": 0, "threads": 1},
        "data": {"scans": [str(scan)], "slab_thickness": 2, "num_workers": 0},
        "model": {"widths": [4, 8]},
        "loss": {"terms": [{"name": "mc"}, {"name": "ei", "transform": "rotate90"}]},
        "optimizer": {"lr": 1e-3},
        "deepspeed": {"zero_stage": 2, "timeout_s": 60},
        "checkpoint": {"every": 3, "keep_last": 2},
        "logging": {"progress": False, "tensorboard": False},
    }
    path = tmp / "mri.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Job:
    """One launch script in the background, its output in ``log``."""

    def __init__(self, script: Path, config: Path, run_dir: Path, log: Path, **env: str) -> None:
        self.run_dir = run_dir
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        full_env.update(RECON3D_PYTHON=sys.executable, OMP_NUM_THREADS="1", RETRY_DELAY="1",
                        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
        self._out = open(log, "w")
        # SIGINT as at a terminal: a suite started in the background (`.ci/run &`) inherits it
        # ignored, and bash cannot trap a signal ignored when it started.
        self.proc = subprocess.Popen(["bash", str(script), str(config), str(run_dir)], cwd=ROOT, env=full_env,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)

    def workers(self) -> list[psutil.Process]:
        """The training processes: children of torchrun, itself the script's child."""
        out = []
        for agent in psutil.Process(self.proc.pid).children():
            out += agent.children()
        return out

    def tree(self) -> list[psutil.Process]:
        """The script and every process under it."""
        top = psutil.Process(self.proc.pid)
        return [top, *top.children(recursive=True)]

    def wait_for_step(self, step: int, timeout: float = JOB_TIMEOUT) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if metrics.is_file() and any(r["step"] >= step for r in read_metrics(metrics)):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the job ended (rc {self.proc.returncode}) before step {step}\n{self.text()}")
            time.sleep(0.1)
        raise AssertionError(f"no step {step} after {timeout} s\n{self.text()}")

    def wait(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end within {timeout} s\n{self.text()}") from None

    def text(self) -> str:
        self._out.flush()
        return self.log.read_text()[-8000:]

    def kill(self) -> None:
        """Teardown: every process of the job, workers included (they run in their own sessions)."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in [*procs, self.proc]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        self.proc.wait(30)
        self._out.close()


class Jobs:
    """Starts jobs and kills whatever is left of them at the end."""

    def __init__(self) -> None:
        self.started: list[Job] = []

    def __call__(self, *args, **env) -> Job:
        self.started.append(Job(*args, **env))
        return self.started[-1]

    def kill(self) -> None:
        for job in self.started:
            job.kill()


@pytest.fixture
def jobs():
    started = Jobs()
    yield started
    started.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(jobs: Jobs, config: Path, run_dir: Path, tmp: Path, **env: str) -> tuple[Job, Job]:
    common = dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}",
                  RDZV_ID=run_dir.name, RDZV_JOIN_TIMEOUT="120", **env)
    return (jobs(MULTINODE, config, run_dir, tmp / f"{run_dir.name}-node0.log", **common),
            jobs(MULTINODE, config, run_dir, tmp / f"{run_dir.name}-node1.log", **common))


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> list[float]:
    """(a) Two agents on loopback, one worker each, train and checkpoint together."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    run = tmp / "run"
    started = Jobs()
    try:
        nodes = _two_nodes(started, config, run, tmp, MAX_RESTARTS="0")
        rcs = [node.wait() for node in nodes]
        assert rcs == [0, 0], "\n".join(node.text() for node in nodes)
    finally:
        started.kill()
    ckpt = run / "checkpoints"
    tag = (ckpt / "latest").read_text()
    assert tag == f"step_{MAX_STEPS:08d}"
    assert sorted(p.name for p in (ckpt / tag / "recon3d").glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert '"world_size": 2' in (ckpt / tag / "recon3d" / "manifest.json").read_text()
    assert _steps(run) == list(range(1, MAX_STEPS + 1))
    return _losses(run)


def test_two_agents_on_loopback_train_and_checkpoint_together(reference):
    assert len(reference) == MAX_STEPS


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_saves_exits_zero_and_resumes_exactly(config, reference, tmp_path, jobs, sig):
    """(b) SIGTERM — or Ctrl-C (SIGINT), the same stop — to the script: every rank saves at the
    next step, exit 0, no retry; running the script again finishes with the loss sequence of an
    uninterrupted run."""
    run = tmp_path / "run"
    job = jobs(LOCAL, config, run, tmp_path / "first.log", NPROC_PER_NODE="2")
    job.wait_for_step(2)
    job.proc.send_signal(sig)
    assert job.wait() == 0, job.text()
    stopped_at = int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped_at < MAX_STEPS, job.text()
    assert f"stopped by {sig.name} after saving" in job.text()
    assert "nan s" not in job.text()
    assert "attempt 2" not in job.text()
    assert _steps(run) == list(range(1, stopped_at + 1))

    again = jobs(LOCAL, config, run, tmp_path / "again.log", NPROC_PER_NODE="2")
    assert again.wait() == 0, again.text()
    assert _losses(run) == reference


def test_dead_rank_ends_the_job_instead_of_hanging(config, tmp_path, jobs):
    """(c) kill -9 the worker of one "node": both agents exit non-zero, within a bound."""
    run = tmp_path / "run"
    nodes = _two_nodes(jobs, config, run, tmp_path, MAX_RESTARTS="0")
    nodes[0].wait_for_step(2)
    victim = next(w for node in nodes for w in node.workers())
    victim.kill()
    t0 = time.monotonic()
    rcs = [node.wait(DEAD_RANK_BOUND) for node in nodes]
    assert all(rc != 0 for rc in rcs), rcs
    assert time.monotonic() - t0 < DEAD_RANK_BOUND


def test_retry_resumes_after_a_crash(config, reference, tmp_path, jobs):
    """(d) kill -9 one worker once: the script restarts the job with --resume auto and it
    completes; every step is in the metrics once, with the uninterrupted run's losses."""
    run = tmp_path / "run"
    job = jobs(LOCAL, config, run, tmp_path / "job.log", NPROC_PER_NODE="2", MAX_RESTARTS="1")
    job.wait_for_step(4)  # past the step-3 save, so the retry resumes from a checkpoint
    job.workers()[-1].kill()
    assert job.wait() == 0, job.text()
    text = job.text()
    assert "attempt 1 failed" in text and "attempt 2 of 2" in text, text
    assert "resumed from" in text, text
    assert _steps(run) == list(range(1, MAX_STEPS + 1))
    assert _losses(run) == reference


FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node: skip the options, run the task inside a "step"
while [[ $1 == -* ]]; do shift; done
exec env SLURM_STEP_ID=0 "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
    show) echo 127.0.0.1 ;;
    *) echo "$*" >> "$FAKE_SCONTROL_LOG" ;;
esac
"""


def test_sbatch_saves_before_the_time_limit_and_requeues(config, tmp_path, jobs):
    """The SLURM template on one fake node: SIGUSR1 to every process of the step (as
    ``--signal=USR1@120`` does) → one save, exit 0, and the unfinished job is requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requests = tmp_path / "scontrol.log"
    run = tmp_path / "run"
    job = jobs(ROOT / "launch" / "slurm" / "train.sbatch", config, run, tmp_path / "job.log",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SCONTROL_LOG=str(requests),
               SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node001",
               SLURM_SUBMIT_DIR=str(ROOT), NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{_free_port()}")
    job.wait_for_step(2)
    step = job.tree()[1:]  # not the batch shell, which is not in the step
    assert len(step) == 4, [p.cmdline()[:3] for p in step]  # the script, torchrun, 2 workers
    for p in step:
        p.send_signal(signal.SIGUSR1)
    assert job.wait() == 0, job.text()
    stopped_at = int((run / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 2 <= stopped_at < MAX_STEPS, job.text()
    assert "stopped by SIGUSR1 after saving" in job.text()
    assert requests.read_text().split() == ["requeue", "4242"]


def test_a_diverged_run_is_not_retried(config, tmp_path, jobs):
    """A run that stopped on a non-finite step exits 1, and the retry loop does not start it
    again (it would resume from the same checkpoint with the same settings and diverge again)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["optimizer"] = {"name": "sgd", "lr": 1e6}
    diverging = tmp_path / "diverging.yaml"
    diverging.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    job = jobs(LOCAL, diverging, run, tmp_path / "job.log", NPROC_PER_NODE="2", MAX_RESTARTS="2")
    assert job.wait() != 0, job.text()
    text = job.text()
    assert "training diverged" in text and "not retrying" in text, text
    assert "attempt 2" not in text, text
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert events[-1]["event"] == "diverged"
