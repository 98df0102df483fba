"""Checkpoints of a training run: DeepSpeed's shards plus each rank's own state.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000050/                  one save (a DeepSpeed tag)
        mp_rank_00_model_states.pt  \\  DeepSpeed's sharded files (model, optimizer
        zero_pp_rank_*_...pt        /   partitions), written by every rank
        recon3d/rank_00000.pt       this rank's state: step, stream cursor, RNG states
        recon3d/rank_00001.pt       (torch, numpy, python, CUDA, every loss generator)
        recon3d/manifest.json       written last, by rank 0, once every rank's files exist
    step_00000050.universal/        made on demand when resuming at another world size
    latest                          the tag of the newest complete save

DeepSpeed keeps no RNG state and, under ZeRO-1/2, returns rank 0's ``client_state`` on every
rank, hence the per-rank files. ``latest`` moves only after the manifest is written, so a save
killed half-way is never resumed from; the last ``keep_last`` complete saves are kept.

Resuming at the same world size restores everything bit for bit. At another world size
DeepSpeed refuses the shards; the checkpoint is converted to DeepSpeed's universal format
(once, by rank 0) and loaded with ``load_universal``, which carries the fp32 weights and the
optimizer moments over exactly. What differs from an uninterrupted run at the new size: the
stream continues from the global sample position the old ranks had reached together (no sample
of the epoch is skipped or repeated), but the samples are dealt to the new ranks in a new
pattern and each step now takes ``world_size`` samples; RNG states cannot be mapped between
rank counts, so each rank's RNGs and loss generators are reseeded from (seed, step, rank).

Every file of a checkpoint is read without running pickled code (:mod:`pipeline.safeload`): the
per-rank state holds only tensors and plain values (numpy's RNG state is stored as a tensor of
its key plus numbers), and DeepSpeed's own loads go through the same weights-only reader. A save
that fails (disk full, an error in DeepSpeed's writer) removes its temporary files and its
partial step folder, leaves ``latest`` on the previous complete save and ends with one line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import Recon3dError, storage_error
from ..log import say
from ..safeload import load as safe_load, numpy_array_globals
from .distributed import DistContext, barrier

__all__ = ["CheckpointManager", "CheckpointInfo", "CheckpointError", "rng_state", "set_rng_state", "tag_of"]

MANIFEST = "manifest.json"
OWN = "recon3d"
#: The per-rank state's format: 2 holds only tensors and plain values; 1 (no ``format`` key, older
#: recon3d) pickled numpy's RNG state tuple, read with numpy's array globals only and converted.
RANK_FORMAT = 2
_OLD_RANK_FILE = ("a rank file of a recon3d older than safe checkpoints may hold numpy arrays only; this one asks "
                  "for more: resume from a checkpoint saved by this version, or start a new run")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, another model)."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, numpy, python, CUDA) as tensors and plain values.

    numpy's state tuple holds an ``ndarray``, which a weights-only load refuses; its key is
    stored as an int64 tensor (the uint32 values, exactly) and the rest as numbers.
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], npy["key"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _from_format_1(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """A rank state of an older recon3d (numpy's RNG state as its pickled tuple) in format 2."""
    rng = state.get("rng")
    npy = rng.get("numpy") if isinstance(rng, dict) else None
    if not (isinstance(npy, tuple) and len(npy) == 5 and isinstance(npy[1], np.ndarray)):
        raise CheckpointError(f"{path}: not a recon3d rank state (no numpy RNG state of the older format)")
    name, key, pos, has_gauss, cached = npy
    numpy_state = {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                   "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return dict(state, rng=dict(rng, numpy=numpy_state), format=RANK_FORMAT)


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete save: where it is and what its manifest says."""

    directory: Path  # the checkpoints directory
    tag: str
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.directory / self.tag

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of dicts/lists/tuples (what a save of it needs, about)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


# torch.save's C++ writer reports a failed write as a RuntimeError without an errno
# ("file write failed", "basic_ios::clear"): what a full disk looks like from there.
_WRITE_FAILED = ("file write failed", "basic_ios::clear", "No space left", "unexpected pos")


def _write_error(err: BaseException, path: Path, needed: int | None) -> BaseException:
    """The one-line error of a failed checkpoint write to ``path`` (``err`` itself if not a write failure)."""
    if isinstance(err, OSError):
        out = storage_error(err, path, needed)
        if out is not err:
            return out
        return Recon3dError(f"checkpoint save failed writing {path}: {err.strerror or err}")
    if isinstance(err, RuntimeError) and any(m in str(err) for m in _WRITE_FAILED):
        probe = path if path.exists() else path.parent
        try:
            free = shutil.disk_usage(probe if probe.exists() else path.parents[1]).free
        except OSError:
            free = None
        if free is not None and (needed is None or free < max(needed, 1 << 20)):
            return storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path, needed)
        return Recon3dError(f"checkpoint save failed writing {path}: {str(err).strip().splitlines()[0][:200]}")
    return err


def _write_atomic(path: Path, write: Callable[[Path], None], needed: int) -> None:
    """``write(tmp)`` then fsync and rename onto ``path``: the file is whole or absent, and a
    failure leaves no temporary file and ends in one line (a full disk names the bytes)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        mapped = _write_error(err, path, needed)
        if mapped is err:
            raise
        raise mapped from err


def _atomic_write(path: Path, data: bytes) -> None:
    _write_atomic(path, lambda tmp: tmp.write_bytes(data), len(data))


def _torch_save_atomic(obj: Any, path: Path) -> None:
    _write_atomic(path, lambda tmp: torch.save(obj, tmp), _tensor_bytes(obj))


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """The complete save at ``path``: a checkpoints directory (its ``latest``) or a tag folder.

    Raises:
        CheckpointError: nothing there, or a save without its manifest (killed mid-save).
    """
    p = Path(path)
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        directory = p
    elif (p / OWN / MANIFEST).is_file() or p.is_dir() and (p.parent / "latest").exists():
        directory, tag = p.parent, p.name
    else:
        raise CheckpointError(f"no checkpoint at {p} (expected a checkpoints directory with 'latest', or a step_* folder)")
    manifest_path = directory / tag / OWN / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {directory / tag} is incomplete (no {OWN}/{MANIFEST}: the save was interrupted)")
    return CheckpointInfo(directory, tag, json.loads(manifest_path.read_text()))


BEST = "best.json"


def read_best(directory: str | Path) -> dict[str, Any] | None:
    """A checkpoints directory's best-validation record (``checkpoint.keep_best``), or ``None``."""
    path = Path(directory) / BEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


class CheckpointManager:
    """Saves and finds checkpoints of one run; every rank calls :meth:`save` together.

    Args:
        directory: the run's checkpoints directory.
        ctx: this rank's distributed context.
        keep_last: complete saves to keep.
        mirror: an fsspec URL that rank 0 copies each complete save to (:mod:`.mirror`), or ``None``.
        storage_options: fsspec options of the mirror's store.
    """

    def __init__(self, directory: Path, ctx: DistContext, *, keep_last: int = 3, mirror: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> None:
        from .mirror import CheckpointMirror

        self.directory = Path(directory)
        self.ctx = ctx
        self.keep_last = keep_last
        self.mirror = (CheckpointMirror(mirror, keep_last=keep_last, storage_options=storage_options)
                       if mirror and ctx.is_main else None)
        self._mirror_job: tuple[threading.Thread, Path, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, rank_state: dict[str, Any], manifest: dict[str, Any], *,
             warn: Callable[[str], None] | None = None) -> tuple[Path, float, int]:
        """Save step ``step``: DeepSpeed's shards, this rank's state, then the manifest and ``latest``;
        then rank 0 starts copying it to the mirror, if any, in the background (this call first
        waits for the previous copy; a failure there is ``warn(message)``, not an error).

        Returns:
            ``(path, seconds, bytes)`` of the save (bytes summed over every rank's files).
        """
        from .engine import save_engine

        self.finish_mirror(warn)  # the previous save's copy, before this save may prune its files
        t0 = time.perf_counter()
        tag = tag_of(step)
        path = self.directory / tag
        own = path / OWN
        try:
            if self.ctx.is_main:
                own.mkdir(parents=True, exist_ok=True)
                (own / MANIFEST).unlink(missing_ok=True)  # a re-save of this step is incomplete until done
            barrier(self.ctx)
            try:
                save_engine(engine, self.directory, tag)
            except Exception as err:
                mapped = _write_error(err, path, self._expected_bytes(engine))
                if mapped is err:
                    raise
                raise mapped from err
            own.mkdir(parents=True, exist_ok=True)
            _torch_save_atomic(dict(rank_state, format=RANK_FORMAT), own / f"rank_{self.ctx.rank:05d}.pt")
            barrier(self.ctx)
            nbytes = 0
            if self.ctx.is_main:
                missing = [r for r in range(self.ctx.world_size) if not (own / f"rank_{r:05d}.pt").is_file()]
                if missing:
                    raise CheckpointError(f"save {path}: the state files of ranks {missing} are missing")
                nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                body = dict(manifest, step=step, world_size=self.ctx.world_size, tag=tag, bytes=nbytes,
                            saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
                _atomic_write(own / MANIFEST, json.dumps(body, indent=1).encode())
                _atomic_write(self.directory / "latest", tag.encode())
                self._prune(keep=tag)
            barrier(self.ctx)
        except BaseException:
            self._discard_partial(tag)
            raise
        seconds = time.perf_counter() - t0
        if self.mirror is not None:
            self._start_mirror(path)
        return path, seconds, nbytes

    # ------------------------------------------------------------------ mirror
    def _start_mirror(self, path: Path) -> None:
        """Rank 0: copy the complete save ``path`` to the mirror in a background thread (training
        goes on meanwhile; the next save, or :meth:`finish_mirror`, waits for it)."""
        result: dict[str, Any] = {}
        best = (self.best() or {}).get("tag")

        def run() -> None:
            try:
                result["done"] = self.mirror.push(path, best=best)
            except Exception as err:  # noqa: BLE001 - the mirror is a copy: never lose the run over it
                result["error"] = err

        thread = threading.Thread(target=run, name="checkpoint-mirror", daemon=False)
        thread.start()
        self._mirror_job = (thread, path, result)

    def finish_mirror(self, warn: Callable[[str], None] | None = None) -> bool | None:
        """Wait for the mirror copy in flight, if any: ``True`` once complete; ``False`` after a
        failure, told as ``warn(message)`` (the local checkpoint is whole: the run goes on)."""
        if self._mirror_job is None:
            return None
        thread, path, result = self._mirror_job
        self._mirror_job = None
        thread.join()
        if "error" in result:
            err = result["error"]
            message = (f"checkpoint mirror {self.mirror.url}: copying {path.name} failed "
                       f"({type(err).__name__}: {str(err).strip()[:200]}); the local checkpoint is complete and "
                       f"the mirror's 'latest' still names its previous copy")
            if warn is not None:
                warn(message)
            else:
                say(message, "train", level=logging.WARNING)
            return False
        seconds, nbytes = result["done"]
        say(f"checkpoint mirror: copied {path.name} to {self.mirror.url} ({nbytes / 2**20:.1f} MiB, {seconds:.2f} s)",
            "train")
        return True

    def push_mirror(self, path: Path, warn: Callable[[str], None] | None = None) -> bool:
        """Rank 0: copy the complete save ``path`` to the mirror and wait (see :meth:`finish_mirror`)."""
        if self.mirror is None:
            return False
        self.finish_mirror(warn)
        self._start_mirror(path)
        return bool(self.finish_mirror(warn))

    def _expected_bytes(self, engine) -> int | None:
        """About what a save needs: the last complete save's size, else 4× the weights (weights,
        fp32 master copy, two Adam moments)."""
        try:
            last = self.latest()
        except (CheckpointError, OSError, ValueError):  # only an estimate: never mask the save's error
            last = None
        if last is not None and last.manifest.get("bytes"):
            return int(last.manifest["bytes"])
        module = getattr(engine, "module", None)
        if module is None:
            return None
        return 4 * sum(p.numel() * 4 for p in module.parameters())

    def _discard_partial(self, tag: str) -> None:
        """Remove what a failed save of ``tag`` left: never a complete save or the one ``latest`` names.

        Frees the space a full disk needs back and leaves no ``.tmp`` files; only rank 0 removes
        the folder (the others may still be writing into it until they fail too).
        """
        path = self.directory / tag
        for tmp in list(path.rglob(".*.tmp*")) + list(self.directory.glob(".latest.tmp*")):
            tmp.unlink(missing_ok=True)
        latest = self.directory / "latest"
        named = latest.read_text().strip() if latest.is_file() else None
        if self.ctx.is_main and named != tag and not (path / OWN / MANIFEST).is_file():
            shutil.rmtree(path, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.directory.glob("step_*") if p.is_dir() and not p.name.endswith(".universal")
                          and (p / OWN / MANIFEST).is_file())
        best = (self.best() or {}).get("tag")
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old.name in (keep, best):  # the best validation's save is kept whatever its age
                continue
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + ".universal"), ignore_errors=True)

    # ------------------------------------------------------------------ best
    def best(self) -> dict[str, Any] | None:
        """The record of the best validation's save (``BEST``: tag, step, metric, value), or ``None``."""
        return read_best(self.directory)

    def mark_best(self, record: dict[str, Any]) -> None:
        """Rank 0: record ``record['tag']`` (a complete save) as the best validation's; the save it
        replaces is pruned like any other once it is older than the last ``keep_last``."""
        if not self.ctx.is_main:
            return
        if not (self.directory / record["tag"] / OWN / MANIFEST).is_file():
            raise CheckpointError(f"best checkpoint {self.directory / record['tag']} is not a complete save")
        before = (self.best() or {}).get("tag")
        _atomic_write(self.directory / BEST, json.dumps(record, indent=1).encode())
        complete = sorted(p.name for p in self.directory.glob("step_*") if p.is_dir()
                          and not p.name.endswith(".universal") and (p / OWN / MANIFEST).is_file())
        if before and before != record["tag"] and before in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(self.directory / before, ignore_errors=True)
            shutil.rmtree(self.directory / (before + ".universal"), ignore_errors=True)

    # ------------------------------------------------------------------ find
    def latest(self) -> CheckpointInfo | None:
        """The newest complete save of this run, or ``None``."""
        if not (self.directory / "latest").is_file():
            return None
        return read_checkpoint(self.directory)

    def rank_state(self, info: CheckpointInfo, rank: int) -> dict[str, Any]:
        path = info.path / OWN / f"rank_{rank:05d}.pt"
        if not path.is_file():
            raise CheckpointError(f"checkpoint {info.path}: the state of rank {rank} is missing ({path})")
        state = safe_load(path, map_location="cpu", hints={"numpy.": _OLD_RANK_FILE},
                          also_allow=numpy_array_globals())
        if isinstance(state, dict) and "format" not in state:
            state = _from_format_1(state, path)
        if not isinstance(state, dict) or state.get("format") != RANK_FORMAT:
            raise CheckpointError(f"checkpoint {info.path}: {path} is not a recon3d rank state of format "
                                  f"{RANK_FORMAT} ({_OLD_RANK_FILE})")
        return state

    # ------------------------------------------------------------------ universal
    def universal(self, info: CheckpointInfo) -> Path:
        """The universal conversion of ``info`` (made by rank 0 on first use); every rank calls it."""
        from .engine import convert_to_universal

        out = self.directory / f"{info.tag}.universal"
        done = out / ".complete"
        if self.ctx.is_main and not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            convert_to_universal(info.path, out / info.tag)
            done.write_text(info.tag)
        barrier(self.ctx)
        if not done.is_file():
            raise CheckpointError(f"universal conversion of {info.path} did not complete")
        return out
