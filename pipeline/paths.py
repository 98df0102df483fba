"""Paths and URLs, told apart in one place.

recon3d reads and writes scans and OME-Zarr images through fsspec, so those arguments may be
local folders or URLs (``s3://bucket/scan.zarr``, ``gs://…``, ``memory://…``); ``file://PATH``
is the local ``PATH``. Other things are local only, for a stated reason: a training run
directory (DeepSpeed writes its checkpoints with filesystem calls), an exported weights file, a
report's figures, an ingested source file. An argument of that kind given as a URL is refused
with the reason — never turned into a local folder named ``s3:`` (which ``pathlib`` would do:
``Path("s3://b/run")`` is the relative path ``s3:/b/run``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable

__all__ = ["is_url", "local_path", "require_local", "local_arg", "LocalPathRequired"]

# a URL scheme (RFC 3986: a letter, then letters, digits, + - .), or fsspec's chained form
# (``simplecache::s3://…``), followed by ://
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(::[A-Za-z][A-Za-z0-9+.\-]*)*://")


class LocalPathRequired(ValueError):
    """A URL where only a local path can be used (the message says why)."""


def is_url(path: Any) -> bool:
    """Whether ``path`` is an fsspec URL other than ``file://`` (which names a local path)."""
    text = str(path)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def local_path(path: Any) -> Path:
    """``path`` as a local :class:`~pathlib.Path` (``file://`` stripped); a URL is an error."""
    if is_url(path):
        raise LocalPathRequired(f"{path!r} is a URL, not a local path")
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def require_local(path: Any, what: str, why: str) -> Path:
    """``path`` as a local path, or :class:`LocalPathRequired` naming ``what`` and ``why``."""
    if is_url(path):
        raise LocalPathRequired(f"{what} must be a local path, got the URL {str(path)!r}: {why}")
    return local_path(path)


def local_arg(what: str, why: str, *, allow: tuple[str, ...] = (), as_path: bool = True) -> Callable[[str], Any]:
    """An argparse ``type=`` for a local-only path argument: a URL is a usage error (exit 2) that
    names the argument and the reason; the values in ``allow`` (e.g. ``"-"``) pass unchanged.
    Returns a :class:`~pathlib.Path` (``as_path``) or the text as given."""

    def convert(text: str) -> Any:
        if text in allow:
            return text
        try:
            path = require_local(text, what, why)
        except LocalPathRequired as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return path if as_path else text

    convert.__name__ = "local path"  # argparse names the type in its messages
    return convert
