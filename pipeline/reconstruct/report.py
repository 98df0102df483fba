"""Figures and a Markdown summary of a training run or of a reconstruction.

``recon3d report RUN_DIR|OUT [--out DIR] [--baseline OUT2 ...] [--reference SCAN]``

* **A run directory** (it holds ``metrics.jsonl``): ``training.png`` (loss and its parts,
  learning rate, throughput and data wait against the step; resumes marked),
  ``validation.png`` (validation loss, PSNR, SSIM against the step) and ``report.md`` with the
  final and best values.
* **An OME-Zarr reconstruction**: ``slices.png`` — the central z, y and x slices of the
  reference (from the scan named in the store's ``recon3d.scan`` attribute, or ``--reference``),
  of the reconstruction and of each ``--baseline``, all on one intensity window, and of their
  absolute errors, on one error window — plus ``metrics.json`` and ``report.md`` with the
  PSNR / SSIM / NMSE of every volume (:func:`~pipeline.reconstruct.evaluate.evaluate`) when
  the scan has a reference.

Nothing reads a whole volume: the slices come from the planes themselves (the reference, which
is chunked along D, chunk by chunk), and the intensity windows are percentiles of a subsample
(a few evenly spaced z-planes, strided to at most 128 pixels a side). The output goes to
``RUN_DIR/report/`` for a run and to the folder ``NAME.report/`` beside an image
``NAME.ome.zarr`` (not inside it: a folder inside a zarr hierarchy that is not a zarr node
makes zarr and viewers warn), unless ``out_dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.paths import local_arg

from .evaluate import OmeImage, evaluate, open_ome_image

__all__ = ["report", "ReportResult", "read_run_log", "add_parser", "run_cli"]

#: Percentiles of the intensity window and the top of the error window.
WINDOW_PERCENTILES = (0.5, 99.5)
#: z-planes and pixels per side of the subsample the windows are computed on.
SUBSAMPLE_PLANES, SUBSAMPLE_SIDE = 6, 128
CUTS = ("z", "y", "x")
#: The store's ``recon3d`` attributes listed in report.md (when present).
SHOWN_ATTRS = ("method", "modality", "model", "weights", "run_dir", "step", "exact", "complete", "completed")


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
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


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


def _run_report(run_dir: Path, out_dir: Path) -> ReportResult:
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


# ============================================================================ images
class _Planes:
    """The central planes and a subsample of one volume (magnitudes, float64)."""

    def __init__(self, label: str, planes: dict[str, np.ndarray], subsample: np.ndarray) -> None:
        self.label, self.planes, self.subsample = label, planes, subsample


def _magnitude(values: np.ndarray) -> np.ndarray:
    return np.abs(values).astype(np.float64) if values.dtype.kind == "c" else values.astype(np.float64)


def _centres(shape: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]


def _subsample_planes(depth: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, depth - 1, min(depth, SUBSAMPLE_PLANES))})


def _stride(shape: Sequence[int]) -> tuple[int, int]:
    return max(1, math.ceil(shape[1] / SUBSAMPLE_SIDE)), max(1, math.ceil(shape[2] / SUBSAMPLE_SIDE))


def _image_planes(image: OmeImage, label: str) -> _Planes:
    d, h, w = _centres(image.shape)
    planes = {"z": image.plane(0, d), "y": image.plane(1, h), "x": image.plane(2, w)}
    sh, sw = _stride(image.shape)
    sub = [image.plane(0, k)[::sh, ::sw] for k in _subsample_planes(image.shape[0])]
    return _Planes(label, {k: _magnitude(v) for k, v in planes.items()}, _magnitude(np.stack(sub)))


def _reference_planes(ref, shape: Sequence[int]) -> _Planes:
    """Planes of a scan's reference, which is chunked along D: read chunk by chunk."""
    d, h, w = _centres(shape)
    cd = ref.chunk_depth or 1
    y_plane = np.empty((shape[0], shape[2]), np.float64)
    x_plane = np.empty((shape[0], shape[1]), np.float64)
    for lo in range(0, shape[0], cd):
        hi = min(lo + cd, shape[0])
        block = _magnitude(ref.read(slice(lo, hi)))
        y_plane[lo:hi], x_plane[lo:hi] = block[:, h, :], block[:, :, w]
    sh, sw = _stride(shape)
    sub = np.stack([_magnitude(ref.read(slice(k, k + 1))[0])[::sh, ::sw] for k in _subsample_planes(shape[0])])
    z_plane = _magnitude(ref.read(slice(d, d + 1))[0])
    return _Planes("reference", {"z": z_plane, "y": y_plane, "x": x_plane}, sub)


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES))
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    return lo, hi


