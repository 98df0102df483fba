"""How the ranks of a ``recon3d reconstruct`` job work together without a process group.

* :func:`env_rank_and_world` and the rank's device; messages of rank 0 (:func:`_say`);
* waits by polling (:func:`_poll`, :class:`WaitTimeoutError`): rank 0 for the other ranks'
  slabs (:func:`_wait_for_slabs`), the others for rank 0's preparation or export;
* the model: a run directory's export, made first (by rank 0) when missing or older than the
  run's latest checkpoint, or a weights file fetched from a URL (:func:`resolve_model`);
* the output's lease: its timings and the check before each slab (:func:`_check_lease`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from pipeline.errors import Recon3dError

from .config import ReconstructConfig
from .lease import HEARTBEAT_S, STALE_S, Lease, LeaseLostError, read_lease

if TYPE_CHECKING:
    from .store import _Output

__all__ = ["env_rank_and_world", "resolve_model", "WaitTimeoutError"]


def env_rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun sets them), default ``(0, 1)``."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"reconstruct: RANK={rank} and WORLD_SIZE={world} must satisfy 0 <= RANK < WORLD_SIZE")
    return rank, world


def _device(spec: str) -> torch.device:
    """The device of ``--device``: ``auto`` is this rank's GPU (``LOCAL_RANK``) if any, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(spec)


def _say(message: str, progress: bool) -> None:
    """A message of ``recon3d reconstruct`` on stderr (with ``progress`` only)."""
    if progress:
        from pipeline.log import say

        say(f"recon3d reconstruct {message}", "reconstruct")


class WaitTimeoutError(Recon3dError, TimeoutError):
    """A rank waited ``--wait-timeout`` seconds for another one: a failure (exit status 1)."""


def _poll(ready: Callable[[], bool], *, timeout_s: float, what: str,
          missing: Callable[[], str] | None = None) -> None:
    """Wait until ``ready()``; ``missing()`` adds what is still missing to the timeout's message."""
    delay, start = 0.2, time.monotonic()
    while not ready():
        if time.monotonic() - start > timeout_s:
            detail = f" ({missing()})" if missing is not None else ""
            raise WaitTimeoutError(f"reconstruct: gave up after {timeout_s:.0f} s waiting for {what}{detail}; "
                                   "rerun the same command to resume, or raise --wait-timeout")
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _wait_for_slabs(out: _Output, fingerprint: str, total: int, config: ReconstructConfig,
                    lease: Lease | None = None) -> None:
    """Rank 0: wait until every slab's completion record exists and carries ``fingerprint``
    (the other ranks' included); stops at once if another job takes the output's lease."""
    verified: set[int] = set()
    have = len(out.done(fingerprint, verified))
    if have >= total:
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold cyan]waiting for the other ranks' slabs"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                  disable=not config.progress) as bar:
        task = bar.add_task("wait", total=total, completed=have)

        def ready() -> bool:
            if lease is not None:
                lease.check()
            n = len(out.done(fingerprint, verified))
            bar.update(task, completed=n)
            return n >= total

        _poll(ready, timeout_s=config.wait_timeout_s, what=f"the other ranks' slabs of {config.out}",
              missing=lambda: out.missing(fingerprint, total, verified) + "; check the other ranks' logs")


def _lease_times(config: ReconstructConfig) -> tuple[float, float]:
    """``(heartbeat_s, stale_s)`` of the output's lease: the config's, else the environment's."""
    def pick(value: float | None, env: str, default: float) -> float:
        if value is not None:
            return float(value)
        text = os.environ.get(env)
        try:
            return float(text) if text else default
        except ValueError:
            raise ValueError(f"reconstruct: {env}={text!r} must be a number of seconds") from None

    stale = pick(config.lease_stale_s, "RECON3D_LEASE_STALE_S", STALE_S)
    # A heartbeat left at its default beats often enough for a shortened stale age.
    return pick(config.lease_heartbeat_s, "RECON3D_LEASE_HEARTBEAT_S", min(HEARTBEAT_S, stale / 4)), stale


def _check_lease(out: str, fingerprint: str, token: str, storage_options) -> None:
    """Before a slab is written: this job's rank 0 must still hold the output's lease.

    Stateless (it reads the lease and compares its token), so it also runs in the worker
    processes of ``--scheduler distributed``.
    """
    info = read_lease(out, storage_options)
    if info is None or info.token != token:
        who = "was removed (rank 0 ended)" if info is None else f"was taken over by {info.describe()}"
        raise LeaseLostError(f"reconstruct: stopped writing '{out}': this job's lease {who} (this job's "
                             f"fingerprint {fingerprint[:12]}); rerun the command once the other job has "
                             "finished, or choose another --out")


