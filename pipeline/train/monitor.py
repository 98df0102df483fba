"""What a run reports: a progress bar, ``metrics.jsonl``, TensorBoard events, a line per save.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step with at least
``step`` and ``loss`` (plus the loss parts, learning rate, step time, voxels/s and the fraction
of the step spent waiting for data); validation, checkpoint, ``warning`` and ``diverged``
events are objects with an ``event`` key. A resumed run appends, dropping any lines past the
resumed step first, so the file always reads as one run.

Every line is strict JSON (``json.loads(line, parse_constant=...)`` never meets ``NaN`` or
``Infinity``): a value that is not finite is written as ``null`` and its key is listed in the
record's ``"nonfinite"`` field (dotted for nested keys, e.g. ``["loss", "parts.mc"]``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from pipeline.log import say

__all__ = ["Monitor", "read_metrics", "finite_record", "LossGrowthWatch"]


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float replaced by ``None`` and listed in ``"nonfinite"``.

    ``json.dumps`` would write ``NaN``/``Infinity``, which strict JSON readers (``jq``, browsers,
    ``json.loads(..., parse_constant=...)``) reject; ``null`` plus the list of keys keeps the line
    valid and says what was there.
    """
    bad: list[str] = []

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        return value

    out = clean(record, "")
    if bad:
        out["nonfinite"] = sorted(set(bad) | set(record.get("nonfinite", [])))
    return out


class LossGrowthWatch:
    """Warns when the loss grows by ``factor`` over the smallest |loss| seen after warm-up.

    The first ``warmup`` steps are not watched (an initial transient is not growth). After a
    warning the threshold rises tenfold, so a run that keeps blowing up warns once per further
    decade, not every step. ``factor`` 0 disables the watch.
    """

    def __init__(self, factor: float, warmup: int = 5) -> None:
        self.factor = factor
        self.warmup = warmup
        self.seen = 0
        self.smallest: float | None = None
        self.threshold: float | None = None  # the factor over the smallest that warns next

    def update(self, loss: float) -> str | None:
        """Feed one step's (finite) loss; returns the warning text when it crosses the threshold."""
        if not self.factor or not math.isfinite(loss):
            return None
        self.seen += 1
        if self.seen <= self.warmup:
            return None
        a = abs(loss)
        if self.smallest is None or a < self.smallest:
            self.smallest = a
        if self.smallest <= 0:
            return None
        growth = a / self.smallest
        limit = self.threshold or self.factor
        if growth < limit:
            return None
        self.threshold = limit * 10
        return (f"the loss grew {growth:.3g}x over its smallest value {self.smallest:.4g} "
                f"(now {loss:.4g}; run.loss_growth_warning is {self.factor:g}): training may be diverging; "
                "consider a lower optimizer.lr or deepspeed.gradient_clipping")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a ``metrics.jsonl`` (events excluded)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:
                out.append(rec)
    return out


class _Bar:
    """The training progress bar (rich, on stderr): drawn on a terminal, silent in a log file,
    where the events' lines and ``metrics.jsonl`` say the same without carriage returns."""

    def __init__(self, total: int, start: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.console = Console(stderr=True, soft_wrap=True)
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, disable=not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.progress.start()

    def update(self, step: int, info: str) -> None:
        self.progress.update(self.task, completed=step, info=info)

    def write(self, line: str) -> None:
        if self.console.is_terminal:  # above the bar, unwrapped
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            say(line, "train")

    def close(self) -> None:
        self.progress.stop()


class Monitor:
    """Rank 0's reporting; on other ranks every method does nothing.

    Args:
        run_dir: the run directory.
        enabled: whether this is rank 0.
        total_steps: the run's last step (for the ETA).
        start_step: the step the run (re)starts from.
        tensorboard, progress: write TensorBoard events / draw a progress bar.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # part of the `train` extra; the run goes on without it
                say("recon3d: tensorboard is not installed (pip install 'recon3d[train]'); writing "
                    "metrics.jsonl only", "train", level=logging.WARNING)
        if progress:
            self._bar = _Bar(total_steps, start_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def log_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(finite_record(record), allow_nan=False) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            parts = {"loss": f"{record['loss']:.4g}", **{k: f"{v:.3g}" for k, v in record.get("parts", {}).items()},
                     "vox/s": f"{record.get('voxels_per_s', 0):.3g}"}
            self._bar.update(step, " ".join(f"{k}={v}" for k, v in parts.items()))

    def event(self, kind: str, step: int, message: str, **fields: Any) -> None:
        """An event (validation, checkpoint, warning, diverged, ...): a JSONL record and a line on stderr."""
        if not self.enabled:
            return
        rec = {"event": kind, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        self._file.write(json.dumps(finite_record(rec), allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        line = f"[recon3d] step {step}: {message}"
        if self._bar is not None:
            self._bar.write(line)
        else:
            say(line, "train")

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
