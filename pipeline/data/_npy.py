"""A ``.npy`` file read block by block without keeping it mapped, or without downloading it.

``np.load(mmap_mode="r")`` keeps every page it touched mapped into the process, so reading a
large file block by block would make the process's resident memory grow to the whole file
(clean page-cache pages, but counted as the process's memory and pinned while mapped). Here
each read maps the file, copies the block out and unmaps it again.

A URL (``s3://bucket/projections.npy``, through fsspec) is read the same way without a local
copy: the header once (``numpy.lib.format``), then each block as the byte ranges it covers,
fetched together (``fs.cat_ranges``, which s3fs runs concurrently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.paths import is_url

__all__ = ["NpyArray", "open_url"]

#: Byte ranges closer than this are fetched as one request (the gap read and dropped).
_MERGE_GAP = 1 << 20


def open_url(url: str) -> Any:
    """A binary file object of ``url`` through fsspec (``fsspec.config`` storage options apply);
    a missing object is :class:`FileNotFoundError` naming it."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"'{url}' does not exist")
    return fs.open(path, "rb")


class NpyArray:
    """Lazy ``.npy`` array: ``shape``, ``dtype``, ``ndim`` and ``a[selection]`` (a copy)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._fs: Any = None
        if is_url(self.path):
            self._open_url()
            return
        if not Path(self.path).exists():
            raise FileNotFoundError(f"'{self.path}' does not exist")
        probe = np.load(self.path, mmap_mode="r")
        self.shape: tuple[int, ...] = tuple(int(s) for s in probe.shape)
        self.dtype = probe.dtype
        del probe

    def _open_url(self) -> None:
        """Read the header of the ``.npy`` at a URL: shape, dtype, the data's byte offset."""
        from numpy.lib import format as npy_format

        with open_url(self.path) as f:
            try:
                version = npy_format.read_magic(f)
                read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                               else npy_format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as err:
                raise ValueError(f"'{self.path}' is not a .npy file ({err})") from None
            self._offset = f.tell()
            self._fs, self._key = f.fs, f.path
        if fortran and len(shape) > 1:
            raise ValueError(f"'{self.path}' is stored in Fortran order, which is read from a URL only whole: "
                             f"save it C-ordered (np.save(path, np.ascontiguousarray(a))) or copy it to a local path")
        if dtype.hasobject:
            raise ValueError(f"'{self.path}' holds Python objects; recon3d reads numeric arrays only")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, selection: Any) -> np.ndarray:
        if self._fs is not None:
            return self._read_url(selection)
        mapped = np.load(self.path, mmap_mode="r")
        try:
            return np.array(mapped[selection])
        finally:
            del mapped

    def _read_url(self, selection: Any) -> np.ndarray:
        """``a[selection]`` for basic slices (step 1) and integers, by ranged reads."""
        sel = selection if isinstance(selection, tuple) else (selection,)
        if any(s is Ellipsis for s in sel):
            i = next(k for k, s in enumerate(sel) if s is Ellipsis)
            sel = sel[:i] + (slice(None),) * (self.ndim - len(sel) + 1) + sel[i + 1:]
        sel = sel + (slice(None),) * (self.ndim - len(sel))
        if len(sel) != self.ndim:
            raise IndexError(f"'{self.path}': {len(sel)} indices for an array of {self.ndim} dimensions")
        ranges: list[tuple[int, int]] = []
        drop: list[int] = []
        for axis, (s, n) in enumerate(zip(sel, self.shape)):
            if isinstance(s, (int, np.integer)):
                k = int(s) + n if int(s) < 0 else int(s)
                if not 0 <= k < n:
                    raise IndexError(f"'{self.path}': index {s} out of range for axis {axis} of size {n}")
                ranges.append((k, k + 1))
                drop.append(axis)
            elif isinstance(s, slice) and s.step in (None, 1):
                start, stop, _ = s.indices(n)
                ranges.append((start, max(start, stop)))
            else:
                raise TypeError(f"'{self.path}': a URL is read by slices of step 1 and integers, not {s!r}")
        out_shape = tuple(b - a for a, b in ranges)
        out = np.empty(out_shape, dtype=self.dtype)
        if out.size:
            self._fill(out, ranges)
        return out.reshape(tuple(n for k, n in enumerate(out_shape) if k not in drop))

    def _fill(self, out: np.ndarray, ranges: list[tuple[int, int]]) -> None:
        """Fill ``out`` with the block ``ranges`` (per axis): one contiguous run per index of the
        axes before the last partial one, neighbouring runs fetched as one request."""
        item = self.dtype.itemsize
        strides = [item * int(np.prod(self.shape[k + 1:], dtype=np.int64)) for k in range(self.ndim)]
        # the first axis from which the block is contiguous: every later axis is whole
        split = self.ndim - 1
        while split > 0 and ranges[split] == (0, self.shape[split]):
            split -= 1
        run = (ranges[split][1] - ranges[split][0]) * strides[split]
        starts = []
        for index in np.ndindex(*(b - a for a, b in ranges[:split])):
            pos = self._offset + sum((ranges[k][0] + i) * strides[k] for k, i in enumerate(index))
            starts.append(pos + ranges[split][0] * strides[split])
        # merge runs whose gap is small into one request each
        groups: list[list[int]] = [[starts[0]]]
        for s in starts[1:]:
            if s - (groups[-1][-1] + run) <= _MERGE_GAP:
                groups[-1].append(s)
            else:
                groups.append([s])
        blobs = self._fs.cat_ranges([self._key] * len(groups), [g[0] for g in groups],
                                    [g[-1] + run for g in groups])
        flat = out.reshape(-1).view(np.uint8)
        at = 0
        for group, blob in zip(groups, blobs):
            if len(blob) != group[-1] + run - group[0]:
                raise OSError(f"'{self.path}': short read ({len(blob)} of {group[-1] + run - group[0]} bytes): "
                              f"the file is truncated or changed while read")
            view = np.frombuffer(blob, dtype=np.uint8)
            for s in group:
                flat[at:at + run] = view[s - group[0]:s - group[0] + run]
                at += run
