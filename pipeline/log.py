"""recon3d's messages: one :mod:`logging` tree (``recon3d.*``) on stderr; results go to stdout.

A command's result (a path, a table, JSON) is printed on stdout, so ``P=$(recon3d export RUN)``
holds just the path; everything else — progress, events, warnings — is a log record of the
``recon3d`` logger, written to stderr by one handler that the first message installs:

* on a terminal, rich's handler (time column, colours, no wrapping of long lines);
* otherwise (a log file, a pipe, a batch job) plain lines, the message alone, never wrapped.

Either handler writes to the *current* ``sys.stderr`` at each record, so redirections made after
it was installed (pytest's capture, ``contextlib.redirect_stderr``) see the messages. Applications
that configure :mod:`logging` themselves can add their own handler to ``recon3d`` first: none is
installed then.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger", "say"]

ROOT = "recon3d"


class _StderrHandler(logging.StreamHandler):
    """A plain ``%(message)s`` handler bound to whatever ``sys.stderr`` is when it writes."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _handler() -> logging.Handler:
    if getattr(sys.stderr, "isatty", lambda: False)():
        from rich.console import Console
        from rich.logging import RichHandler

        # Console(stderr=True) looks sys.stderr up at each write, like the plain handler.
        return RichHandler(console=Console(stderr=True, soft_wrap=True), show_path=False, markup=False,
                           rich_tracebacks=False, omit_repeated_times=True, show_level=False)
    return _StderrHandler()


def get_logger(name: str = "") -> logging.Logger:
    """The logger ``recon3d.NAME`` (``recon3d`` itself without a name), with the handler installed."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        root.addHandler(_handler())
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


def say(message: str, name: str = "", *, level: int = logging.INFO) -> None:
    """Log ``message`` (a line of chatter on stderr) as ``recon3d.NAME``."""
    get_logger(name).log(level, message)
