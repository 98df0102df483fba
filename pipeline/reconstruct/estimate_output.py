"""The reference-free error estimate of a written output: ``recon3d evaluate OUT --estimate``.

:func:`estimate_output` rebuilds the reconstruction that made an OME-Zarr output (from what its
attributes record) and runs :func:`~pipeline.estimate.estimate_error` on a few
D-blocks of its scan; :class:`EstimateRefused` says why an output or scan cannot be estimated.
The method is in :mod:`pipeline.estimate` and ``docs/estimate.md``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pipeline.estimate import (HANDLED_NOISE, OUTSIDE_RATIO_CAUTION, ErrorEstimate, estimate_error, estimate_pilot,
                               not_estimable_detector, outside_ratio)

__all__ = ["EstimateRefused", "estimate_output"]


class EstimateRefused(ValueError):
    """The scan or the output is one the reference-free estimate cannot handle (with the reason)."""


def _output_reconstructor(image, scan, device: torch.device):
    """``(f, description)``: the reconstructor that made the OME-Zarr ``image``,
    rebuilt from what its attributes record (the method and the values it used, or the model
    and the scan's intensity scale)."""
    from pipeline.data.format import CTGeometry

    from .adapters import _Classical, _Network
    from .config import ReconstructConfig
    from pipeline.models import reconstructor_of

    attrs = image.attrs
    if attrs.get("kind") != "reconstruction" and attrs.get("written_by") != "reconstruct":
        raise EstimateRefused(f"'{image.path}' was not written by `recon3d reconstruct`; the estimate "
                              "re-runs the reconstruction that made it, which only such an output records")
    geom = scan.metadata.geometry
    if isinstance(geom, CTGeometry) and geom.kind == "cone":
        raise EstimateRefused(f"scan '{scan.path}' is cone beam: its rays cross slabs, so no slab can be "
                              "reconstructed again from its own views (the estimate needs that)")
    method, model = attrs.get("method"), attrs.get("model")
    if model:
        config = ReconstructConfig(scan=str(scan.path), out=str(image.path), model=str(model), progress=False,
                                   pick=attrs.get("pick") or "latest")
        net = _Network(scan, config, device, rank=0)
        scale = attrs.get("intensity_scale")
        from pipeline.models import intensity_scale

        def f(y, op):
            with intensity_scale(net.model, scale):
                return net.apply(y, op)

        kind = type(reconstructor_of(net.model)).__name__
        return f, {"model": str(model), "network": kind, "intensity_scale": scale}
    if method in (None, "fdk"):
        raise EstimateRefused(f"'{image.path}' records method {method!r}; the estimate handles adjoint, fbp, "
                              "sense, tv and trained models")
    params = attrs.get("parameters") or {}
    recon = _Classical(scan, ReconstructConfig(scan=str(scan.path), out=str(image.path), method=method,
                                               progress=False), device)
    if method != "adjoint":
        missing = [k for k in recon.params if k not in params]
        if missing:
            raise EstimateRefused(f"'{image.path}' does not record the {method} parameters {missing} it used")
        recon.params = {k: params[k] for k in recon.params}
    return recon.apply, {"method": method, "parameters": dict(recon.params)}


def estimate_output(out, scan=None, *, blocks: int = 3, thickness: int | None = None, draws: int = 8,
                    folds: int = 4, fraction: float = 0.1, seed: int = 0, data_range: float | None = None,
                    device: str = "cpu", say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """A reference-free estimate of the error of a written reconstruction (``recon3d evaluate
    OUT --estimate``).

    The reconstruction that made ``out`` (its attributes record the method and the values it
    used, or the model) is re-run by :func:`estimate_error` on ``blocks`` evenly spaced
    D-blocks of ``thickness`` slices of the scan — out of core: one block's measurements at a
    time — and the blocks' MSEs are averaged (weighted by their voxels) and their intervals
    summed. The PSNR uses ``data_range`` (default: the largest ``|value|`` of ``out``, read slab
    by slab).

    Raises:
        EstimateRefused: no noise model, one the estimate does not handle, a cone-beam scan, an
            output of another tool or of a method the estimate cannot re-run.
    """
    import time

    import numpy as np

    from pipeline.classical import calibration_blocks
    from pipeline.data import open_scan

    from .adapters import _SlabReader
    from .ome_image import open_ome_image

    t0 = time.perf_counter()
    image = open_ome_image(out)
    scan_path = scan if scan is not None else image.attrs.get("scan")
    if scan_path is None:
        raise EstimateRefused(f"'{out}' records no scan; give --scan SCAN")
    scan_obj = scan_path if hasattr(scan_path, "metadata") else open_scan(scan_path)  # a path, or an open Scan
    why = not_estimable_detector(scan_obj.metadata)
    if why is not None:
        raise EstimateRefused(f"scan '{scan_obj.path}': {why}; compare with a reference (--reference) instead")
    noise = scan_obj.metadata.noise()
    if noise is None:
        raise EstimateRefused(
            f"scan '{scan_obj.path}' records no noise model, and without one nothing can be said of the error "
            "without a reference; record it when ingesting (`recon3d ingest ct --photons I0`, `recon3d ingest mri "
            "--noise-sigma SIGMA`) or compare with a reference (--reference)")
    if noise.kind not in HANDLED_NOISE:
        raise EstimateRefused(
            f"scan '{scan_obj.path}': the estimate handles noise models {list(HANDLED_NOISE)}, and this scan's is "
            f"{noise.to_dict()} (its debiasing and re-measuring were not validated for it)")
    depth = int(scan_obj.metadata.volume_shape[0])
    if tuple(image.shape) != tuple(int(s) for s in scan_obj.metadata.volume_shape):
        raise EstimateRefused(f"'{out}' has shape {image.shape}, the scan's volume {scan_obj.metadata.volume_shape}")
    dev = torch.device(device)
    f, made_by = _output_reconstructor(image, scan_obj, dev)
    thickness = int(thickness or min(8, depth))
    spans = calibration_blocks(depth, blocks, thickness)
    read = _SlabReader(scan_obj)
    rows = []
    for i, (lo, hi) in enumerate(spans):
        say(f"estimate: block {i + 1}/{len(spans)} (D {lo}:{hi})")
        y, op = read(lo, hi)
        y, op = y.to(dev), op.to(dev)
        x_hat = f(y, op)
        est = estimate_error(y, op, noise, f, x_hat=x_hat, draws=draws, folds=folds, fraction=fraction, seed=seed + i,
                             pilot=estimate_pilot(y, op, noise, x_hat), say=say)
        rows.append({"d": [lo, hi], **est.to_dict()})
        if op.kind == "parallel":
            rows[-1]["outside_ratio"] = outside_ratio(x_hat)
        del y, op
    weights = [r["d"][1] - r["d"][0] for r in rows]
    total = float(sum(weights))
    avg = lambda key: sum(w * r[key] for w, r in zip(weights, rows)) / total  # noqa: E731
    mse, low, high = avg("mse"), avg("mse_low"), avg("mse_high")
    source = "given"
    if data_range is None:
        peak = 0.0
        for a in range(0, depth, max(1, image.chunk_depth)):
            peak = max(peak, float(np.abs(image.read(a, min(depth, a + max(1, image.chunk_depth)))).max()))
        data_range, source = peak, "max |reconstruction|"
    if not data_range > 0:
        raise EstimateRefused(f"'{out}' is zero everywhere; give --data-range")
    summary = ErrorEstimate(mse=mse, mse_low=low, mse_high=high, bootstrap_mse=avg("bootstrap_mse"), cv=avg("cv"),
                            ratio=avg("ratio"), ratios=[r["ratio"] for r in rows], draws=draws, folds=folds,
                            fraction=fraction, seed=int(seed))
    cautions = []
    outside = max((r.get("outside_ratio", 0.0) for r in rows), default=0.0)
    if outside > OUTSIDE_RATIO_CAUTION:
        cautions.append(
            f"the object reaches outside the inscribed circle of the slices (mean there {outside:.2f} of the mean "
            "inside): it is cut by the field of view, and the estimate's rotations see only the circle; on such "
            "scans it was off by up to 3.7 dB, pessimistic (docs/estimate.md, Cautions)")
    return {
        **summary.psnr(float(data_range)),
        "cautions": cautions,
        "estimator": summary.estimator,
        "estimated_mse": mse,
        "estimated_mse_low": low,
        "estimated_mse_high": high,
        "bootstrap_mse": summary.bootstrap_mse,
        "data_range": float(data_range),
        "data_range_source": source,
        "of": "the complex image" if scan_obj.modality == "mri" else "the image",
        "reconstruction": made_by,
        "scan": str(scan_obj.path),
        "blocks": rows,
        "draws": draws, "folds": folds, "fraction": fraction, "seed": int(seed),
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ----------------------------------------------------------------------------- uncertainty maps
