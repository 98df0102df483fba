"""``torch.distributed`` set-up in one place: backend, device, timeouts, agreement between ranks.

``recon3d train`` runs alone (world size 1, no process group needed) or under ``torchrun``
(single or multi node), which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous; the code is the same. The backend is NCCL when the rank has a CUDA device and gloo
otherwise. Every collective has a timeout, so a rank that dies makes the others fail with an
error instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shutdown_distributed", "any_rank", "barrier"]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: File stores of one-rank groups made here (no torchrun), removed at shutdown.
_STORE_FILES: list[str] = []


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device: str = "auto", *, timeout_s: int = 600) -> DistContext:
    """Join the job's process group (when launched by torchrun) and pick this rank's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but this rank sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            # Alone, without torchrun: DeepSpeed still wants a process group; a one-rank
            # group on a file store needs no port.
            import tempfile

            store_file = tempfile.NamedTemporaryFile(prefix="recon3d-pg-", delete=False).name
            _STORE_FILES.append(store_file)  # removed by shutdown_distributed
            store = dist.FileStore(store_file, 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            world, rank = 1, 0
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)  # DeepSpeed reads them
        else:
            kwargs = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group; remove the file store a one-rank group was made on."""
    if dist.is_initialized():
        dist.destroy_process_group()
    while _STORE_FILES:
        try:
            os.unlink(_STORE_FILES.pop())
        except FileNotFoundError:
            pass


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if ctx.world_size == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def mean_over_ranks(values: list[float | torch.Tensor], ctx: DistContext) -> list[float]:
    """The mean over the ranks of each value (floats or 0-d tensors): one all-reduce, one copy."""
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(dev).reshape(()) for v in values])
    if ctx.world_size > 1:
        dist.all_reduce(t)
        t = t / ctx.world_size
    return t.tolist()
