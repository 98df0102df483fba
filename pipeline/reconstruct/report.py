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

This module is the entry point; the run report is in :mod:`pipeline.reconstruct.report_run`,
the image report in :mod:`pipeline.reconstruct.report_image`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from pipeline.paths import local_arg

from .ome_image import open_ome_image
from .report_image import image_report
from .report_run import ReportResult, run_report

__all__ = ["report", "add_parser", "run_cli"]


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
    from pipeline.paths import is_url, local_path

    url = is_url(target)
    root = Path(str(target)) if url else local_path(target)
    if url:
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
        return run_report(root, out)
    try:
        open_ome_image(target)
    except ValueError as err:
        raise ValueError(f"'{target}' is neither a run directory (no metrics.jsonl) nor an OME-Zarr "
                         f"image: {err}") from None
    _claim(out, target, [target, *baselines, reference])
    return image_report(target, out, baselines, reference, metrics, workers)


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