def _slices_figure(volumes: list[_Planes], reference: _Planes | None, scale: Sequence[float], path: Path,
                   uncertainty: dict[str, _Planes] | None = None) -> None:
    """Central planes of each volume; with a reference its |error| beside it, and a volume's
    bootstrap ``uncertainty`` (an RMS-error map, so in the same window as |error|) after that."""
    uncertainty = uncertainty or {}
    base = reference if reference is not None else volumes[0]
    vmin, vmax = _window(base.subsample)
    emax = None
    if reference is not None:
        errors = np.concatenate([np.abs(v.subsample - reference.subsample).ravel() for v in volumes])
        emax = _window(errors)[1]
    elif uncertainty:
        emax = _window(np.concatenate([u.subsample.ravel() for u in uncertainty.values()]))[1]
    columns: list[tuple[str, dict[str, np.ndarray], str]] = []
    if reference is not None:
        columns.append(("reference", reference.planes, "image"))
    for v in volumes:
        columns.append((v.label, v.planes, "image"))
        if reference is not None:
            columns.append((f"|error| {v.label}", {k: np.abs(v.planes[k] - reference.planes[k]) for k in CUTS}, "error"))
        if v.label in uncertainty:
            columns.append((f"uncertainty {v.label}", uncertainty[v.label].planes, "error"))
    dz, dy, dx = scale
    aspects = {"z": dy / dx, "y": dz / dx, "x": dz / dy}
    names = {"z": "z (axial)", "y": "y (coronal)", "x": "x (sagittal)"}
    # Row heights follow each plane's displayed height / width, so little space is wasted.
    ratios = [base.planes[c].shape[0] * aspects[c] / base.planes[c].shape[1] for c in CUTS]
    ratios = [min(max(r, 0.25), 4.0) for r in ratios]
    width = 2.0 * len(columns) + 1.4
    fig = _figure(width, 2.0 * sum(ratios) + 0.6)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(CUTS), len(columns), squeeze=False, gridspec_kw={"height_ratios": ratios})
    shown = {}
    for row, cut in enumerate(CUTS):
        for col, (title, planes, kind) in enumerate(columns):
            ax = axes[row, col]
            top = (0.0, emax) if kind == "error" else (vmin, vmax)
            shown[kind] = ax.imshow(planes[cut], cmap="magma" if kind == "error" else "gray",
                                    vmin=top[0], vmax=top[1], aspect=aspects[cut], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
            if col == 0:
                ax.set_ylabel(names[cut], fontsize=8)
    for kind, label in (("image", "intensity"), ("error", "|error| / RMS error" if uncertainty else "|error|")):
        if kind in shown:
            bar = fig.colorbar(shown[kind], ax=axes, shrink=0.7, aspect=30)
            bar.set_label(label, fontsize=8)
            bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)


def _label(image: OmeImage, taken: set[str]) -> str:
    name = str(image.attrs.get("method") or Path(image.path.rstrip("/")).name)
    label, k = name, 2
    while label in taken:
        label, k = f"{name} ({k})", k + 1
    taken.add(label)
    return label


