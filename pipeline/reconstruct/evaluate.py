"""Whole-volume PSNR, SSIM and NMSE of a reconstruction against a scan's reference, out of core.

``recon3d evaluate OUT --reference SCAN [--json FILE] [--mask FILE|object] [--data-range R]``

``OUT`` is an OME-Zarr image (0.5: the ``ome`` attribute of a zarr v3 group; 0.4's top-level
``multiscales`` is read too) whose level 0 (``multiscales[0].datasets[0].path``) is a
``(z, y, x)`` volume; ``SCAN`` is a recon3d scan with a ``reference`` array of the same shape.
Complex values (MRI) are compared as magnitudes, real ones (CT attenuation) as they are,
signed (as :mod:`pipeline.reconstruct.metrics` does). The command reports the whole volume and,
unless a mask is given or ``--no-object``, the object (``--mask object``) next to it: the
background of a volume is easy to get right and dilutes the whole-volume figures.

How it stays out of core: the volume is cut into D-slabs (a whole number of OUT's chunks,
about 16 MiB of OUT per slab); one dask task per slab reads its slab plus a halo of
``window // 2`` slices on each side from OUT, the reference and the mask, and returns five
partial sums; the float64 work inside a task goes strip by strip along H (4 MiB
temporaries). Peak memory is about ``workers × (4 slabs + 100 MiB)``, whatever the volume's
size. A first pass over the reference finds ``max |reference|`` when ``data_range`` is not
given (or the mask is ``object``).

Definitions (``a`` = OUT, ``b`` = the reference — magnitudes when complex —, ``M`` = the mask,
all voxels when none):

* ``R`` (data range) = ``data_range`` if given, else ``max b`` over ``M``.
* ``PSNR = 10 log10(R² / mean_M (a − b)²)``, ``NMSE = Σ_M (a − b)² / Σ_M b²`` — equal to
  :func:`~pipeline.reconstruct.metrics.psnr` / :func:`~pipeline.reconstruct.metrics.nmse`
  with the same ``mask``.
* ``SSIM`` = the mean of the local SSIM map of :func:`~pipeline.reconstruct.metrics.ssim`
  (uniform ``window³`` windows, unbiased local variances, ``C₁ = (0.01R)²``, ``C₂ = (0.03R)²``;
  equal to scikit-image's ``structural_similarity``) over the voxels whose whole window lies
  inside the volume — and, with a mask, that are also in ``M``. Slab halos make windows that
  cross slab and chunk boundaries exact, so the unmasked value equals ``metrics.ssim``.

``--mask object`` is ``b > object_threshold · max b`` (default 0.1); ``--mask FILE`` is a
boolean (or 0/1) ``(D, H, W)`` volume in a ``.npy`` file (memory-mapped) or a zarr array
(or an OME-Zarr image, level 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from pipeline.paths import is_url, local_arg

__all__ = ["evaluate", "OmeImage", "open_ome_image", "add_parser", "run_cli"]

#: Target size of one evaluation slab of one volume as stored (slabs are whole chunks of OUT).
TARGET_SLAB_BYTES = 16 << 20
#: Size of one float64 temporary of the per-strip work inside a slab.
STRIP_BYTES = 4 << 20


# ----------------------------------------------------------------------------- OME-Zarr input
@dataclass
class OmeImage:
    """Level 0 of an OME-Zarr image, read by D-ranges.

    Attributes:
        path: the store.
        array: the level-0 zarr array.
        shape: its spatial ``(D, H, W)`` (leading singleton axes, e.g. ``t`` or ``c``, dropped).
        scale: the level-0 voxel size ``(dz, dy, dx)`` (1 where the metadata has none).
        units: the spatial axes' units (``None`` where absent).
        attrs: the group's ``recon3d`` attributes (``{}`` when absent).
        levels: the paths of every level, finest first.
    """

    path: str
    array: Any
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    units: tuple[str | None, str | None, str | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    levels: tuple[str, ...] = ()

    @property
    def chunk_depth(self) -> int:
        return int(self.array.chunks[self.array.ndim - 3])

    def _lead(self) -> tuple[int, ...]:
        return (0,) * (self.array.ndim - 3)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Slices ``lo:hi`` along D as a ``(hi − lo, H, W)`` numpy array (NaN/Inf is an error)."""
        values = np.asarray(self.array[self._lead() + (slice(lo, hi),)])
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise ValueError(
                f"OME-Zarr '{self.path}': level 0 holds NaN/Inf in D {lo}:{hi}; an unfinished "
                "reconstruction leaves unwritten chunks as NaN — rerun `recon3d reconstruct`"
            )
        return values

    def plane(self, axis: int, index: int) -> np.ndarray:
        """The 2D slice at ``index`` along spatial ``axis`` (0: z, 1: y, 2: x); reads nothing else."""
        sel: list[Any] = [slice(None)] * 3
        sel[axis] = int(index)
        return np.asarray(self.array[self._lead() + tuple(sel)])


