"""Divergence is caught (issue 13, point 3): a NaN/Inf loss or gradient norm stops every rank at
that step without saving it, with a one-line error naming the step, the values, the last good
checkpoint and the remedy; ``metrics.jsonl`` stays strict JSON; a growing loss warns.

Single-process runs go through :func:`pipeline.train.loop.train` or a :class:`Trainer` whose loss
is wrapped to inject values; the CLI case and the 2-rank case run in subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
from reliability_helpers import reset_deepspeed_groups as _reset_deepspeed_groups, scan, tiny_config, train_fixtures, write_config  # noqa: F401




@pytest.fixture(autouse=True)
def fresh_deepspeed_groups():
    _reset_deepspeed_groups()
    yield
    _reset_deepspeed_groups()


def _reject_constant(name: str):
    raise ValueError(f"bare {name} in metrics.jsonl")


def strict_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, parsed as strict JSON (NaN/Infinity raise)."""
    return [json.loads(line, parse_constant=_reject_constant) for line in path.read_text().splitlines() if line]


def _saved_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpts.glob("step_*")) if ckpts.is_dir() else []


class _Injected:
    """Wraps a run's loss: multiplies the loss of optimizer step ``k`` (1-based) by ``scale(k)``."""

    def __init__(self, inner, scale, rank_only: int | None = None, rank: int = 0) -> None:
        self.inner, self.scale, self.calls = inner, scale, 0
        self.active = rank_only is None or rank_only == rank

    def __call__(self, *args):
        from pipeline.losses.base import LossOutput

        self.calls += 1
        out = self.inner(*args)
        k = self.scale(self.calls) if self.active else 1.0
        if k == 1.0:
            return out
        return LossOutput(out.total * k, {n: v * k for n, v in out.parts.items()})

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _fit(cfg: dict, run: Path, scale, wrapper=None):
    """A single-process Trainer whose loss of step k is multiplied by ``scale(k)``."""
    from pipeline.train import Trainer, load_config
    from pipeline.train.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu", timeout_s=60)
    try:
        trainer = Trainer(load_config(cfg), run, ctx)
        trainer.loss = (wrapper or _Injected)(trainer.loss, scale)
        return trainer.fit(None)
    finally:
        shutdown_distributed()
        _reset_deepspeed_groups()


@pytest.mark.parametrize("stage", [0, 2])
def test_sgd_blowup_stops_before_saving(tmp_path, scan, stage):
    """SGD at lr 1e6 goes non-finite at step 2: DivergenceError, step 1's save stays latest."""
    from pipeline.train import load_config
    from pipeline.train.loop import DivergenceError, train

    cfg = tiny_config(scan, run={"max_steps": 20}, optimizer={"name": "sgd", "lr": 1e6},
                      deepspeed={"zero_stage": stage}, checkpoint={"every": 1, "keep_last": 5})
    run = tmp_path / "run"
    with pytest.raises(DivergenceError) as err:
        train(load_config(cfg), run)
    msg = str(err.value)
    assert "\n" not in msg
    assert "diverged at step 2:" in msg and "not finite" in msg
    assert "grad_norm" in msg  # ZeRO 0: our own norm of p.grad; ZeRO 2: DeepSpeed's global norm
    assert "step_00000001" in msg and "optimizer.lr" in msg and "gradient_clipping" in msg
    assert "--resume auto" in msg
    assert _saved_steps(run) == [1]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    lines = strict_lines(run / "metrics.jsonl")
    bad = [r for r in lines if "event" not in r and r["step"] == 2]
    assert bad and bad[0]["loss"] is None and "loss" in bad[0]["nonfinite"]
    assert [r["step"] for r in lines if r.get("event") == "diverged"] == [2]
    assert not any(r.get("event") == "checkpoint" and r["step"] >= 2 for r in lines)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_nan_injected_at_step_4_is_caught_there(tmp_path, scan, stage):
    from pipeline.train.loop import DivergenceError

    cfg = tiny_config(scan, run={"max_steps": 8}, deepspeed={"zero_stage": stage}, checkpoint={"every": 3})
    run = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"diverged at step 4: .*step_00000003"):
        _fit(cfg, run, lambda k: float("nan") if k == 4 else 1.0)
    assert _saved_steps(run) == [3]  # no save of step 4 or later, not even the end-of-run one
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003"
    steps = [r["step"] for r in strict_lines(run / "metrics.jsonl") if "event" not in r]
    assert steps == [1, 2, 3, 4]

    # The report still reads the log with its null loss.
    from pipeline.reconstruct.report_run import read_run_log

    logged, events, unreadable = read_run_log(run / "metrics.jsonl")
    assert unreadable == 0 and logged[-1]["loss"] is None


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nan_gradient_with_a_finite_loss_is_caught(tmp_path, scan, stage):
    """Only the gradient norm is NaN: ZeRO 0 norms p.grad itself, ZeRO 2/3 read DeepSpeed's norm."""
    from pipeline.losses.base import LossOutput
    from pipeline.train.loop import DivergenceError

    calls = []

    class NaNGradAt3(_Injected):
        def __call__(self, *args):
            calls.append(1)
            out = self.inner(*args)
            return LossOutput(_NaNGrad.apply(out.total), out.parts) if len(calls) == 3 else out

    cfg = tiny_config(scan, run={"max_steps": 6}, deepspeed={"zero_stage": stage}, checkpoint={"every": 2})
    with pytest.raises(DivergenceError, match=r"diverged at step 3: grad_norm not finite \(loss [0-9.e-]+,"):
        _fit(cfg, tmp_path / "run", lambda k: 1.0, wrapper=NaNGradAt3)
    assert _saved_steps(tmp_path / "run") == [2]


