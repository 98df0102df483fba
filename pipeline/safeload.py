"""One place where recon3d reads torch files: never with a pickle that can run code.

A ``.pt`` file is a pickle, and an ordinary ``torch.load`` runs whatever a crafted pickle asks
for (``os.system``, ``eval``...) before any check of ours sees the result. Every file recon3d
reads — its per-rank training state, DeepSpeed's shards, the universal-checkpoint files, the
ZeRO merge, an exported ``model.pt`` — goes through :func:`load`, which uses torch's
weights-only unpickler (tensors, numbers, strings, lists, tuples, dicts) plus the few harmless
DeepSpeed types its optimizer files hold (:data:`ALLOWED`). DeepSpeed calls ``torch.load``
itself, with ``weights_only=False``; :func:`deepspeed_loads` routes those calls through
:func:`load` for the duration of recon3d's load/convert/merge calls.

A file that needs any other pickle global is refused before the global is even looked up, with
an :class:`~pipeline.errors.UntrustedFileError` naming the file and the global; a file that is
not a torch file at all (random bytes, truncated, empty) is refused naming the file.

The allow-list was found by saving checkpoints with ZeRO 0, 1, 2 and 3 in fp32 and bf16, and
their universal conversions, and listing what
``torch.serialization.get_unsafe_globals_in_checkpoint`` reports: DeepSpeed's loss-scaler
objects, the ZeRO stage enum and the ``fragment_address`` dataclass. None of them runs code when
rebuilt: the scalers and the dataclass are rebuilt by ``__new__`` plus a ``__dict__`` update (no
``__setstate__``), the enum by a lookup of its value.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import sys
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UntrustedFileError

__all__ = ["ALLOWED", "load", "deepspeed_loads", "pickle_globals"]

_REAL_LOAD = torch.load
_ADVICE = ("a checkpoint must hold only tensors and plain values; do not load files from "
           "untrusted sources")


def _allowed() -> list[Any]:
    """The DeepSpeed types its checkpoint files hold (imported lazily: DeepSpeed is heavy)."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import-time logs are chatter
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


