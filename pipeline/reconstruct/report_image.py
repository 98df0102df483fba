"""The report of an OME-Zarr reconstruction (``recon3d report OUT``).

``slices.png`` — the central z, y and x slices of the reference, of the reconstruction and of
each baseline on one intensity window, and of their absolute errors on one error window (and
the uncertainty maps when the output has them) — plus ``metrics.json`` and ``report.md`` with
the PSNR / SSIM / NMSE of every volume (:func:`~pipeline.reconstruct.evaluate.evaluate`) when
the scan has a reference. Nothing reads a whole volume: the slices come from the planes
themselves, and the windows are percentiles of a subsample (a few evenly spaced z-planes,
strided to at most ``SUBSAMPLE_SIDE`` pixels a side). The entry point is
:func:`pipeline.reconstruct.report.report`.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .evaluate import evaluate
from .ome_image import OmeImage, open_ome_image
from .report_run import ReportResult, _figure, _fmt


#: Percentiles of the intensity window and the top of the error window.
WINDOW_PERCENTILES = (0.5, 99.5)
#: z-planes and pixels per side of the subsample the windows are computed on.
SUBSAMPLE_PLANES, SUBSAMPLE_SIDE = 6, 128
CUTS = ("z", "y", "x")
#: The store's ``recon3d`` attributes listed in report.md (when present).
SHOWN_ATTRS = ("method", "modality", "model", "weights", "run_dir", "step", "exact", "complete", "completed")
#: Column titles of the classical methods (``recon3d reconstruct --method``).
METHOD_NAMES = {"fbp": "FBP", "fdk": "FDK", "sense": "SENSE", "tv": "TV", "adjoint": "adjoint"}
#: Inches per column of the slices figure (each panel is that wide).
PANEL_WIDTH = 2.8
#: The least height / width of a displayed coronal or sagittal plane (thin volumes are stretched in z).
MIN_RATIO = 0.45


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
                   uncertainty: dict[str, _Planes] | None = None, intensity: str = "intensity") -> None:
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
    # A thin volume's coronal and sagittal planes would be slivers: their z axis is stretched by
    # a whole factor until they are at least MIN_RATIO as high as wide, and the row label says so.
    for cut in ("y", "x"):
        ratio = base.planes[cut].shape[0] * aspects[cut] / base.planes[cut].shape[1]
        stretch = min(4, math.ceil(MIN_RATIO / ratio)) if 0 < ratio < MIN_RATIO else 1
        if stretch > 1:
            aspects[cut] *= stretch
            names[cut] += f", z ×{stretch}"
    # Row heights follow each plane's displayed height / width, so little space is wasted.
    ratios = [base.planes[c].shape[0] * aspects[c] / base.planes[c].shape[1] for c in CUTS]
    ratios = [min(max(r, 0.25), 4.0) for r in ratios]
    width = PANEL_WIDTH * len(columns) + 1.6
    fig = _figure(width, PANEL_WIDTH * sum(ratios) + 1.0)
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
            if row == 0:  # wrapped to the panel's width: neighbouring titles never overlap
                ax.set_title(textwrap.fill(title, width=int(PANEL_WIDTH * 8)), fontsize=9)
            if col == 0:
                ax.set_ylabel(names[cut], fontsize=9)
    error = "|error| / RMS error" if uncertainty else "|error|"
    for kind, label in (("image", intensity), ("error", f"{error}, same units")):
        if kind in shown:
            bar = fig.colorbar(shown[kind], ax=axes, shrink=0.7, aspect=30)
            bar.set_label(label, fontsize=8)
            bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=110)


def _label(image: OmeImage, taken: set[str]) -> str:
    """The column title of a volume: its method (FBP, TV, ...), "network" for a trained model,
    else its file name; repeated names are numbered."""
    method = image.attrs.get("method")
    if method:
        name = METHOD_NAMES.get(str(method), str(method))
    elif image.attrs.get("model"):
        name = "network" + (f" (step {image.attrs['step']})" if isinstance(image.attrs.get("step"), int) else "")
    else:
        name = Path(str(image.path).rstrip("/")).name
    label, k = name, 2
    while label in taken:
        label, k = f"{name} ({k})", k + 1
    taken.add(label)
    return label


#: What a value in the attribute table means, where the bare value says little.
_EXPLAINED = {
    ("exact", True): " (slab by slab equals the whole volume at once, to rounding: the halo covers the "
                     "model's receptive radius)",
    ("exact", False): " (slab by slab differs from the whole volume at once by more than rounding near slab "
                      "borders: the halo is below the receptive radius, or see `notes` in the store's attributes)",
    ("complete", False): " (not every slab is written yet: rerun `recon3d reconstruct` to finish)",
}


def _intensity_label(image: OmeImage) -> str:
    """The intensity bar's label with its units: attenuation per length for CT, arbitrary units for
    MRI magnitudes (``docs/scan-format.md``)."""
    unit = image.units[-1]
    if image.attrs.get("modality") == "ct":
        return f"attenuation (1/{unit})" if unit else "attenuation (per voxel-size unit)"
    if image.attrs.get("modality") == "mri":
        return "magnitude (a.u.)"
    return "intensity"


def image_report(target: Any, out_dir: Path, baselines: Sequence[Any], reference: Any,
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
    _slices_figure(volumes, ref_planes, main.scale, figure, maps, _intensity_label(main))

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
            lines.append(f"| {key} | {_fmt(value)}{_EXPLAINED.get((key, value), '')} |")
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
