"""Paths and URLs, told apart in one place.

recon3d reads and writes scans and OME-Zarr images through fsspec, so those arguments may be
local folders or URLs (``s3://bucket/scan.zarr``, ``gs://…``, ``memory://…``); ``file://PATH``
is the local ``PATH``. Other things are local only, for a stated reason: a training run
directory (DeepSpeed writes its checkpoints with filesystem calls; ``checkpoint.mirror`` copies
each save to a URL), the file an export writes, a report's figures, an ``--json`` file. Ingest
sources (``.npy``, HDF5, TIFF) and ``reconstruct --model`` weights may be URLs: they are read
through fsspec. An argument of a local-only kind given as a URL is refused
with the reason — never turned into a local folder named ``s3:`` (which ``pathlib`` would do:
``Path("s3://b/run")`` is the relative path ``s3:/b/run``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

__all__ = ["is_url", "local_path", "require_local", "local_arg", "LocalPathRequired", "parse_storage_options",
           "storage_options_applied", "STORAGE_OPTIONS_ENV"]

#: The environment variable that gives every command's ``--storage-options`` default.
STORAGE_OPTIONS_ENV = "RECON3D_STORAGE_OPTIONS"

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


def parse_storage_options(text: str | None, source: str = "--storage-options") -> dict[str, Any]:
    """The fsspec options of ``--storage-options JSON`` (or the environment): a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err.msg} at character {err.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{source}: must be a JSON object of fsspec options, e.g. "
                         f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}', got {text!r}")
    return value


def _protocol(url: str) -> str:
    """The protocol of the store a URL names (the innermost of fsspec's chained ``a::b://``)."""
    return url.split("://", 1)[0].split("::")[-1]


@contextlib.contextmanager
def storage_options_applied(options: Mapping[str, Any], urls: Iterable[Any]) -> Iterator[list[str]]:
    """Within the block, ``options`` are the defaults of every fsspec filesystem of the protocols
    of ``urls``: in this process (``fsspec.config.conf``, which fsspec applies whenever it opens
    one; explicit options still win) and in child processes (``FSSPEC_<PROTOCOL>``, which fsspec
    reads at import: data-loader workers). A command enters it once with its arguments, so every
    store it opens — the scan, the output, a reference — gets them, however deep the call. Both
    are restored afterwards. Yields the protocols set."""
    import fsspec.config

    protocols = sorted({_protocol(str(u)) for u in urls if is_url(u)}) if options else []
    saved = {p: (copy.deepcopy(fsspec.config.conf.get(p)), os.environ.get(f"FSSPEC_{p.upper()}"))
             for p in protocols}
    try:
        for p in protocols:
            conf = fsspec.config.conf.setdefault(p, {})
            conf.update(dict(options))
            os.environ[f"FSSPEC_{p.upper()}"] = json.dumps(conf)
        yield protocols
    finally:
        for p, (conf, env) in saved.items():
            if conf is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = conf
            if env is None:
                os.environ.pop(f"FSSPEC_{p.upper()}", None)
            else:
                os.environ[f"FSSPEC_{p.upper()}"] = env
