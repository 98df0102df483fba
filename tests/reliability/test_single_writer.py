"""One writer per ``recon3d reconstruct`` output (issue 13, point 4).

Two jobs with different settings into one ``--out``: one finishes, the other is refused at
once. A killed job's lease is taken over by the rerun. An output is never marked complete (nor
"already complete") unless every slab's record carries its fingerprint. A rank's wait times out
in minutes with a message naming the missing slabs, and stops at once when another job takes
the output's lease.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import OutputConflictError
from pipeline.reconstruct import ReconstructConfig, completion_records, reconstruct
from pipeline.reconstruct.config import WAIT_TIMEOUT_S
from pipeline.reconstruct.coordination import WaitTimeoutError
from pipeline.reconstruct.lease import LeaseLostError, lease_path, read_lease
from pipeline.reconstruct.store import _Output

ROOT = Path(__file__).resolve().parents[2]
SLABS = 4  # 8 slices in output chunks (= slabs) of 2

# Runs `recon3d reconstruct` slowly: it sleeps DELAY s before each slab's record, and SIGKILLs
# itself when about to record its KILL_AT-th slab (that slab's chunks written, not recorded).
DRIVER = """
import importlib, os, signal, sys, time
module = importlib.import_module("pipeline.reconstruct.store")
delay, kill_at = float(sys.argv[1]), int(sys.argv[2])
original, count = module._Output.record, [0]
def record(self, fingerprint, index, info):
    if count[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    count[0] += 1
    time.sleep(delay)
    return original(self, fingerprint, index, info)
module._Output.record = record
from pipeline.cli import main
sys.exit(main(["reconstruct", *sys.argv[3:]]))
"""


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """The jobs run with one torch thread (``_env``); so do the in-process references, whose
    float rounding must be the same for the outputs to compare equal bit for bit."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> str:
    """An 8×16×16 parallel-beam CT scan, 8 angles, chunks of 2 slices."""
    from pipeline.data import SimulateCTConfig, simulate_ct

    out = tmp_path_factory.mktemp("scan") / "ct.zarr"
    simulate_ct(SimulateCTConfig(out=str(out), shape=(8, 16, 16), angles=8, chunk_depth=2, seed=0,
                                 workers=1, scheduler="sync", progress=False))
    return str(out)


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _args(scan: str, out: Path, filt: str = "ram-lak") -> list[str]:
    return ["--method", "fbp", "--filter", filt, "--scan", scan, "--out", str(out), "--chunks", "2", "16", "16",
            "--scheduler", "sync", "--no-progress"]


def _slow(args: list[str], *, delay: float, kill_at: int = -1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(delay), str(kill_at), *args], env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _config(scan: str, out: Path, filt: str = "ram-lak", **kw) -> ReconstructConfig:
    return ReconstructConfig(scan=scan, out=str(out), method="fbp", filter=filt, chunks=(2, 16, 16),
                             scheduler="sync", progress=False, **kw)


def _attrs(out: Path) -> dict:
    return dict(zarr.open_group(str(out), mode="r").attrs)["recon3d"]


def _level0(out: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(out), mode="r")["0"][:])


def _write_lease(out: Path, *, fingerprint: str, heartbeat: float, host: str = "elsewhere", pid: int = 1) -> None:
    Path(lease_path(str(out))).write_text(json.dumps({
        "token": "f" * 32, "host": host, "pid": pid, "job": None, "fingerprint": fingerprint, "out": str(out),
        "acquired": heartbeat, "heartbeat": heartbeat}))


