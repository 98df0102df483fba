"""What a run reports: a progress bar, ``metrics.jsonl``, TensorBoard events, a line per save.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per logged step with at least
``step`` and ``loss`` (plus the loss parts, learning rate, step time, voxels/s and the fraction
of the step spent waiting for data); validation and checkpoint events are objects with an
``event`` key. A resumed run appends, dropping any lines past the resumed step first, so the
file always reads as one run.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["Monitor", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a ``metrics.jsonl`` (events excluded)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "event" not in rec:
                out.append(rec)
    return out


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
            except ImportError:  # tensorboard is a dependency; be robust if it was removed
                print("recon3d: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

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
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({"loss": f"{record['loss']:.4g}",
                                   **{k: f"{v:.3g}" for k, v in record.get("parts", {}).items()},
                                   "vox/s": f"{record.get('voxels_per_s', 0):.3g}"}, refresh=False)
            self._bar.refresh()

    def event(self, kind: str, step: int, message: str, **fields: Any) -> None:
        """A validation or checkpoint event: a JSONL record and a line on stderr."""
        if not self.enabled:
            return
        rec = {"event": kind, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        line = f"[recon3d] step {step}: {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