def _image_report(target: Any, out_dir: Path, baselines: Sequence[Any], reference: Any,
                  with_metrics: bool, workers: int) -> ReportResult:
    from pipeline.data import open_scan

    main = open_ome_image(target)
    images = [main]
    for other in baselines:
        image = open_ome_image(other)
        if image.shape != main.shape:
            raise ValueError(f"baseline OME-Zarr '{other}': level 0 has shape {image.shape}, but "
                             f"'{target}' has {main.shape}")
        images.append(image)
    notes = []
    if main.attrs.get("complete") is False:
        notes.append(f"`{target}` is not complete (attribute `recon3d.complete` is false): rerun "
                     "`recon3d reconstruct` to finish it; unwritten chunks show as NaN.")
    scan_path = reference if reference is not None else main.attrs.get("scan")
    scan = ref = None
    if scan_path:
        try:
            scan = open_scan(scan_path)
        except (FileNotFoundError, ValueError) as err:
            if reference is not None:
                raise
            notes.append(f"The scan `{scan_path}` named in the store could not be opened ({err}); "
                         "no reference.")
        if scan is not None:
            ref = scan.reference
            if ref is None:
                notes.append(f"The scan `{scan_path}` has no reference: no error maps or metrics.")
            elif tuple(ref.shape) != main.shape:
                raise ValueError(f"OME-Zarr '{target}': level 0 has shape {main.shape} but the reference "
                                 f"of scan '{scan_path}' has shape {tuple(ref.shape)}")
    else:
        notes.append("The store names no scan (attribute `recon3d.scan`): no reference.")

    taken: set[str] = set()
    volumes = [_image_planes(image, _label(image, taken)) for image in images]
    ref_planes = _reference_planes(ref, main.shape) if ref is not None else None
    maps: dict[str, _Planes] = {}
    for image, planes in zip(images, volumes):
        if "uncertainty" in image.attrs.get("settings", {}):  # written with --uncertainty N
            try:
                maps[planes.label] = _image_planes(open_ome_image(f"{str(image.path).rstrip('/')}/uncertainty"),
                                                   f"uncertainty {planes.label}")
            except (FileNotFoundError, ValueError) as err:
                notes.append(f"The uncertainty map of {planes.label} could not be read ({err}).")
    figure = out_dir / "slices.png"
    _slices_figure(volumes, ref_planes, main.scale, figure, maps)

    metrics = []
    if ref is not None and with_metrics:
        for image, planes in zip(images, volumes):
            try:
                result = evaluate(image.path, scan, workers=workers)
            except ValueError as err:  # e.g. an unfinished reconstruction (NaN chunks)
                notes.append(f"No metrics for {planes.label}: {err}")
                continue
            metrics.append({"volume": planes.label, **result})
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    unit = main.units[-1] or "voxel"
    lines = [f"# recon3d report — `{target}`", "", "| | |", "| --- | --- |",
             f"| shape (z, y, x) | {' × '.join(str(s) for s in main.shape)} |",
             f"| voxel size | {' × '.join(_fmt(float(s)) for s in main.scale)} {unit} |"]
    for key in SHOWN_ATTRS:
        value = main.attrs.get(key)
        if isinstance(value, (str, int, float, bool)):
            lines.append(f"| {key} | {_fmt(value)} |")
    lines.append(f"| scan | `{scan_path}` |" if scan_path else "| scan | — |")
    for image, planes in zip(images[1:], volumes[1:]):
        lines.append(f"| baseline {planes.label} | `{image.path}` |")
    lines.append("")
    if metrics:
        lines += ["## Metrics against the reference", "",
                  f"Whole volume, magnitudes; R = max|reference| = {_fmt(metrics[0]['data_range'], 6)}; "
                  f"SSIM with {metrics[0]['ssim_window']}³ uniform windows (`recon3d evaluate`).", "",
                  "| volume | PSNR (dB) | SSIM | NMSE |", "| --- | --- | --- | --- |"]
        lines += [f"| {m['volume']} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['nmse']:.4g} |" for m in metrics]
        lines.append("")
    lines += notes + ([""] if notes else [])
    lines += ["Central slices; one intensity window for every volume (percentiles "
              f"{WINDOW_PERCENTILES[0]}–{WINDOW_PERCENTILES[1]} of the "
              f"{'reference' if ref_planes is not None else 'reconstruction'} on a subsample)"
              + (", one error window for every |error| map." if ref_planes is not None else ".")
              + (" The uncertainty columns are the per-voxel RMS error from the equivariant bootstrap "
                 "(`reconstruct --uncertainty N`, docs/estimate.md), in the same window as the |error| maps."
                 if maps else ""), "",
              f"![slices]({figure.name})"]
    markdown = out_dir / "report.md"
    markdown.write_text("\n".join(lines) + "\n")
    return ReportResult("image", out_dir, markdown, [figure], metrics, {})


# ============================================================================ entry points
def default_image_report_dir(image: Path) -> Path:
    """``NAME.report/`` beside ``NAME.ome.zarr`` (or ``NAME.zarr``, or any other name)."""
    name = image.name.rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return image.parent / f"{name}.report"