def test_two_jobs_with_different_settings_one_is_refused_at_once(tmp_path, scan):
    out = tmp_path / "both.ome.zarr"
    jobs = {filt: _slow(_args(scan, out, filt), delay=0.75) for filt in ("ram-lak", "hann")}
    ended: dict[str, float] = {}
    while len(ended) < 2:
        for filt, proc in jobs.items():
            if filt not in ended and proc.poll() is not None:
                ended[filt] = time.monotonic()
        time.sleep(0.05)
    results = {filt: (proc.returncode, proc.communicate()[1]) for filt, proc in jobs.items()}
    winners = [f for f, (rc, _) in results.items() if rc == 0]
    losers = [f for f, (rc, _) in results.items() if rc != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    (win,), (lose,) = winners, losers
    rc, err = results[lose]
    assert rc == 2, err
    # Refused before it wrote anything, while the winner still had its slow slabs to write.
    assert ended[lose] < ended[win], results
    message = err.strip().splitlines()[-1]
    for part in (str(out), "being written by another job", f"pid {jobs[win].pid}", "heartbeat",
                 "fingerprint", "choose another --out"):
        assert part in message, message
    # The output is the winner's alone: equal to a single job with its settings.
    ref = tmp_path / "ref.ome.zarr"
    expected = reconstruct(_config(scan, ref, win))
    assert _attrs(out)["complete"] is True and _attrs(out)["fingerprint"] == expected.fingerprint
    np.testing.assert_array_equal(_level0(out), _level0(ref))
    assert read_lease(str(out)) is None  # released at the end


def test_killed_job_leaves_a_stale_lease_the_rerun_takes_over(tmp_path, scan, capsys):
    out = tmp_path / "killed.ome.zarr"
    proc = _slow(_args(scan, out), delay=0.0, kill_at=2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == -9, err
    left = read_lease(str(out))
    assert left is not None and left.pid == proc.pid  # kill -9 released nothing
    capsys.readouterr()
    rerun = reconstruct(_config(scan, out))  # the same settings as the killed job's
    err = capsys.readouterr().err
    assert "taking over the stale lease" in err and f"pid {proc.pid}" in err and "its process is gone" in err
    assert rerun.state == "resumed" and rerun.slabs_run == 2 and rerun.complete
    ref = tmp_path / "ref.ome.zarr"
    reconstruct(_config(scan, ref))
    np.testing.assert_array_equal(_level0(out), _level0(ref))
    assert _attrs(out)["complete"] is True and read_lease(str(out)) is None


def test_live_lease_of_another_host_is_refused_until_its_heartbeat_is_stale(tmp_path, scan, capsys):
    out = tmp_path / "hosts.ome.zarr"
    _write_lease(out, fingerprint="ab" * 32, heartbeat=time.time())
    with pytest.raises(OutputConflictError) as refused:
        reconstruct(_config(scan, out, lease_stale_s=5.0))
    message = str(refused.value)
    for part in (str(out), "host elsewhere, pid 1", "fingerprint abababababab", "heartbeat 0 s ago",
                 "wait for it to finish, or choose another --out", "taken over once its heartbeat is 5 s old"):
        assert part in message, message
    assert not out.exists()  # refused before it touched the output
    _write_lease(out, fingerprint="ab" * 32, heartbeat=time.time() - 10)
    result = reconstruct(_config(scan, out, lease_stale_s=5.0))
    assert result.complete and result.slabs_run == SLABS
    assert "taking over the stale lease" in capsys.readouterr().err
    assert read_lease(str(out)) is None


def test_record_of_a_foreign_fingerprint_prevents_complete(tmp_path, scan):
    out = tmp_path / "foreign.ome.zarr"
    first = reconstruct(_config(scan, out))
    before = _level0(out)
    o = _Output(str(out), None)
    key = next((out / "records").glob("*/slab_000001/zarr.json"))
    record = json.loads(key.read_text())
    record["attributes"]["fingerprint"] = "0" * 64  # a writer of other settings recorded this slab
    key.write_text(json.dumps(record))
    assert o.done(first.fingerprint) == {0, 2, 3}
    again = reconstruct(_config(scan, out))
    assert again.state == "resumed" and again.slabs_run == 1  # not "already complete"
    assert sorted(completion_records(str(out))) == list(range(SLABS))
    assert all(r["fingerprint"] == first.fingerprint for r in completion_records(str(out)).values())
    assert _attrs(out)["complete"] is True
    np.testing.assert_array_equal(_level0(out), before)


def test_wait_for_other_ranks_times_out_naming_the_missing_slabs(tmp_path, scan, monkeypatch):
    assert WAIT_TIMEOUT_S <= 600
    from pipeline.cli import _build_parser

    parsed = _build_parser().parse_args(["reconstruct", "--method", "fbp", "--scan", "s", "--out", "o"])
    assert parsed.wait_timeout <= 600
    out = tmp_path / "wait.ome.zarr"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(WaitTimeoutError) as timeout:
        reconstruct(_config(scan, out, wait_timeout_s=1.0))
    message = str(timeout.value)
    for part in ("gave up after 1 s waiting for the other ranks' slabs of", str(out), "2 of 4 slabs", ": 1, 3",
                 "rerun the same command", "--wait-timeout"):
        assert part in message, message
    assert read_lease(str(out)) is None  # released on failure
    # Records of slabs 1 and 3 under this fingerprint's prefix but written with another: still missing.
    fingerprint = _attrs(out)["fingerprint"]
    for i in (1, 3):  # slab 1 as the plain object of earlier versions, slab 3 as today's group
        if i == 1:
            key = out / "records" / fingerprint[:32] / f"slab_{i:06d}.json"
            key.write_text(json.dumps({"slab": i, "fingerprint": "0" * 64}))
        else:
            key = out / "records" / fingerprint[:32] / f"slab_{i:06d}" / "zarr.json"
            key.parent.mkdir()
            key.write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                       "attributes": {"slab": i, "fingerprint": "0" * 64}}))
    with pytest.raises(WaitTimeoutError) as timeout:
        reconstruct(_config(scan, out, wait_timeout_s=1.0))
    assert ": 1, 3 (slabs 1, 3 have a record of another fingerprint)" in str(timeout.value)
    assert _attrs(out)["complete"] is False


