"""What resuming a run checks and says: its checkpoints, changed settings, a restart's move aside.

A run directory that holds checkpoints is never restarted silently: :func:`checkpoints_in` finds
its saves, ``--restart`` moves them and the log aside (:func:`move_aside`, nothing is deleted),
and a resume names the run, schedule and optimizer settings it changes and what that does to the
learning rate (:func:`schedule_changes`); a different model is refused (:func:`config_diff`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .checkpoint import MANIFEST, OWN
from .config import ExperimentConfig

__all__ = ["checkpoints_in", "move_aside", "schedule_changes", "config_diff"]


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Lines ``key: checkpoint A, config B`` for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r}, config {b!r}"]


def checkpoints_in(config: ExperimentConfig, run_dir: str | Path) -> tuple[Path, int | None]:
    """The run's checkpoints directory and its highest saved step (``None``: no save there).

    The highest complete save (with its manifest) counts, as ``--resume auto`` would take it;
    where only interrupted saves exist, the highest of those (they are still a run's work).
    """
    directory = Path(config.checkpoint.dir) if config.checkpoint.dir else Path(run_dir) / "checkpoints"
    complete, partial = [], []
    if directory.is_dir():
        for p in directory.glob("step_*"):
            digits = p.name[len("step_"):]
            if p.is_dir() and digits.isdigit():
                (complete if (p / OWN / MANIFEST).is_file() else partial).append(int(digits))
    found = complete or partial
    return directory, max(found) if found else None


def move_aside(config: ExperimentConfig, run_dir: Path) -> list[str]:
    """``--restart``: rename the old checkpoints and log out of the way (nothing is deleted)."""
    directory, _ = checkpoints_in(config, run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for old in (directory, run_dir / "metrics.jsonl", run_dir / "tensorboard"):
        if old.exists():
            new = old.with_name(f"{old.stem}.replaced-{stamp}{old.suffix}")
            shutil.move(str(old), str(new))
            moved.append(f"{old} → {new}")
    return moved


def schedule_changes(saved: dict[str, Any] | None, config: ExperimentConfig, step: int) -> list[str]:
    """Lines that say which run/schedule/optimizer settings a resume changes and what the LR does.

    Args:
        saved: the resolved config the checkpoint was trained with (``None``: unknown, no lines).
        config: the config resuming it.
        step: the step it resumes at.
    """
    from .build import learning_rate

    if not saved:
        return []
    new = config.model_dump(mode="json")
    diffs = []
    for section in ("run", "schedule", "optimizer"):
        old_s, new_s = saved.get(section) or {}, new.get(section) or {}
        for key in sorted(set(old_s) | set(new_s)):
            if key in old_s and old_s.get(key) != new_s.get(key):
                diffs.append(f"{section}.{key} {old_s.get(key)} → {new_s.get(key)}")
    if not diffs:
        return []
    try:
        old_cfg = ExperimentConfig.model_validate({**new, **{k: saved[k] for k in ("run", "schedule", "optimizer")
                                                              if isinstance(saved.get(k), dict)}})
    except Exception:  # a config of an older version: say what changed, not the LR effect
        return [f"resumed with changed settings: {'; '.join(diffs)}"]
    lr_old, lr_new = learning_rate(old_cfg, step), learning_rate(config, step)
    effect = f"lr at step {step} is {lr_new:.3g} (was {lr_old:.3g})"
    if config.schedule.name == "cosine":
        effect = (f"the cosine schedule now decays to {config.optimizer.lr * config.schedule.min_lr_ratio:.3g} "
                  f"at step {config.run.max_steps}; " + effect)
    return [f"resumed with changed settings: {'; '.join(diffs)}: {effect}"]