def report(
    target: str | Path,
    out_dir: str | Path | None = None,
    *,
    baselines: Sequence[str | Path] = (),
    reference: str | Path | None = None,
    metrics: bool = True,
    workers: int = 2,
) -> ReportResult:
    """Write PNG figures and ``report.md`` for a run directory or an OME-Zarr reconstruction.

    Args:
        target: a run directory (holding ``metrics.jsonl``) or an OME-Zarr image.
        out_dir: where to write (default: ``RUN_DIR/report/``; for an image ``NAME.ome.zarr``
            or ``NAME.zarr``, the folder ``NAME.report/`` beside it).
        baselines: other OME-Zarr images of the same volume shown beside it (images only).
        reference: the scan holding the reference (default: the store's ``recon3d.scan``).
        metrics: run :func:`evaluate` on every volume when there is a reference.
        workers: dask threads for :func:`evaluate`.

    Raises:
        FileNotFoundError: ``target`` (or a baseline, or ``reference``) does not exist.
        ValueError: ``target`` is neither a run nor an OME-Zarr image; shapes disagree.
    """
    root = Path(str(target).removeprefix("file://"))
    if "://" in str(target).removeprefix("file://"):
        if out_dir is None:
            raise ValueError(f"report target '{target}' is a URL: give the output folder (--out DIR)")
    elif not root.exists():
        raise FileNotFoundError(f"report target '{target}' not found")
    is_run = root.is_dir() and (root / "metrics.jsonl").is_file()
    if is_run and baselines:
        raise ValueError(f"'{target}' is a run directory; --baseline applies to OME-Zarr reconstructions")
    out = Path(out_dir) if out_dir is not None else (root / "report" if is_run else default_image_report_dir(root))
    if is_run:
        _claim(out, target, [])
        return _run_report(root, out)
    try:
        open_ome_image(target)
    except ValueError as err:
        raise ValueError(f"'{target}' is neither a run directory (no metrics.jsonl) nor an OME-Zarr "
                         f"image: {err}") from None
    _claim(out, target, [target, *baselines, reference])
    return _image_report(target, out, baselines, reference, metrics, workers)


def _claim(out: Path, target: Any, inputs: Sequence[Any]) -> None:
    """Make ``out`` the report folder, refusing one that ``recon3d report`` did not write.

    A report replaces its own earlier folder (marked by ``.recon3d-report.json``); a foreign
    non-empty folder, a file, a run directory, a zarr group or a path inside an image or scan
    it reads is refused (:class:`~pipeline.errors.OutputConflictError`).
    """
    from pipeline.outputs import check_output, write_report_marker

    check_output(out, "report", inputs=[i for i in inputs if i is not None])
    out.mkdir(parents=True, exist_ok=True)
    write_report_marker(out, target)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recon3d report`` to the ``recon3d`` sub-parsers."""
    p = subparsers.add_parser(
        "report",
        help="PNG figures and a Markdown summary of a run or of a reconstruction",
        description="For a run directory: loss, loss parts and validation curves from "
        "metrics.jsonl. For an OME-Zarr reconstruction: central z/y/x slices of the "
        "reconstruction, the baselines, the reference and the absolute errors, and a PSNR/SSIM/NMSE "
        "table when the scan has a reference. Writes PNGs and report.md into RUN_DIR/report/, or "
        "beside an image NAME.ome.zarr into NAME.report/.",
    )
    p.add_argument("target", help="a run directory or an OME-Zarr reconstruction")
    p.add_argument("--out", type=local_arg("report --out", "the figures and report.md are written to a local "
                                           "folder", as_path=False), default=None, metavar="DIR", help="output folder (default: RUN_DIR/report, or NAME.report/ beside NAME.ome.zarr); "
                   "a report replaces its own earlier folder, never a folder it did not write")
    p.add_argument("--baseline", nargs="+", action="extend", default=[], metavar="OUT",
                   help="other reconstructions of the same scan to show beside it, on the same "
                   "windows (repeatable)")
    p.add_argument("--reference", default=None, metavar="SCAN",
                   help="the scan with the reference (default: the one named in the store)")
    p.add_argument("--no-metrics", action="store_true", help="skip the PSNR/SSIM/NMSE evaluation")
    p.add_argument("--workers", type=int, default=2, help="slabs evaluated at once (default: 2)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``recon3d report``; prints the path of ``report.md``."""
    result = report(args.target, args.out, baselines=args.baseline, reference=args.reference,
                    metrics=not args.no_metrics, workers=args.workers)
    print(result.markdown)
    return 0
