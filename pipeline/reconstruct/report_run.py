"""The report of a training run (``recon3d report RUN_DIR``), and what both reports share.

:func:`read_run_log` reads a ``metrics.jsonl``; the run report draws ``training.png`` (loss and
its parts, learning rate, throughput and data wait against the step; resumes marked) and
``validation.png`` (validation loss, PSNR, SSIM), and writes ``report.md`` with the final and
best values. :class:`ReportResult` (what a report wrote), the bare-Figure factory and the number
format are shared with the image report (:mod:`pipeline.reconstruct.report_image`); the entry
point is :func:`pipeline.reconstruct.report.report`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ReportResult", "read_run_log", "run_report"]


@dataclass
class ReportResult:
    """What :func:`report` wrote.

    Attributes:
        kind: ``run`` or ``image``.
        out_dir: the report folder; ``markdown``: its ``report.md``; ``figures``: the PNGs.
        metrics: per volume, the :func:`evaluate` results (images with a reference), else ``[]``.
        summary: the run's final/best values (runs), else ``{}``.
    """

    kind: str
    out_dir: Path
    markdown: Path
    figures: list[Path] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _figure(width: float, height: float):
    # A bare Figure renders with Agg without touching pyplot's global backend.
    from pipeline.errors import require_extra

    return require_extra("matplotlib.figure", "report", "recon3d report's pictures").Figure(figsize=(width, height))


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        return f"{value:.{digits}g}"
    return str(value)


# ============================================================================ runs
def read_run_log(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """``(steps, events, bad_lines)`` of a ``metrics.jsonl``; unparsable lines (a line cut by a
    kill) are counted, not fatal."""
    steps, events, bad = [], [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            bad += 1
        elif "event" in rec:
            events.append(rec)
        elif "loss" in rec:
            steps.append(rec)
        else:
            bad += 1
    steps.sort(key=lambda r: r["step"])
    return steps, events, bad


def _smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with the given span (for noisy loss curves)."""
    alpha, out, acc = 2.0 / (span + 1), np.empty_like(values), values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def _curve(ax, x, y, label: str, color: str | None = None) -> None:
    y = np.asarray(y, dtype=float)
    if len(y) > 20:
        line = ax.plot(x, y, alpha=0.3, lw=0.8, color=color)[0]
        ax.plot(x, _smooth(y, max(5, len(y) // 20)), lw=1.4, color=line.get_color(), label=label)
    else:
        ax.plot(x, y, lw=1.2, marker="." if len(y) < 50 else None, color=color, label=label)


def _log_if_positive(ax, *series) -> None:
    values = np.concatenate([np.asarray(s, float) for s in series if len(s)]) if series else np.array([])
    if values.size and np.all(values[np.isfinite(values)] > 0):
        ax.set_yscale("log")


def _mark_events(ax, events: list[dict[str, Any]]) -> None:
    for ev in events:
        if ev["event"] == "resume":
            ax.axvline(ev["step"], color="grey", ls="--", lw=0.8)
        elif ev["event"] == "stop":
            ax.axvline(ev["step"], color="red", ls=":", lw=0.8)


def _training_figure(steps, events, path: Path) -> None:
    x = [r["step"] for r in steps]
    parts = sorted({k for r in steps for k in r.get("parts", {})})
    panels = ["loss"]
    if any("lr" in r for r in steps):
        panels.append("lr")
    if any("voxels_per_s" in r or "data_wait_fraction" in r for r in steps):
        panels.append("throughput")
    fig = _figure(6.5, 2.4 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    _curve(ax, x, [r["loss"] for r in steps], "loss", color="black")
    series = [[r["loss"] for r in steps]]
    for name in parts:
        xs = [r["step"] for r in steps if name in r.get("parts", {})]
        ys = [r["parts"][name] for r in steps if name in r.get("parts", {})]
        _curve(ax, xs, ys, name)
        series.append(ys)
    _log_if_positive(ax, *series)
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7, loc="upper right")
    for ax, panel in zip(axes[1:], panels[1:]):
        if panel == "lr":
            ax.plot([r["step"] for r in steps if "lr" in r], [r["lr"] for r in steps if "lr" in r], lw=1.2)
            ax.set_ylabel("learning rate")
        else:
            rows = [r for r in steps if "voxels_per_s" in r]
            ax.plot([r["step"] for r in rows], [r["voxels_per_s"] for r in rows], lw=1.0, color="C0")
            ax.set_ylabel("voxels / s", color="C0")
            rows = [r for r in steps if "data_wait_fraction" in r]
            if rows:
                twin = ax.twinx()
                twin.plot([r["step"] for r in rows], [r["data_wait_fraction"] for r in rows], lw=1.0, color="C1")
                twin.set_ylabel("data wait fraction", color="C1")
                twin.set_ylim(0, 1)
    for ax in axes:
        _mark_events(ax, events)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _validation_figure(validations, events, path: Path) -> None:
    keys = [k for k in ("loss", "psnr", "ssim") if any(k in v for v in validations)]
    labels = {"loss": "validation loss", "psnr": "PSNR (dB)", "ssim": "SSIM"}
    fig = _figure(6.5, 2.2 * len(keys))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        rows = [v for v in validations if key in v]
        ax.plot([v["step"] for v in rows], [v[key] for v in rows], marker="o", ms=3, lw=1.2)
        ax.set_ylabel(labels[key])
        _mark_events(ax, events)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _best(rows: list[dict[str, Any]], key: str, *, higher: bool) -> dict[str, Any] | None:
    rows = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not rows:
        return None
    return (max if higher else min)(rows, key=lambda r: r[key])


def run_report(run_dir: Path, out_dir: Path) -> ReportResult:
    steps, events, bad = read_run_log(run_dir / "metrics.jsonl")
    validations = [e for e in events if e["event"] == "validation"]
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    resumes = [e for e in events if e["event"] == "resume"]
    stops = [e for e in events if e["event"] == "stop"]
    figures = []
    if steps:
        figures.append(out_dir / "training.png")
        _training_figure(steps, events, figures[-1])
    if validations:
        figures.append(out_dir / "validation.png")
        _validation_figure(validations, events, figures[-1])

    summary: dict[str, Any] = {"steps_logged": len(steps), "checkpoints": len(checkpoints),
                               "resumes": len(resumes), "stops": len(stops), "bad_lines": bad}
    lines = [f"# recon3d report — run `{run_dir}`", ""]
    if not steps:
        lines += ["No training step is logged in `metrics.jsonl` yet.", ""]
    else:
        last, best = steps[-1], _best(steps, "loss", higher=False)
        summary.update(first_step=steps[0]["step"], final_step=last["step"], final_loss=last["loss"],
                       final_parts=last.get("parts", {}), best_loss=best["loss"] if best else None,
                       best_loss_step=best["step"] if best else None)
        table = [("steps logged", f"{len(steps)} (step {steps[0]['step']} → {last['step']})"),
                 ("final loss", f"{_fmt(last['loss'])} (step {last['step']})")]
        if best:
            table.append(("best loss", f"{_fmt(best['loss'])} (step {best['step']})"))
        if last.get("parts"):
            table.append(("final loss parts", ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(last["parts"].items()))))
        if "lr" in last:
            table.append(("final learning rate", _fmt(last["lr"])))
        for key, label, scale, unit in (("step_s", "median step time", 1, " s"),
                                        ("voxels_per_s", "median throughput", 1, " voxels/s"),
                                        ("data_wait_fraction", "median data wait", 100, " % of the step")):
            values = [r[key] for r in steps if isinstance(r.get(key), (int, float))]
            if values:
                summary[f"median_{key}"] = float(np.median(values))
                table.append((label, f"{_fmt(float(np.median(values)) * scale, 3)}{unit}"))
        lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in table] + [""]
    if validations:
        lines += ["## Validation", "", "| metric | final | best |", "| --- | --- | --- |"]
        final = validations[-1]
        for key, label, higher in (("loss", "loss", False), ("psnr", "PSNR (dB)", True), ("ssim", "SSIM", True)):
            best = _best(validations, key, higher=higher)
            if best is None:
                continue
            fin = f"{_fmt(final.get(key))} (step {final['step']})" if key in final else "—"
            lines.append(f"| {label} | {fin} | {_fmt(best[key])} (step {best['step']}) |")
            summary[f"final_validation_{key}"] = final.get(key)
            summary[f"best_validation_{key}"] = best[key]
            summary[f"best_validation_{key}_step"] = best["step"]
        lines.append("")
    events_text = []
    if checkpoints:
        events_text.append(f"{len(checkpoints)} checkpoint(s), the last at step {checkpoints[-1]['step']}"
                           + (f" (`{checkpoints[-1]['path']}`)" if "path" in checkpoints[-1] else ""))
    if resumes:
        events_text.append(f"resumed {len(resumes)} time(s), at step(s) {', '.join(str(e['step']) for e in resumes)} "
                           "(dashed lines)")
    if stops:
        events_text.append(f"stopped by a signal at step(s) {', '.join(str(e['step']) for e in stops)} (dotted lines)")
    if bad:
        events_text.append(f"{bad} unreadable line(s) in `metrics.jsonl` skipped")
    if events_text:
        lines += ["Events: " + "; ".join(events_text) + ".", ""]
    if (run_dir / "config.resolved.yaml").is_file():
        lines += [f"Config: `{run_dir / 'config.resolved.yaml'}`.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in figures]
    markdown = out_dir / "report.md"
    markdown.write_text("\n".join(lines).rstrip() + "\n")
    return ReportResult("run", out_dir, markdown, figures, [], summary)
