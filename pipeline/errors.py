"""The errors recon3d raises on purpose, and the exit status each one means.

Every command ends through one mapping (:func:`exit_code`, used by :mod:`pipeline.cli`):

* ``0`` — it did what was asked;
* ``1`` — a failure (:class:`Recon3dError` and anything unexpected): the job could not finish,
  e.g. the disk is full or training diverged; what was written so far is consistent;
* ``2`` — a usage or input error (:class:`InputError`, and ``ValueError`` / ``TypeError`` /
  ``FileNotFoundError`` raised while checking inputs): the user must change something.

The message of every error here is one line that names the file, path or setting involved and,
where there is one, the remedy. ``--debug`` (or ``RECON3D_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

__all__ = [
    "Recon3dError",
    "InputError",
    "UntrustedFileError",
    "OutputConflictError",
    "StorageFullError",
    "MissingExtraError",
    "require_extra",
    "exit_code",
    "report_error",
    "storage_error",
]


class Recon3dError(Exception):
    """A failure recon3d recognised: one-line message, exit status 1."""

    exit_code = 1


class InputError(Recon3dError, ValueError):
    """Bad input or usage (a file, a setting, a target path): exit status 2."""

    exit_code = 2


class UntrustedFileError(InputError):
    """A file that would run code or is not what it claims to be (a crafted or garbage pickle)."""


class OutputConflictError(InputError):
    """An output target that this command must not write (an input, a run, a foreign folder)."""


class StorageFullError(Recon3dError):
    """A write that ran out of space (or quota): names the path and the bytes it needed."""


class MissingExtraError(Recon3dError):
    """A command needs an optional part of recon3d that is not installed: names the extra."""


def require_extra(module: str, extra: str, what: str, *, load: bool = True):
    """Import ``module`` for ``what`` (``load=False``: only check that it is installed), or say
    which extra of recon3d brings it.

    ``pip install recon3d`` gives operators3d, the data layer, classical reconstruction and
    evaluation; training (``train``), pictures (``report``) and dask clusters (``distributed``)
    are extras, so a command that needs one names it instead of failing on an import.
    """
    import importlib
    import importlib.util

    try:
        if not load:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"no module named {module!r}")
            return None
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'recon3d[{extra}]' ({err})") from None


def storage_error(err: OSError, path: str | os.PathLike, needed: int | None = None) -> Exception:
    """The one-line error for an ``OSError`` met while writing ``path``.

    ``ENOSPC``/``EDQUOT``/``EFBIG`` become :class:`StorageFullError` naming the path, the bytes the
    write needed and the bytes free there; any other ``OSError`` is returned unchanged.
    """
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return err
    free = None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        pass
    need = f"{needed} bytes needed" if needed is not None else "more space needed"
    have = f", {free} bytes free" if free is not None else ""
    return StorageFullError(f"no space left writing {path} ({need}{have}): {os.strerror(err.errno)}")


def exit_code(err: BaseException) -> int:
    """The exit status of a command that ended with ``err``."""
    if isinstance(err, Recon3dError):
        return err.exit_code
    if isinstance(err, (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    return 1


def _one_line(err: BaseException, command: str) -> str:
    text = " ".join(str(err).split()) if str(err) else type(err).__name__
    if isinstance(err, KeyError) and str(err):
        text = f"KeyError: {text}"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename and \
            str(err.filename) not in text:
        text = f"{text} ({err.filename})"
    # Messages raised for the Python API start with the function's name; the line already
    # says "recon3d COMMAND: error:".
    return text[len(command) + 2:] if text.startswith(f"{command}: ") else text


def report_error(err: BaseException, command: str, *, debug: bool | None = None) -> int:
    """Print ``err`` as one line ``recon3d COMMAND: error: ...`` on stderr; return its exit code.

    A rank other than 0 of a torchrun job says which rank it is. Failures (exit 1) add a hint
    that ``--debug`` shows the traceback; with ``debug`` (default: ``RECON3D_DEBUG`` set and not
    ``0``) the traceback is printed instead.
    """
    code = exit_code(err)
    if debug is None:
        debug = os.environ.get("RECON3D_DEBUG", "") not in ("", "0")
    if debug:
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__)
        return code
    rank = os.environ.get("RANK")
    who = f" (rank {rank})" if rank not in (None, "", "0") else ""
    hint = " (--debug or RECON3D_DEBUG=1 shows the traceback)" if code == 1 else ""
    print(f"recon3d {command}{who}: error: {_one_line(err, command)}{hint}", file=sys.stderr)
    return code