def test_cli_exits_1_with_one_line(tmp_path, scan):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scan, run={"max_steps": 10}))
    env = dict(train_fixtures._env())
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", str(cfg), "--run-dir", str(tmp_path / "r"),
                           "--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e6"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "diverged at step 2" in proc.stderr
    assert "done at step" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()  # "no checkpoint saved yet"


def test_growing_loss_warns_and_trains_on(tmp_path, scan, capsys):
    # Adam is invariant to the loss scale, so a loss ×10 per step trains on, finite.
    cfg = tiny_config(scan, run={"max_steps": 9, "loss_growth_warning": 100}, checkpoint={"every": 100})
    run = tmp_path / "run"
    result = _fit(cfg, run, lambda k: 10.0 ** k)
    assert result.step == 9
    warnings = [r for r in strict_lines(run / "metrics.jsonl") if r.get("event") == "warning"]
    # Smallest |loss| after the 5 warm-up steps is step 6's: ×100 at step 8, then once per decade.
    assert [w["step"] for w in warnings] == [8, 9]
    assert "run.loss_growth_warning" in capsys.readouterr().err

    cfg["run"]["loss_growth_warning"] = 0
    _fit(cfg, tmp_path / "off", lambda k: 10.0 ** k)
    assert not any(r.get("event") == "warning" for r in strict_lines(tmp_path / "off" / "metrics.jsonl"))


_DRIVER = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {here!r})
from test_divergence import _Injected
from pipeline.train import Trainer, load_config
from pipeline.train.distributed import init_distributed, shutdown_distributed
from pipeline.train.loop import DivergenceError

ctx = init_distributed("cpu", timeout_s=60)
out = {{"rank": ctx.rank}}
try:
    trainer = Trainer(load_config(sys.argv[1]), Path(sys.argv[2]), ctx)
    trainer.loss = _Injected(trainer.loss, lambda k: float("nan") if k == 3 else 1.0, rank_only=1, rank=ctx.rank)
    trainer.fit(None)
    out["error"] = None
except DivergenceError as e:
    out["error"] = str(e)
finally:
    shutdown_distributed()
Path(sys.argv[2], f"rank{{ctx.rank}}.json").write_text(json.dumps(out))
"""


def test_nan_on_one_rank_stops_both(tmp_path, scan):
    """2 ranks (gloo): only rank 1's loss is NaN at step 3; both raise at step 3 and exit."""
    run = tmp_path / "run"
    run.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(here=str(Path(__file__).parent)))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(scan, run={"max_steps": 10}, checkpoint={"every": 2}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           str(driver), str(cfg), str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=train_fixtures._env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        err = json.loads((run / f"rank{rank}.json").read_text())["error"]
        assert err and "diverged at step 3:" in err, (rank, err)
    assert _saved_steps(run) == [2]
    strict_lines(run / "metrics.jsonl")


def test_finite_record_and_growth_watch_units():
    from pipeline.train.monitor import LossGrowthWatch, finite_record

    rec = finite_record({"step": 1, "loss": float("inf"), "parts": {"mc": float("nan"), "ei": 1.0}})
    assert rec == {"step": 1, "loss": None, "parts": {"mc": None, "ei": 1.0}, "nonfinite": ["loss", "parts.mc"]}
    watch = LossGrowthWatch(1000, warmup=2)
    said = [watch.update(v) for v in [5.0, 4.0, 1.0, 2.0, 999.0, 1000.0, 5000.0, 1e4]]
    assert [bool(s) for s in said] == [False] * 5 + [True, False, True]