#: Names of the types allowed beyond torch's own weights-only set (for messages and tests).
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _name(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return str(f)
    return str(getattr(f, "name", repr(f)))


def _pickle_bytes(path: str) -> list[bytes]:
    """The pickle streams of a torch file (``data.pkl`` of a zip file, or the whole file)."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as z:
                return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        with open(path, "rb") as f:
            return [f.read()]
    except Exception:  # a damaged archive (bad names, CRCs, multi-disk records...): nothing to list
        return []


def _is_zip(path: str) -> bool:
    """Whether ``path`` is a zip archive (``zipfile.is_zipfile`` itself raises on some damage)."""
    try:
        return os.path.isfile(path) and zipfile.is_zipfile(path)
    except Exception:
        return False


def pickle_globals(path: str | os.PathLike) -> list[str]:
    """Every global (``module.name``) the pickles of a torch file would import, read statically.

    Nothing is unpickled: the opcodes are only listed (``pickletools``), so this is safe on any
    file. Used to name what a refused file asks for.
    """
    found: list[str] = []
    for data in _pickle_bytes(str(path)):
        strings: list[str] = []  # the strings pushed so far (STACK_GLOBAL takes the last two)
        memo: dict[int, str] = {}  # memoised strings, for a STACK_GLOBAL that reuses one
        memo_count = 0
        previous: str | None = None  # the string the previous opcode pushed, if it pushed one
        try:
            for op, arg, _ in pickletools.genops(io.BytesIO(data)):
                pushed = None
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    pushed = str(arg)
                    strings.append(pushed)
                elif op.name == "MEMOIZE":
                    if previous is not None:
                        memo[memo_count] = previous
                    memo_count += 1
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and previous is not None:
                    memo[int(arg)] = previous
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    pushed = memo[int(arg)]
                    strings.append(pushed)
                if op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    pushed = previous  # memoising leaves the string on the stack
                previous = pushed
                if op.name == "STOP":
                    break
        except Exception:  # a garbled stream: what was listed up to the damage is still useful
            pass
    return list(dict.fromkeys(found))


def _refused(path: str, also_allow: list[Any] | tuple[Any, ...] = ()) -> list[str]:
    """The globals of ``path`` that neither torch's weights-only set, :data:`ALLOWED` nor
    ``also_allow`` holds."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = set(_get_allowed_globals()) | set(ALLOWED) | {f"{g.__module__}.{g.__qualname__}" for g in also_allow}
    return [g for g in pickle_globals(path) if g not in allowed]


def _error(path: str, err: BaseException, hints: Mapping[str, str] | None,
           also_allow: list[Any] | tuple[Any, ...] = ()) -> UntrustedFileError:
    bad = _refused(path, also_allow) if isinstance(err, pickle.UnpicklingError) else []
    if bad:
        names = ", ".join(f"'{g}'" for g in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        which = "the pickle global" if len(bad) == 1 else "the pickle globals"
        hint = next((text for prefix, text in (hints or {}).items() if all(g.startswith(prefix) for g in bad)), None)
        extra = f"; {hint}" if hint else ""
        return UntrustedFileError(f"refusing to load {path}: it needs {which} {names}, which recon3d does not "
                                  f"allow ({_ADVICE}){extra}")
    text = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if isinstance(err, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        reason = "neither a torch zip archive nor a pickle of tensors and plain values"
    elif isinstance(err, EOFError):
        reason = "it is empty or ends early"
    size = os.path.getsize(path) if os.path.isfile(path) else None
    return UntrustedFileError(f"{path} is not a readable checkpoint ({size} bytes; {reason[:160]}): it is truncated, "
                              "empty or not a file torch.save wrote; restore it from a copy or resume from another "
                              "checkpoint")


# What torch raises for a file that is not a well-formed torch file: its unpickler and zip
# reader fail on damage with almost any exception type (UnpicklingError, EOFError, KeyError,
# IndexError, UnicodeDecodeError, BadZipFile, RuntimeErrors of the C++ reader...). A RuntimeError
# can also be a real error that is not the file's fault (a CUDA map_location on a machine without
# CUDA, memory): those are kept; OSErrors (permissions, I/O) stay what they are too.
_ENVIRONMENT = ("CUDA", "cuda", "device", "out of memory", "map_location")


def _unreadable(err: BaseException) -> bool:
    if isinstance(err, OSError) or not isinstance(err, Exception):
        return False
    if isinstance(err, RuntimeError):
        return not any(m in str(err) for m in _ENVIRONMENT)
    return True


def numpy_array_globals() -> list[Any]:
    """The pickle globals a plain numpy array needs (``ndarray``, ``dtype``, ``_reconstruct``).

    Rebuilding an array runs no code of the file's choosing: ``_reconstruct`` makes an empty
    ``ndarray`` of an allowed class and ``__setstate__`` fills its buffer (an object array's items
    go through the same restricted unpickler). torch documents this list for numpy arrays.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in ("uint32", "int64", "float64")}]


def load(f: str | os.PathLike | Any, map_location: Any = "cpu", *, hints: Mapping[str, str] | None = None,
         also_allow: list[Any] | tuple[Any, ...] = (), **kwargs: Any) -> Any:
    """``torch.load(f, weights_only=True)`` with :data:`ALLOWED`, and one-line refusals.

    Args:
        f: the file (path or binary file object).
        map_location: as for ``torch.load``.
        hints: ``{prefix: text}``: ``text`` is appended to the refusal of a file whose disallowed
            globals all start with ``prefix`` (e.g. ``numpy``: a file of an older recon3d).
        also_allow: further harmless globals for this one file (e.g. :func:`numpy_array_globals`
            for the rank files of an older recon3d).
        **kwargs: passed to ``torch.load`` (``mmap``...); ``weights_only`` is always ``True``
            and ``pickle_module`` is refused.

    Raises:
        UntrustedFileError: the file needs a pickle global outside the allow-list, or is not a
            readable torch file. Nothing in it has run.
        FileNotFoundError: no such file.
    """
    kwargs.pop("weights_only", None)
    if kwargs.pop("pickle_module", None) not in (None, pickle):
        raise UntrustedFileError(f"refusing to load {_name(f)} with a custom pickle module")
    path = _name(f)
    try:
        with torch.serialization.safe_globals([*_allowed(), *also_allow]), warnings.catch_warnings():
            # torch warns about a protocol other than 2 before refusing or reading it: noise here.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return _REAL_LOAD(f, map_location=map_location, weights_only=True, **kwargs)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:
        if _unreadable(err):
            raise _error(path, err, hints, also_allow) from None
        raise


_patch_lock = threading.RLock()
_patch_depth = 0


@contextlib.contextmanager
def deepspeed_loads() -> Iterator[None]:
    """Within this block, every ``torch.load`` (DeepSpeed's included) goes through :func:`load`.

    DeepSpeed 0.19 calls ``torch.load(..., weights_only=False)`` in its checkpoint engine,
    ``zero_to_fp32``, ``ds_to_universal`` and ``universal_checkpoint``; all of them look the
    function up on the ``torch`` module at call time, so replacing the attribute covers them.
    Re-entrant; the original is restored when the outermost block ends.
    """
    global _patch_depth

    def wrapped(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        return load(f, map_location, pickle_module=pickle_module, **kwargs)

    with _patch_lock:
        if _patch_depth == 0:
            torch.load = wrapped  # type: ignore[assignment]
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                torch.load = _REAL_LOAD  # type: ignore[assignment]

