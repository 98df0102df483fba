"""One writer per output under torchrun: the ranks of one job share its lease, a second job
(two ranks, other settings) into the same ``--out`` is refused at once, all of its ranks."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from pipeline.reconstruct import completion_records, reconstruct
from pipeline.reconstruct.lease import read_lease
from test_single_writer import DRIVER, ROOT, _args, _attrs, _config, _env, _level0, _one_thread, scan  # noqa: F401 (fixtures)


def test_second_torchrun_job_is_refused_and_the_first_job_s_ranks_share_the_lease(tmp_path, scan):
    out = tmp_path / "torchrun.ome.zarr"
    driver = tmp_path / "slow_driver.py"
    driver.write_text(DRIVER)
    jobs = {}
    for filt in ("ram-lak", "hann"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               "0.75", "-1", *_args(scan, out, filt)]
        jobs[filt] = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    ended: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(ended) < 2 and time.monotonic() < deadline:
        for filt, proc in jobs.items():
            if filt not in ended and proc.poll() is not None:
                ended[filt] = time.monotonic()
        time.sleep(0.05)
    logs = {filt: proc.communicate(timeout=60)[0] for filt, proc in jobs.items()}
    codes = {filt: proc.returncode for filt, proc in jobs.items()}
    winners = [f for f, rc in codes.items() if rc == 0]
    assert len(winners) == 1, (codes, logs)
    win = winners[0]
    lose = next(f for f in codes if f != win)
    assert ended[lose] < ended[win], logs
    assert "being written by another job" in logs[lose] and "job torchelastic:" in logs[lose], logs[lose]
    # Both ranks of the winning job wrote their slabs under its one lease.
    records = completion_records(str(out))
    assert {i: r["rank"] for i, r in records.items()} == {i: i % 2 for i in range(4)}
    ref = tmp_path / "ref.ome.zarr"
    expected = reconstruct(_config(scan, ref, win))
    assert _attrs(out)["complete"] is True and _attrs(out)["fingerprint"] == expected.fingerprint
    np.testing.assert_array_equal(_level0(out), _level0(ref))
    assert read_lease(str(out)) is None