def test_waiting_rank_stops_when_another_job_takes_the_lease(tmp_path, scan, monkeypatch):
    out = tmp_path / "taken.ome.zarr"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def take_over() -> None:  # once rank 0 waits for rank 1's slabs, another job takes the lease
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(list((out / "records").glob("*/slab_*/zarr.json"))) >= 2:
                _write_lease(out, fingerprint="cd" * 32, heartbeat=time.time())
                return
            time.sleep(0.05)

    thief = threading.Thread(target=take_over)
    thief.start()
    start = time.monotonic()
    with pytest.raises(LeaseLostError) as lost:
        reconstruct(_config(scan, out, wait_timeout_s=120.0, lease_heartbeat_s=0.2, lease_stale_s=5.0))
    thief.join()
    assert time.monotonic() - start < 30  # not the wait timeout
    message = str(lost.value)
    assert str(out) in message and "taken over by host elsewhere, pid 1" in message and "cdcdcdcdcdcd" in message
    assert _attrs(out)["complete"] is False
    assert read_lease(str(out)).fingerprint == "cd" * 32  # the other job's lease is left alone


def test_other_rank_refuses_at_once_when_another_job_holds_the_lease(tmp_path, scan, monkeypatch):
    out = tmp_path / "rank1.ome.zarr"
    _write_lease(out, fingerprint="ef" * 32, heartbeat=time.time())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    start = time.monotonic()
    with pytest.raises(OutputConflictError, match="being written by another job.*fingerprint efefefefefef"):
        reconstruct(_config(scan, out, wait_timeout_s=120.0))
    assert time.monotonic() - start < 30


def _contend(out: str, n: int = 8) -> list:
    """``n`` threads take the lease of ``out`` at the same instant; returns the winners' leases."""
    from pipeline.reconstruct.lease import Lease

    barrier, won, refused = threading.Barrier(n), [], []

    def take() -> None:
        lease = Lease(out, "12" * 32, heartbeat_s=5.0, stale_s=30.0)
        barrier.wait()
        try:
            won.append(lease.acquire(say=lambda message: None))
        except OutputConflictError:
            refused.append(lease)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) + len(refused) == n
    return won


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_lease_is_taken_by_exactly_one_of_many_contenders(tmp_path, stale):
    out = tmp_path / "contended.ome.zarr"
    if stale:  # a killed job's lease: every contender tries to take it over at once
        _write_lease(out, fingerprint="ab" * 32, heartbeat=time.time() - 100)
    won = _contend(str(out))
    assert len(won) == 1
    assert read_lease(str(out)).token == won[0].token
    won[0].release()
    assert read_lease(str(out)) is None
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary or stale files left


def test_lease_on_an_fsspec_store_refuses_a_second_owner():
    from pipeline.reconstruct.lease import Lease

    out = f"memory://leases/{time.time_ns()}/out.ome.zarr"
    first = Lease(out, "34" * 32, heartbeat_s=5.0, stale_s=30.0).acquire()
    with pytest.raises(OutputConflictError, match="being written by another job"):
        Lease(out, "56" * 32, heartbeat_s=5.0, stale_s=30.0).acquire()
    assert read_lease(out).token == first.token
    first.release()
    assert read_lease(out) is None
    Lease(out, "56" * 32, heartbeat_s=5.0, stale_s=30.0).acquire().release()


def test_cli_wait_timeout_is_a_failure_and_a_conflict_an_input_error(tmp_path, scan, monkeypatch, capsys):
    from pipeline.reconstruct.cli import main

    out = tmp_path / "cli.ome.zarr"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["reconstruct", *_args(scan, out), "--wait-timeout", "0.5"]) == 1  # the job could not finish
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recon3d reconstruct: error: gave up after"), err
    _write_lease(out, fingerprint="ab" * 32, heartbeat=time.time())
    assert main(["reconstruct", *_args(scan, out)]) == 2  # the user must wait or choose another --out
    assert "being written by another job" in capsys.readouterr().err
