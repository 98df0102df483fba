"""A ``.npy`` file read block by block without keeping it mapped.

``np.load(mmap_mode="r")`` keeps every page it touched mapped into the process, so reading a
large file block by block would make the process's resident memory grow to the whole file
(clean page-cache pages, but counted as the process's memory and pinned while mapped). Here
each read maps the file, copies the block out and unmaps it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NpyArray"]


class NpyArray:
    """Lazy ``.npy`` array: ``shape``, ``dtype``, ``ndim`` and ``a[selection]`` (a copy)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not Path(self.path).exists():
            raise FileNotFoundError(f"'{self.path}' does not exist")
        probe = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, ...] = tuple(int(s) for s in probe.shape)
        self.dtype = probe.dtype
        del probe

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, selection: Any) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mapped[selection])
        finally:
            del mapped
