"""Whole-volume PSNR, SSIM and NMSE of a reconstruction against a scan's reference, out of core.

``recon3d evaluate OUT --reference SCAN [--json FILE] [--mask FILE|object] [--data-range R]``

``OUT`` is an OME-Zarr image (0.5: the ``ome`` attribute of a zarr v3 group; 0.4's top-level
``multiscales`` is read too) whose level 0 (``multiscales[0].datasets[0].path``) is a
``(z, y, x)`` volume; ``SCAN`` is a recon3d scan with a ``reference`` array of the same shape.
Complex values (MRI) are compared as magnitudes, real ones (CT attenuation) as they are,
signed (as :mod:`pipeline.metrics` does). The command reports the whole volume and,
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
  :func:`~pipeline.metrics.psnr` / :func:`~pipeline.metrics.nmse` with the same ``mask``.
* ``SSIM`` = the mean of the local SSIM map :func:`~pipeline.metrics.ssim_map`
  (uniform ``window³`` windows, unbiased local variances, ``C₁ = (0.01R)²``, ``C₂ = (0.03R)²``;
  equal to scikit-image's ``structural_similarity``) over the voxels whose whole window lies
  inside the volume — and, with a mask, that are also in ``M``. Slab halos make windows that
  cross slab and chunk boundaries exact, so the unmasked value equals ``metrics.ssim``.

``--mask object`` is ``b > object_threshold · max b`` (default 0.1); ``--mask FILE`` is a
boolean (or 0/1) ``(D, H, W)`` volume in a ``.npy`` file (memory-mapped) or a zarr array
(or an OME-Zarr image, level 0).

The command line is :mod:`pipeline.reconstruct.evaluate_cli`; OUT is read through
:mod:`pipeline.reconstruct.ome_image`.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.allocator import malloc_trim
from pipeline.metrics import ssim_constants, ssim_map, ssim_window

from .ome_image import OmeImage, open_ome_image, open_zarr, require_exists

__all__ = ["evaluate"]

#: Target size of one evaluation slab of one volume as stored (slabs are whole chunks of OUT).
TARGET_SLAB_BYTES = 16 << 20
#: Size of one float64 temporary of the per-strip work inside a slab.
STRIP_BYTES = 4 << 20


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
        require_exists(reference_scan, "reference scan")
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
    node = open_zarr(mask, "mask")
    if isinstance(node, zarr.Group):
        image = open_ome_image(mask)
        return _Source(f"mask '{mask}'", image.shape, lambda lo, hi: image.read(lo, hi) != 0)
    if node.ndim != 3:
        raise ValueError(f"mask '{mask}': shape {tuple(node.shape)}, expected (D, H, W)")
    return _Source(f"mask '{mask}'", node.shape, lambda lo, hi: np.asarray(node[lo:hi]) != 0)


# ----------------------------------------------------------------------------- per-slab work
def _then_trim(task: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """``task``, then the heap's freed pages back to the OS (glibc ``malloc_trim``). Each of
    dask's worker threads allocates from its own malloc arena, which keeps what a slab freed:
    on 480- and 1440-slice 256² MRI scans the max RSS was 804 and 949 MiB without the trim,
    640 and 738 MiB with it, at the same speed (BENCHMARKS.md, issue 17.2)."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        finally:
            malloc_trim()

    return run


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
        s = ssim_map(a[block, h0 - r:h1 + r].astype(np.float64), b[block, h0 - r:h1 + r].astype(np.float64),
                     size, c1, c2)
        if m is None:
            sums[3:] += (s.sum(), s.size)
        else:
            mc = m[c0 - lo:c1_ - lo, h0:h1, r:width - r]
            sums[3:] += (s[mc].sum(), mc.sum())
    return sums


def _default_slab_depth(shape: tuple[int, ...], chunk_depth: int, itemsize: int = 4) -> int:
    per_slice = shape[1] * shape[2] * itemsize
    chunks = max(1, TARGET_SLAB_BYTES // max(1, per_slice * chunk_depth))
    return min(shape[0], chunk_depth * chunks)


def _compute(tasks: list, scheduler: str, workers: int | None) -> list:
    import dask

    if scheduler == "distributed":
        from pipeline.errors import require_extra

        get_client = require_extra("distributed", "distributed", "--scheduler distributed").get_client
        try:
            get_client()
        except ValueError as err:
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
        window: the SSIM window side (shrunk and made odd by :func:`~pipeline.metrics.ssim_window`).
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
        parts = _compute([dask.delayed(_then_trim(_slab_peaks), pure=False)(src_ref, src_mask, s, e) for s, e in slabs],
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
    size = ssim_window(window, shape)
    c1, c2 = ssim_constants(data_range)
    tasks = [dask.delayed(_then_trim(_slab_sums), pure=False)(src_out, src_ref, src_mask, s, e, size=size, c1=c1, c2=c2,
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
