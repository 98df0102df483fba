"""A copy of a run's checkpoints on an fsspec URL (``checkpoint.mirror``), e.g. ``s3://bucket/run``.

DeepSpeed writes and reads its checkpoints with filesystem calls, so a run's checkpoints live on
a filesystem path; the mirror is a second copy in an object store that outlives the machine.
After each complete save (manifest written, ``latest`` moved) rank 0 uploads the new ``step_*``
folder, in a background thread while training goes on (the next save and the end of the run wait
for it), to ``URL/step_*`` — its manifest last — and only then writes ``URL/latest``, so the mirror's
``latest`` never names a half-uploaded save. Old mirrored saves are pruned like ``keep_last``
(the best validation's save is kept). A failed upload is reported, never raised: the run goes on
with its local checkpoints, and the mirror's ``latest`` still names its last complete copy.

To resume from a mirror, copy it back to a filesystem path (``URL/latest`` and the folder it
names) and give that path to ``recon3d train --resume``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CheckpointMirror"]


class CheckpointMirror:
    """Uploads complete saves of a checkpoints directory to ``url`` (see the module docstring).

    Args:
        url: the mirror's fsspec URL (a folder; created as needed).
        keep_last: mirrored saves to keep (as ``checkpoint.keep_last``).
        storage_options: fsspec options of the store (``fsspec.config`` defaults apply otherwise).
    """

    def __init__(self, url: str, *, keep_last: int = 3, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.storage_options = dict(storage_options or {})
        self._fs: Any = None
        self._root = ""

    def _store(self) -> tuple[Any, str]:
        """The filesystem and the root path in it (opened on first use)."""
        if self._fs is None:
            from fsspec.core import url_to_fs

            self._fs, self._root = url_to_fs(self.url, **self.storage_options)
            self._root = self._root.rstrip("/")
        return self._fs, self._root

    def push(self, step_dir: Path, *, best: str | None = None) -> tuple[float, int]:
        """Upload the complete save ``step_dir`` (then ``latest``, ``best.json`` if any) and prune.

        Returns:
            ``(seconds, bytes)`` uploaded. Raises whatever the store raises (the caller warns).
        """
        t0 = time.perf_counter()
        fs, root = self._store()
        tag = step_dir.name
        target = f"{root}/{tag}"
        files = sorted((p for p in step_dir.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: (p.name == "manifest.json", str(p)))  # the manifest last
        if fs.exists(target):  # a re-save of this step: never mix two saves' files
            fs.rm(target, recursive=True)
        local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))
        for path in files:
            if local:  # a mounted folder: fsspec's local put needs the folders made
                fs.makedirs(f"{target}/{path.relative_to(step_dir).parent.as_posix()}", exist_ok=True)
            fs.put_file(str(path), f"{target}/{path.relative_to(step_dir).as_posix()}")
        fs.pipe_file(f"{root}/latest", tag.encode())
        best_file = step_dir.parent / "best.json"
        if best_file.is_file():
            fs.put_file(str(best_file), f"{root}/best.json")
        self.prune(keep=(tag, best))
        return time.perf_counter() - t0, sum(p.stat().st_size for p in files)

    def prune(self, keep: tuple[str | None, ...] = ()) -> list[str]:
        """Remove the mirrored saves older than the last ``keep_last`` (never those in ``keep``)."""
        fs, root = self._store()
        fs.invalidate_cache(root)
        names = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)})
        steps = [n for n in names if n.startswith("step_") and not n.endswith(".universal")]
        removed = []
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old in keep:
                continue
            fs.rm(f"{root}/{old}", recursive=True)
            removed.append(old)
        return removed