def _require_exists(path: Any, what: str) -> None:
    if not is_url(path) and not Path(str(path).removeprefix("file://")).exists():
        raise FileNotFoundError(f"{what} '{path}' not found")


def _open_zarr_group(path: Any, what: str):
    import zarr

    from pipeline.data.format import open_store

    _require_exists(path, what)
    store = open_store(path, read_only=True)
    try:
        return zarr.open(store=store, mode="r")
    except Exception as err:  # zarr raises several kinds for a folder that is not a store
        raise ValueError(f"{what} '{path}': not a readable zarr store ({type(err).__name__}: {err})") from None


def open_ome_image(path: Any) -> OmeImage:
    """Open an OME-Zarr image's level 0 (``multiscales[0].datasets[0]``) read-only.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: not an OME-Zarr image, or level 0 is not a (z, y, x) volume.
    """
    import zarr

    where = f"OME-Zarr '{path}'"
    group = _open_zarr_group(path, "OME-Zarr store")
    if not isinstance(group, zarr.Group):
        raise ValueError(f"{where}: is a zarr array, not an OME-Zarr image group")
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 is top level
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if not multiscales:
        raise ValueError(f"{where}: no 'ome.multiscales' attribute; not an OME-Zarr image "
                         "(write one with `recon3d reconstruct`)")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ValueError(f"{where}: multiscales[0] lists no datasets")
    level0 = str(datasets[0]["path"])
    try:
        array = group[level0]
    except KeyError:
        raise ValueError(f"{where}: level-0 array '{level0}' is missing") from None
    if not isinstance(array, zarr.Array):
        raise ValueError(f"{where}: level 0 '{level0}' is not an array")
    if array.ndim < 3 or any(int(s) != 1 for s in array.shape[:-3]):
        raise ValueError(f"{where}: level 0 has shape {tuple(array.shape)}; expected a (z, y, x) "
                         "volume (leading axes, if any, of size 1)")
    axes = ms.get("axes") or []
    spatial = axes[-3:] if len(axes) >= 3 else [{} for _ in range(3)]
    for ax in spatial:
        if isinstance(ax, Mapping) and ax.get("type") not in (None, "space"):
            raise ValueError(f"{where}: the last three axes must be spatial (z, y, x), got {axes}")
    units = tuple(ax.get("unit") if isinstance(ax, Mapping) else None for ax in spatial)
    scale = [1.0] * array.ndim
    for transforms in (datasets[0].get("coordinateTransformations") or [],
                       ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == array.ndim:
                scale = [s * float(v) for s, v in zip(scale, t["scale"])]
    recon = attrs.get("recon3d")
    return OmeImage(
        path=str(path),
        array=array,
        shape=tuple(int(s) for s in array.shape[-3:]),
        scale=tuple(scale[-3:]),
        units=units,  # type: ignore[arg-type]
        attrs=dict(recon) if isinstance(recon, Mapping) else {},
        levels=tuple(str(d["path"]) for d in datasets),
    )


# ----------------------------------------------------------------------------- sources
class _Source:
    """A ``(D, H, W)`` volume read by D-ranges (OUT, reference, or mask)."""

    def __init__(self, name: str, shape: tuple[int, ...], reader: Callable[[int, int], np.ndarray],
                 chunk_depth: int | None = None) -> None:
        self.name = name
        self.shape = tuple(int(s) for s in shape)
        self._reader = reader
        self.chunk_depth = chunk_depth

    def read(self, lo: int, hi: int) -> np.ndarray:
        return self._reader(lo, hi)


def _stored_magnitude(values: np.ndarray) -> np.ndarray:
    """|values| for complex arrays (in the stored precision, through torch, exactly as
    :mod:`metrics` forms them: NumPy's complex64 ``abs`` rounds differently in the last bit);
    real arrays unchanged. Callers widen to float64 strip by strip."""
    if values.dtype.kind == "c":
        import torch

        return torch.from_numpy(np.ascontiguousarray(values)).abs().numpy()
    return values


def _out_source(image: OmeImage) -> _Source:
    return _Source(f"OME-Zarr '{image.path}'", image.shape, image.read, image.chunk_depth)


def _reference_source(reference_scan: Any) -> tuple[_Source, str]:
    """The reference of a scan (path or open ``Scan``) and the scan's path."""
    from pipeline.data import Scan, open_scan

    if isinstance(reference_scan, Scan):
        scan = reference_scan
    else:
        _require_exists(reference_scan, "reference scan")
        try:
            scan = open_scan(reference_scan)
        except ValueError as err:
            try:
                open_ome_image(reference_scan)
            except (ValueError, FileNotFoundError):
                raise err from None
            raise ValueError(f"reference '{reference_scan}' is an OME-Zarr image, not a scan: "
                             "--reference takes the scan (with a 'reference' array) that was "
                             "reconstructed") from None
    ref = scan.reference
    if ref is None:
        raise ValueError(f"scan '{scan.path}' has no 'reference' array (only simulated scans "
                         "carry one); evaluate against a scan with a reference")
    if len(ref.shape) != 3:
        raise ValueError(f"scan '{scan.path}': reference has shape {ref.shape}, expected (D, H, W)")
    source = _Source(f"scan '{scan.path}'", ref.shape, lambda lo, hi: ref.read(slice(lo, hi)), ref.chunk_depth)
    return source, scan.path


def _mask_source(mask: Any) -> _Source:
    """A mask file: ``.npy`` (memory-mapped) or zarr array / OME-Zarr image."""
    import zarr

    text = str(mask)
    if text.endswith(".npy"):
        if not Path(text).is_file():
            raise FileNotFoundError(f"mask '{mask}' not found")
        arr = np.load(text, mmap_mode="r")
        if arr.ndim != 3:
            raise ValueError(f"mask '{mask}': shape {arr.shape}, expected (D, H, W)")
        return _Source(f"mask '{mask}'", arr.shape, lambda lo, hi: np.asarray(arr[lo:hi]) != 0)
    node = _open_zarr_group(mask, "mask")
    if isinstance(node, zarr.Group):
        image = open_ome_image(mask)
        return _Source(f"mask '{mask}'", image.shape, lambda lo, hi: image.read(lo, hi) != 0)
    if node.ndim != 3:
        raise ValueError(f"mask '{mask}': shape {tuple(node.shape)}, expected (D, H, W)")
    return _Source(f"mask '{mask}'", node.shape, lambda lo, hi: np.asarray(node[lo:hi]) != 0)


# ----------------------------------------------------------------------------- per-slab work
def _box_valid(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over each ``size³`` cube lying wholly inside ``x`` (separable sliding sums)."""
    for axis in range(3):
        n = x.shape[axis] - size + 1
        take = lambda k: x[(slice(None),) * axis + (slice(k, k + n),)]  # noqa: E731
        acc = take(0).copy()
        for k in range(1, size):
            acc += take(k)
        x = acc
    return x / size**3


def _ssim_map(a: np.ndarray, b: np.ndarray, size: int, c1: float, c2: float) -> np.ndarray:
    """Local SSIM of every voxel whose window lies inside the block (metrics.ssim's formula)."""
    n = size**3
    unbias = n / (n - 1) if n > 1 else 1.0
    ma, mb = _box_valid(a, size), _box_valid(b, size)
    va = (_box_valid(a * a, size) - ma * ma) * unbias
    vb = (_box_valid(b * b, size) - mb * mb) * unbias
    cov = (_box_valid(a * b, size) - ma * mb) * unbias
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))


def _slab_peaks(ref: _Source, mask: _Source | None, start: int, stop: int) -> np.ndarray:
    """``[max b, max b over the mask]`` of slices ``start:stop`` (−inf where empty)."""
    b = np.abs(_stored_magnitude(ref.read(start, stop)))
    inside = b[mask.read(start, stop)] if mask is not None else b
    return np.array([b.max(), inside.max() if inside.size else -np.inf], dtype=np.float64)


def _strip_rows(depth: int, width: int) -> int:
    """Rows of H per strip so that one float64 strip of ``depth × rows × width`` is ~STRIP_BYTES."""
    return max(1, STRIP_BYTES // max(1, depth * width * 8))


def _slab_sums(out: _Source, ref: _Source, mask: _Source | None, start: int, stop: int, *,
               size: int, c1: float, c2: float, object_level: float | None) -> np.ndarray:
    """Partial sums of slices ``start:stop``:
    ``[Σ(a−b)², Σb², n, Σ ssim, n_ssim]`` over the mask (and, for SSIM, the valid region).

    The slab (plus its halo) is held in its stored precision; the float64 work goes strip by
    strip along H, so a task's memory is the slab plus a few ``STRIP_BYTES`` temporaries.
    """
    depth, height, width = out.shape
    r = size // 2
    lo, hi = max(0, start - r), min(depth, stop + r)
    a = _stored_magnitude(out.read(lo, hi))
    b = _stored_magnitude(ref.read(lo, hi))
    if a.shape != b.shape:
        raise ValueError(f"{out.name} read shape {a.shape} but {ref.name} read {b.shape} at D {lo}:{hi}")
    if mask is not None:
        m = mask.read(lo, hi)
    elif object_level is not None:
        m = np.abs(b) > np.float64(object_level)  # compared in float64, not in b's float32
    else:
        m = None
    sums = np.zeros(5)
    core = slice(start - lo, stop - lo)
    rows = _strip_rows(stop - start, width)
    for h0 in range(0, height, rows):
        h = slice(h0, min(height, h0 + rows))
        ac, bc = a[core, h].astype(np.float64), b[core, h].astype(np.float64)
        err2, ref2 = (ac - bc) ** 2, bc * bc
        if m is None:
            sums[:3] += (err2.sum(), ref2.sum(), err2.size)
        else:
            mc = m[core, h]
            sums[:3] += (err2[mc].sum(), ref2[mc].sum(), mc.sum())
    # SSIM centres of this slab: D in [max(start, r), min(stop, D − r)), H and W in [r, N − r).
    c0, c1_ = max(start, r), min(stop, depth - r)
    if c1_ <= c0:
        return sums
    block = slice(c0 - r - lo, c1_ + r - lo)
    rows = _strip_rows(c1_ - c0 + 2 * r, width)
    for h0 in range(r, height - r, rows):
        h1 = min(height - r, h0 + rows)
        s = _ssim_map(a[block, h0 - r:h1 + r].astype(np.float64), b[block, h0 - r:h1 + r].astype(np.float64),
                      size, c1, c2)
        if m is None:
            sums[3:] += (s.sum(), s.size)
        else:
            mc = m[c0 - lo:c1_ - lo, h0:h1, r:width - r]
            sums[3:] += (s[mc].sum(), mc.sum())
    return sums


def _window_size(window: int, shape: tuple[int, ...]) -> int:
    """metrics.ssim's rule: ``window``, shrunk to the smallest side, made odd."""
    size = min(window, *shape)
    if size % 2 == 0:
        size -= 1
    return max(size, 1)


def _default_slab_depth(shape: tuple[int, ...], chunk_depth: int, itemsize: int = 4) -> int:
    per_slice = shape[1] * shape[2] * itemsize
    chunks = max(1, TARGET_SLAB_BYTES // max(1, per_slice * chunk_depth))
    return min(shape[0], chunk_depth * chunks)


def _compute(tasks: list, scheduler: str, workers: int | None) -> list:
    import dask

    if scheduler == "distributed":
        try:
            from distributed import get_client

            get_client()
        except (ImportError, ValueError) as err:
            raise ValueError(f"--scheduler distributed needs an active dask.distributed client ({err})") from None
        return list(dask.compute(*tasks))
    if scheduler == "sync":
        return list(dask.compute(*tasks, scheduler="sync"))
    if scheduler != "threads":
        raise ValueError(f"scheduler must be 'threads', 'sync' or 'distributed', got {scheduler!r}")
    return list(dask.compute(*tasks, scheduler="threads", num_workers=max(1, int(workers or 1))))


# ----------------------------------------------------------------------------- evaluate
def evaluate(
    out: Any,
    reference_scan: Any,
    *,
    mask: Any = None,
    data_range: float | None = None,
    object_threshold: float = 0.1,
    window: int = 7,
    slab_depth: int | None = None,
    workers: int = 2,
    scheduler: str = "threads",
) -> dict[str, Any]:
    """PSNR, SSIM (3D) and NMSE of an OME-Zarr reconstruction against a scan's reference.

    Args:
        out: the OME-Zarr image (path or URL).
        reference_scan: a recon3d scan with a ``reference`` array (path, URL or open ``Scan``).
        mask: ``None``, ``"object"`` (``|ref| > object_threshold · max|ref|``) or a mask file
            (``.npy`` or zarr) of the volume's shape.
        data_range: ``R`` of PSNR and SSIM; default ``max |ref|`` (over the mask, if any).
        object_threshold: the fraction of ``max |ref|`` above which ``"object"`` counts a voxel.
        window: the SSIM window side (shrunk and made odd as :func:`metrics.ssim` does).
        slab_depth: D-slices per task (default: whole chunks of OUT, about 16 MiB of it).
        workers: tasks (slabs) at once on the threaded scheduler.
        scheduler: ``threads``, ``sync`` or ``distributed`` (the active client).

    Returns:
        A JSON-ready dict: ``psnr`` (dB), ``ssim``, ``nmse``, ``mse``, ``data_range``, the mask,
        the voxel counts, the window and the settings (definitions in the module docstring).

    Raises:
        FileNotFoundError: OUT, the scan or the mask file does not exist.
        ValueError: not an OME-Zarr image, a scan without a reference, a shape mismatch.
    """
    import dask

    t0 = time.perf_counter()
    image = open_ome_image(out)
    src_out = _out_source(image)
    src_ref, scan_path = _reference_source(reference_scan)
    if src_out.shape != src_ref.shape:
        raise ValueError(f"{src_out.name}: level 0 has shape {src_out.shape} but the reference "
                         f"of {src_ref.name} has shape {src_ref.shape}")
    src_mask = None
    mask_name = None
    if mask is not None and str(mask) != "object":
        src_mask = _mask_source(mask)
        mask_name = str(mask)
        if src_mask.shape != src_out.shape:
            raise ValueError(f"{src_mask.name}: shape {src_mask.shape} differs from the volume's "
                             f"{src_out.shape} ({src_out.name})")
    elif mask is not None:
        if not 0 <= object_threshold < 1:
            raise ValueError(f"object_threshold must be in [0, 1), got {object_threshold}")
        mask_name = "object"
    if data_range is not None and not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")

    shape = src_out.shape
    depth = slab_depth or _default_slab_depth(shape, src_out.chunk_depth or 1, image.array.dtype.itemsize)
    if depth < 1:
        raise ValueError(f"slab_depth must be positive, got {slab_depth}")
    slabs = [(s, min(s + depth, shape[0])) for s in range(0, shape[0], depth)]

    peak = object_level = None
    source = "given"
    if data_range is None or mask_name == "object":
        parts = _compute([dask.delayed(_slab_peaks, pure=False)(src_ref, src_mask, s, e) for s, e in slabs],
                         scheduler, workers)
        peaks = np.max(np.stack(parts), axis=0)
        peak = float(peaks[0])
        if mask_name == "object":
            object_level = object_threshold * peak
        if data_range is None:
            data_range = float(peaks[1]) if src_mask is not None else peak
            source = "max |reference| in mask" if src_mask is not None else "max |reference|"
            if not math.isfinite(data_range) or data_range <= 0:
                raise ValueError(f"{src_ref.name}: max |reference| (in the mask) is {data_range}; "
                                 "pass data_range explicitly")
    size = _window_size(window, shape)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    tasks = [dask.delayed(_slab_sums, pure=False)(src_out, src_ref, src_mask, s, e, size=size, c1=c1, c2=c2,
                                                  object_level=object_level) for s, e in slabs]
    sse, ref2, count, ssim_sum, ssim_count = np.sum(np.stack(_compute(tasks, scheduler, workers)), axis=0)
    if count == 0:
        raise ValueError(f"the mask ({mask_name}) selects no voxel of {src_out.name}")
    mse = float(sse / count)
    return {
        "out": str(out),
        "reference": scan_path,
        "method": image.attrs.get("method"),
        "shape": list(shape),
        "psnr": math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse),
        "ssim": float(ssim_sum / ssim_count) if ssim_count else math.nan,
        "nmse": float(sse / ref2) if ref2 > 0 else math.nan,
        "mse": mse,
        "data_range": float(data_range),
        "data_range_source": source,
        "mask": mask_name,
        "object_threshold": object_threshold if mask_name == "object" else None,
        "mask_voxels": int(count),
        "ssim_voxels": int(ssim_count),
        "ssim_window": size,
        "slab_depth": depth,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``recon3d evaluate`` to the ``recon3d`` sub-parsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="PSNR, SSIM (3D) and NMSE of a reconstruction against a scan's reference, or estimated without one (--estimate)",
        description="Compare an OME-Zarr reconstruction with the reference volume of a scan, "
        "out of core (dask, slab by slab with halos): PSNR, 3D SSIM (7³ uniform windows, as "
        "scikit-image) and NMSE. Complex images (MRI) are compared as magnitudes, real ones (CT) "
        "as they are, signed. Without --mask both the whole volume and the object "
        "(|reference| > --object-threshold × max|reference|) are reported; R (the data range) "
        "is printed with where it came from.",
    )
    p.add_argument("out", help="the reconstruction (OME-Zarr image)")
    p.add_argument("--reference", default=None, metavar="SCAN",
                   help="a scan with a reference array (needed unless --estimate)")
    est = p.add_argument_group(
        "reference-free estimate (--estimate)",
        "Estimate the reconstruction's MSE/PSNR without a reference: the reconstruction that made OUT "
        "(recorded in it) is re-run on a few D-blocks of the scan with held-out measurements and "
        "equivariant bootstrap draws (bootstrap-calibrated cross-validation, docs/estimate.md). It costs "
        "about draws × (folds + 1) + folds + 1 reconstructions of each block.")
    est.add_argument("--estimate", action="store_true", help="report estimated_psnr (and its interval) "
                     "without a reference")
    est.add_argument("--scan", default=None, metavar="SCAN",
                     help="the scan OUT was reconstructed from (default: the one OUT records)")
    est.add_argument("--estimate-blocks", type=int, default=3, metavar="N", help="D-blocks estimated (default: 3)")
    est.add_argument("--estimate-slices", type=int, default=None, metavar="N",
                     help="slices per block (default: 8, or the whole scan if thinner)")
    est.add_argument("--draws", type=int, default=8, help="bootstrap draws per block (default: 8, at least 2)")
    est.add_argument("--folds", type=int, default=4, help="held-out parts per cross-validation (default: 4)")
    est.add_argument("--holdout", type=float, default=0.1, metavar="FRACTION",
                     help="share of the measurements held out per part (default: 0.1)")
    est.add_argument("--seed", type=int, default=0, help="seed of the draws and held-out parts (default: 0)")
    est.add_argument("--device", default="cpu", help="where the reconstructions run (default: cpu)")
    p.add_argument("--json", type=local_arg("evaluate --json", "the file is written on the local filesystem",
                                            allow=("-",), as_path=False),
                   default=None, metavar="FILE", help="also write the metrics as JSON ('-': stdout)")
    p.add_argument("--mask", default=None, metavar="FILE|object",
                   help="evaluate inside a mask: a .npy or zarr boolean volume, or 'object' "
                   "(|reference| > --object-threshold × max|reference|)")
    p.add_argument("--no-object", dest="object", action="store_false",
                   help="without --mask, report the whole volume only (one pass less)")
    p.add_argument("--object-threshold", type=float, default=0.1,
                   help="fraction of max|reference| for --mask object (default: 0.1)")
    p.add_argument("--data-range", type=float, default=None, metavar="R",
                   help="R of PSNR and SSIM (default: max|reference|, inside the mask if any)")
    p.add_argument("--window", type=int, default=7, help="SSIM window side (default: 7)")
    p.add_argument("--slab-depth", type=int, default=None,
                   help="D-slices per task (default: whole chunks of OUT, about 16 MiB of it)")
    p.add_argument("--workers", type=int, default=2,
                   help="slabs evaluated at once (default: 2; memory ≈ workers × (4 slabs + 100 MiB))")
    p.add_argument("--scheduler", default="threads", choices=["threads", "sync", "distributed"],
                   help="dask scheduler; 'distributed' uses the active dask.distributed client")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``recon3d evaluate``: print the metrics, optionally write them as JSON."""
    if args.json and args.json != "-":
        from pipeline.outputs import check_outside

        # A --json inside the image, the scan or any zarr group would replace one of its files.
        check_outside(args.json, "evaluate", [a for a in (args.out, args.reference, args.scan) if a],
                      option="--json")
    if args.reference is None and not args.estimate:
        raise ValueError("give --reference SCAN, or --estimate for an estimate without a reference")
    if args.reference is None:
        return _estimate_cli(args)
    common = dict(data_range=args.data_range, object_threshold=args.object_threshold, window=args.window,
                  slab_depth=args.slab_depth, workers=args.workers, scheduler=args.scheduler)
    result = evaluate(args.out, args.reference, mask=args.mask, **common)
    if args.mask is None and args.object:
        obj = evaluate(args.out, args.reference, mask="object", **common)
        result["object"] = {k: obj[k] for k in ("psnr", "ssim", "nmse", "mse", "data_range", "data_range_source",
                                                "object_threshold", "mask_voxels", "ssim_voxels")}
    if args.estimate:
        result["estimate"] = _estimate(args, data_range=result["data_range"])
        complex_mse = _complex_mse(args.out, args.reference)
        if complex_mse is not None:  # what the estimate is of (MRI): the complex image's error
            result["estimate"]["true_psnr_complex"] = (math.inf if complex_mse == 0 else
                                                       10 * math.log10(result["data_range"] ** 2 / complex_mse))
    if _write_json(result, args.json):
        return 0
    inside = f" inside mask {result['mask']} ({result['mask_voxels']} voxels)" if result["mask"] else ""
    print(f"{result['out']} vs {result['reference']}{inside}:")
    rows = [("volume" if "object" in result else "", result)]
    if "object" in result:
        rows.append((f"object ({result['object']['mask_voxels']} voxels, |ref| > "
                     f"{result['object']['object_threshold']:g} max)", result["object"]))
    for label, r in rows:
        lead = f"  {label}:" if label else ""
        print(f"{lead}  PSNR {r['psnr']:.4f} dB   SSIM {r['ssim']:.5f}   NMSE {r['nmse']:.6g}"
              f"   (R = {r['data_range']:.6g}, {r['data_range_source']})")
    if args.estimate:
        est = result["estimate"]
        _print_estimate(est, truth=est.get("true_psnr_complex", result["psnr"]))
    if args.json:
        print(f"  written to {args.json}", file=sys.stderr)
    return 0


def _write_json(result: dict[str, Any], target: str | None) -> bool:
    """``--json``: the result to ``target`` (a file), or to stdout for ``-`` (then nothing else
    is printed: returns True)."""
    text = json.dumps(result, indent=2)
    if target == "-":
        print(text)
        return True
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return False


def _estimate(args: argparse.Namespace, data_range: float | None) -> dict[str, Any]:
    from .estimate import estimate_output

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return estimate_output(args.out, args.scan, blocks=args.estimate_blocks, thickness=args.estimate_slices,
                           draws=args.draws, folds=args.folds, fraction=args.holdout, seed=args.seed,
                           data_range=data_range if data_range is not None else args.data_range,
                           device=args.device, say=say)


def _complex_mse(out: Any, reference: Any) -> float | None:
    """The MSE of OUT's complex image (MRI, kept by reconstruct) against the complex reference,
    slab by slab; ``None`` when either is not complex."""
    import zarr

    from pipeline.data import open_scan

    group = _open_zarr_group(out, "OME-Zarr store")
    name = (dict(group.attrs).get("recon3d") or {}).get("complex")
    ref = open_scan(reference).reference
    if not name or name not in group or ref is None:
        return None
    array = group[name]
    if not isinstance(array, zarr.Array) or array.dtype.kind != "c" or tuple(array.shape[-3:]) != tuple(ref.shape):
        return None
    sse, count, step = 0.0, 0, max(1, int(array.chunks[-3]))
    for lo in range(0, int(ref.shape[0]), step):
        hi = min(int(ref.shape[0]), lo + step)
        a = np.asarray(array[(0,) * (array.ndim - 3) + (slice(lo, hi),)]).astype(np.complex128)
        b = np.asarray(ref.read(slice(lo, hi))).astype(np.complex128)
        sse += float(np.square(np.abs(a - b)).sum())
        count += a.size
    return sse / max(count, 1)


def _print_estimate(est: dict[str, Any], truth: float | None = None) -> None:
    made = est["reconstruction"]
    what = made.get("method") or f"model {made.get('model')}"
    label = "true PSNR of the complex image" if "true_psnr_complex" in est else "true PSNR"
    against = (f"   ({label} {truth:.2f} dB: error {est['estimated_psnr'] - truth:+.2f} dB)"
               if truth is not None else "")
    print(f"  estimated (no reference; {est['estimator']}, {len(est['blocks'])} block(s), {what}):")
    print(f"    PSNR {est['estimated_psnr']:.2f} dB  [{est['estimated_psnr_low']:.2f}, {est['estimated_psnr_high']:.2f}]"
          f"   MSE {est['estimated_mse']:.4g}   (R = {est['data_range']:.6g}, {est['data_range_source']}; "
          f"{est['of']}){against}")


def _estimate_cli(args: argparse.Namespace) -> int:
    """``recon3d evaluate OUT --estimate`` without a reference."""
    est = _estimate(args, data_range=None)
    if _write_json({"out": str(args.out), **est}, args.json):
        return 0
    print(f"{args.out} (scan {est['scan']}):")
    _print_estimate(est)
    if args.json:
        print(f"  written to {args.json}", file=sys.stderr)
    return 0
