"""The optional compiled CPU kernels of the cone projector, and the choice between them and torch.

:mod:`~operators3d.ct._cone_kernels` computes the cone's (ray column, plane) pairs with torch
primitives: a gather, about seven elementwise passes and a scatter per sample, which bounds it
at several nanoseconds per voxel-ray update on CPU, and each pair costs a fixed 15–20 ns per call
whatever the slab's thickness. ``_cone_c.c`` (shipped next to this module) computes the same
discretisation — the same tables, the same position arithmetic in the tensors' dtype, the same
zero pads — in one fused pass per pair that visits only the detector rows whose rays can touch
the volume (or slab), so a thin slab costs its own samples plus a few nanoseconds per pair.

Why plain C through :mod:`ctypes` rather than a torch C++ extension: without torch headers
the build takes about a second instead of a minute, needs only a C compiler, and cannot break
with the torch version; the kernel needs nothing from torch but the tensors' data pointers.
It is compiled on first use with the system C compiler
(``$RECON3D_CC``, else ``$CC``, else ``cc``; ``-O3 -fPIC -shared``, with ``-fopenmp`` when that
works) in about a second, and loaded with :mod:`ctypes`. The library is cached in
``$RECON3D_CACHE`` (default ``$XDG_CACHE_HOME/recon3d`` or ``~/.cache/recon3d``) under a name
keyed by a hash of the source, the compiler and its flags; it is written to a temporary file and
renamed into place, so concurrent processes never load a half-written library. A build the
compiler refuses leaves a ``.failed`` note with its message beside it, so later processes do
not retry it (with OpenMP, say) on every start.

``RECON3D_CONE_KERNEL`` selects the kernel of CPU float32/float64 calls: ``auto`` (default:
compiled when available, else torch with one warning naming why), ``c`` (compiled, an error if
it cannot be built) or ``torch``. CUDA tensors and other dtypes always use torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import _cone_kernels as CK

__all__ = ["kernels_for", "load", "pair_gather", "pair_scatter", "choice"]

_LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("_cone_c.c")
#: Flags for every build; ``-ffp-contract=off`` keeps ``a·b + c`` two roundings, as in torch.
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-ffp-contract=off", "-std=c99")
_ABI = 2
#: Detector rows per call at most (the kernel computes row windows in int32).
_MAX_ROWS = 2**31 - 16
_LOADED: dict[tuple, tuple[ctypes.CDLL | None, str]] = {}
_WARNED: set[str] = set()
_CHOICES = ("auto", "c", "torch")


def choice() -> str:
    """``RECON3D_CONE_KERNEL`` (``auto``, ``c`` or ``torch``; default ``auto``)."""
    value = os.environ.get("RECON3D_CONE_KERNEL", "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(
            f"RECON3D_CONE_KERNEL must be one of {', '.join(_CHOICES)}, got "
            f"{os.environ['RECON3D_CONE_KERNEL']!r}"
        )
    return value


def _compiler() -> str:
    return os.environ.get("RECON3D_CC") or os.environ.get("CC") or "cc"


def _cache_dir() -> Path:
    given = os.environ.get("RECON3D_CACHE")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "recon3d"


def _compile(cc: str, flags: tuple[str, ...], target: Path) -> tuple[str, bool] | None:
    """Builds the library into ``target`` (atomically); returns None, or why it failed and
    whether the compiler refused the source (not worth retrying) rather than could not run."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            return f"{cc} exited with {run.returncode}: {run.stderr.strip()[-400:]}", True
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{cc} could not run: {err}", False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    args = [p, i64, i64, p, p, p, p, i64, p, i64, dbl, p, cint]
    for name in ("cone_gather_f32", "cone_gather_f64", "cone_scatter_f32", "cone_scatter_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, cint
    lib.cone_c_abi_version.restype = cint
    lib.cone_c_has_openmp.restype = cint
    if lib.cone_c_abi_version() != _ABI:
        raise OSError(f"ABI {lib.cone_c_abi_version()} of the library, expected {_ABI}")
    return lib


def load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library (built and cached on first use) and ``""``, or ``None`` and why not."""
    cc, cache = _compiler(), _cache_dir()
    key = (cc, str(cache))
    if key in _LOADED:
        return _LOADED[key]
    result: tuple[ctypes.CDLL | None, str]
    if shutil.which(cc) is None:
        result = (None, f"no C compiler {cc!r} on PATH (set RECON3D_CC or CC)")
    else:
        try:
            source = SOURCE.read_bytes()
        except OSError as err:
            result = (None, f"the kernel source {SOURCE} is missing ({err})")
        else:
            result = _build(cc, cache, source)
    _LOADED[key] = result
    return result


def _build(cc: str, cache: Path, source: bytes) -> tuple[ctypes.CDLL | None, str]:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{cc} could not run: {err}"
    why = ""
    for flags in (FLAGS + ("-fopenmp",), FLAGS):
        digest = hashlib.sha256(
            b"\0".join([source, cc.encode(), version.encode(), " ".join(flags).encode(),
                        sys.platform.encode(), platform.machine().encode()])
        ).hexdigest()[:20]
        target = cache / f"cone_c-{digest}.so"
        marker = target.with_suffix(".failed")  # this build failed before: do not retry it
        try:
            if marker.exists():
                why = marker.read_text()
                continue
            if not target.exists():
                failed = _compile(cc, flags, target)
                if failed:
                    why, refused = failed
                    if refused:
                        marker.write_text(why)
                    continue
            return _bind(ctypes.CDLL(str(target))), ""
        except OSError as err:
            why = f"could not build or load {target}: {err}"
    return None, why


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        message = f"cone projector: compiled CPU kernel unavailable ({reason}); using torch"
        _LOG.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def kernels_for(t: torch.Tensor) -> tuple[Callable, Callable]:
    """``(gather, scatter)`` for tensors like ``t``: the compiled kernels or the torch ones
    (:mod:`._cone_kernels`), per :func:`choice`; both take the arguments of
    :func:`~operators3d.ct._cone_kernels.pair_gather`."""
    mode = choice()
    if mode == "torch" or not _usable(t):  # CUDA and other dtypes: always torch
        return CK.pair_gather, CK.pair_scatter
    lib, reason = load()
    if lib is None:
        if mode == "c":
            raise RuntimeError(f"RECON3D_CONE_KERNEL=c but the compiled kernel failed: {reason}")
        _warn_once(reason)
        return CK.pair_gather, CK.pair_scatter
    return pair_gather, pair_scatter


def _call(kind: str, data, row_index, row_weight, zslope, ray, zcoord, zoff, target) -> None:
    lib, reason = load()
    if lib is None:
        raise RuntimeError(f"the compiled cone kernel is unavailable: {reason}")
    dtype = target.dtype
    suffix = {torch.float32: "f32", torch.float64: "f64"}.get(dtype)
    if suffix is None or target.device.type != "cpu":
        raise TypeError(f"compiled cone kernel: CPU float32/float64 only, got {dtype} on "
                        f"{target.device}")
    for name, t in (("row_weight", row_weight), ("zslope", zslope), ("zcoord", zcoord),
                    ("source", data)):
        if t.dtype != dtype or t.device.type != "cpu":
            raise TypeError(f"compiled cone kernel: {name} is {t.dtype} on {t.device}, "
                            f"expected {dtype} on cpu")
    if zcoord.numel() > _MAX_ROWS:  # the kernel's row bounds are int32
        raise ValueError(f"compiled cone kernel: {zcoord.numel()} detector rows, at most "
                         f"{_MAX_ROWS}")
    if not target.is_contiguous():
        raise ValueError("compiled cone kernel: the output must be contiguous")
    data = data.contiguous()
    if row_index.dtype != torch.int32:
        if row_index.numel() and int(row_index.max()) >= 2**31:
            raise ValueError("compiled cone kernel: row indices beyond int32")
        row_index = row_index.to(torch.int32)
    row_index = row_index.contiguous()
    row_weight, zslope = row_weight.contiguous(), zslope.contiguous()
    ray = ray.to(torch.int64).contiguous()
    zcoord = zcoord.contiguous()
    table = data if kind == "gather" else target
    channels, width = table.shape[1], table.shape[2]
    failed = getattr(lib, f"cone_{kind}_{suffix}")(
        data.data_ptr(), channels, width, row_index.data_ptr(), row_weight.data_ptr(),
        zslope.data_ptr(), ray.data_ptr(), row_index.shape[0], zcoord.data_ptr(),
        zcoord.numel(), float(zoff), target.data_ptr(), max(1, torch.get_num_threads()),
    )
    if failed:
        raise MemoryError(f"compiled cone kernel: no memory for {zcoord.numel()} rows' buffers")


def pair_gather(src, row_index, row_weight, zslope, ray, zcoord, zoff, out, *,
                block_bytes: int | None = None) -> None:
    """The compiled :func:`~operators3d.ct._cone_kernels.pair_gather` (``block_bytes``
    unused: one pass per pair).

    Shape:
        as :func:`~operators3d.ct._cone_kernels.pair_gather`; ``out`` contiguous.
    """
    _call("gather", src, row_index, row_weight, zslope, ray, zcoord, zoff, out)


def pair_scatter(grad, row_index, row_weight, zslope, ray, zcoord, zoff, dst, *,
                 block_bytes: int | None = None) -> None:
    """The compiled :func:`~operators3d.ct._cone_kernels.pair_scatter`, the exact transpose of
    :func:`pair_gather`.

    Shape:
        as :func:`~operators3d.ct._cone_kernels.pair_scatter`; ``dst`` contiguous.
    """
    _call("scatter", grad, row_index, row_weight, zslope, ray, zcoord, zoff, dst)