# ----------------------------------------------------------------------------- models
def _checkpoints_dir(run_dir: Path) -> Path:
    """A run's checkpoints directory (``checkpoint.dir`` of its resolved config, else RUN/checkpoints)."""
    import yaml

    directory = run_dir / "checkpoints"
    resolved = run_dir / "config.resolved.yaml"
    if resolved.is_file():
        cfg = yaml.safe_load(resolved.read_text()) or {}
        custom = (cfg.get("checkpoint") or {}).get("dir")
        if custom:
            directory = Path(custom)
    return directory


def _latest_checkpoint_time(run_dir: Path, pick: str = "latest") -> tuple[float, Path]:
    """``(mtime of its manifest, path)`` of the run's latest complete checkpoint, or of the one
    its best validation kept (``pick='best'``, ``checkpoint.keep_best``)."""
    from pipeline.train.checkpoint import read_best, read_checkpoint

    directory = _checkpoints_dir(run_dir)
    if pick == "best":
        best = read_best(directory)
        if best is None:
            raise FileNotFoundError(f"reconstruct: --pick best: run {run_dir} has no best checkpoint ({directory}/best.json); "
                                    "train with checkpoint.keep_best: estimate (or psnr, loss) and validation.scans")
        info = read_checkpoint(directory / best["tag"])
    else:
        info = read_checkpoint(directory)
    manifest = info.directory / info.tag / "recon3d" / "manifest.json"
    return manifest.stat().st_mtime, info.directory / info.tag


_FETCHED: dict[str, Path] = {}


def _fetch_weights(url: str) -> Path:
    """A local copy of the exported weights file at ``url`` (fsspec; ``--storage-options`` reach
    it), made once per process in a temporary folder removed at exit. It is then read like a local
    export: weights only, checked, nothing in it run."""
    if url in _FETCHED and _FETCHED[url].is_file():
        return _FETCHED[url]
    import atexit
    import shutil
    import tempfile

    import fsspec

    folder = Path(tempfile.mkdtemp(prefix="recon3d-model-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    local = folder / (url.rstrip("/").rsplit("/", 1)[-1] or "model.pt")
    try:
        with fsspec.open(url, "rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"reconstruct: --model {url}: no such weights file (a URL must name an exported "
                                "weights file; a run directory must be a local or mounted path)") from None
    except IsADirectoryError:
        raise FileNotFoundError(f"reconstruct: --model {url} is a folder: a URL must name an exported weights file "
                                "(`recon3d export RUN`); a run directory must be a local or mounted path") from None
    _FETCHED[url] = local
    return local


def resolve_model(path: str | Path, *, rank: int = 0, timeout_s: float = 3600.0, pick: str = "latest") -> Path:
    """The exported weights file of ``path``: the file itself, or a run directory's
    ``export/model.pt`` — exported first (by rank 0; the other ranks wait) when it is missing or
    older than the run's latest complete checkpoint. ``pick='best'``: the checkpoint the run's
    best validation kept, exported to ``export/best.pt``. A URL names a weights file, fetched to
    a local temporary copy (:func:`_fetch_weights`)."""
    if pick not in ("latest", "best"):
        raise ValueError(f"reconstruct: --pick must be latest or best, got {pick!r}")
    from pipeline.paths import is_url

    if is_url(path):
        if pick == "best":
            raise ValueError(f"reconstruct: --pick best needs a run directory (a local or mounted path), and "
                             f"{path} is a URL; export the best checkpoint (`recon3d export RUN --checkpoint ...`) "
                             "and give that file")
        return _fetch_weights(str(path))
    p = Path(path)
    if p.is_file():
        if pick == "best":
            raise ValueError(f"reconstruct: --pick best needs a run directory, and {path} is a weights file")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"reconstruct: --model {path}: no such run directory or weights file")
    export = p / "export" / ("best.pt" if pick == "best" else "model.pt")
    try:
        ckpt_time, ckpt = _latest_checkpoint_time(p, pick)
    except FileNotFoundError:
        if pick == "best":
            raise
        if export.is_file():
            return export
        raise
    except Exception as err:  # no checkpoint: an export alone is fine
        if export.is_file() and pick == "latest":
            return export
        raise FileNotFoundError(f"reconstruct: --model {path}: no {export.relative_to(p)} and no checkpoint "
                                f"({err})") from None

    def fresh() -> bool:
        return export.is_file() and export.stat().st_mtime >= ckpt_time

    if not fresh():
        if rank == 0:
            from pipeline.train import export_run

            export_run(p, export if pick == "best" else None, checkpoint=ckpt if pick == "best" else None)
        else:
            _poll(fresh, timeout_s=timeout_s, what=f"rank 0 to export {ckpt} to {export}")
    return export
