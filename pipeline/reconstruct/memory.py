"""The output slab of ``recon3d reconstruct --model`` chosen from a memory budget.

Each input slab is the output slab plus a halo on each side, so thin slabs compute the halo
many times over (slab 8, halo 9: 26 input slices per 8 output slices, 3.4×). Without
``--slab``, the driver takes the thickest slab (a multiple of the output chunk depth) whose
*estimated* peak fits ``--memory-budget``:

    PROCESS_BYTES + workers × (data copies × data bytes/slice × slices read at once
                               + image copies × image bytes/slice × input slices
                               + activation bytes/voxel × backbone voxels)

so the budget bounds the whole process, as a per-process memory limit (a scheduler's
``--mem-per-cpu``, a container's) does:

* :data:`PROCESS_BYTES` (320 MiB): Python, torch, zarr, dask, the model and what the job
  keeps once its first slab ran (the scale's measurement, the output, the threads' heaps):
  312–326 MiB resident between slabs of ``recon3d reconstruct`` on CPU, MRI and CT
  (BENCHMARKS.md, issue 17.2);

* data: the measurements (and MRI coil maps) a slab reads. A staged model reads its input in
  pieces of one stored object (a chunk, or a shard on an object store) and frees each once its
  initial estimate is made (one copy of one piece, whatever the slab); any other model holds
  the whole input slab's and applies its operator to it (two copies: the coil images or
  projections it makes);
* image: :data:`IMAGE_COPIES` copies of the input slab's image (initial estimate, backbone
  input and output, tile accumulator and weights);
* activations: the backbone's peak of live tensor bytes per input voxel, measured once on a
  small zero input (:func:`activation_bytes_per_voxel`; deterministic, so every rank of a job
  chooses the same slab), times the input slab's voxels, or one batch of tiles when tiled;
* workspace: on CPU the convolution library's own copies, which the count cannot see. The
  backbone runs its convolutions in pieces there (:mod:`.pieces`), so this is one piece's
  (:func:`piece_workspace`), a constant, instead of :func:`cpu_conv_workspace` per voxel.

``benchmarks/reconstruct.py`` compares the estimate with the measured peak.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.models.tiling import TiledBackbone

__all__ = ["parse_bytes", "format_bytes", "activation_bytes_per_voxel", "MemoryModel", "choose_slab",
           "DEFAULT_BUDGET", "PROCESS_BYTES", "cpu_conv_workspace", "piece_workspace", "first_width",
           "rolling_activation_bytes", "ROLLED_HEAP",
           "IMAGE_COPIES", "DATA_COPIES"]

DEFAULT_BUDGET = 1 << 30
#: What the process holds outside its slabs (interpreter, libraries, model, the job's own
#: state), in the estimate once. Measured: 239 MiB after the imports, 298–302 MiB before the
#: first slab (export read twice, the intensity scale, the output created), 312–326 MiB before
#: each later slab (what the first slab's threads keep in their heaps), on a 256² 8-coil MRI
#: and a 128² CT scan (BENCHMARKS.md, issue 17.2).
PROCESS_BYTES = 320 << 20


def cpu_conv_workspace(width: int) -> float:
    """Bytes per input voxel (float32) that a backbone pass holds on CPU outside the tensors the
    dispatcher sees, for a first convolution of ``width`` output channels: the convolution
    library's blocked copy of a full-resolution feature map, channels padded to 16 floats
    (64 B per 16 channels), and below 8 channels another 8 B per missing channel.

    Math:
        ``4 · (16·⌈width/16⌉ + 2·max(0, 8 − width))``

    Measured as RSS high-water minus the count on a 24×128×128 input (BENCHMARKS.md, issue 17.2):
    first widths 2, 4, 6, 8, 12, 16, 32 → +115, +96, +80, +64, +64, +64, +128 B/voxel (this
    gives 112, 96, 80, 64, 64, 64, 128); for [4, 8] the same at 256² and at 96 and 307 slices.
    """
    w = max(1, int(width))
    return 4.0 * (16 * -(-w // 16) + 2 * max(0, 8 - w))


def piece_workspace(width: int, device: torch.device | str = "cpu") -> int:
    """Bytes a backbone pass holds outside its counted tensors when its convolutions run in
    pieces of :data:`~.pieces.PIECE_VOXELS` (on CPU; 0 elsewhere): a piece's four buffers (its
    input slices, the library's blocked input and output, its output before the copy),
    ``4 · cpu_conv_workspace(width) · PIECE_VOXELS`` (48 MiB for a first width of 4, 32 MiB
    for 8–16, 64 MiB for 32), plus twice :data:`~.pieces.HEAP_BELOW` (64 MiB) for the freed
    piece buffers the heap keeps while the pass runs.

    Measured as RSS high-water minus the count (BENCHMARKS.md, issue 17.2): +7 to +18 MiB with
    every block of 1 MiB or more mapped (reconstruct's ``--memory lean``) on 24–243-slice inputs
    of U-Nets [2, 4] to [32, 64]; +26 to +60 MiB for [4, 8] and +38 to +88 MiB for [16, 32]
    with the pieces' blocks from the heap, as :func:`~.pieces.pieces_for` runs them
    (``benchmarks/conv_pieces.py``: [4, 8] on 59×256² and 243×128², [16, 32] on 40×256², 1 and
    2 threads, four runs).
    """
    from .pieces import HEAP_BELOW, PIECE_VOXELS

    if torch.device(device).type != "cpu":
        return 0
    return int(4 * cpu_conv_workspace(width) * PIECE_VOXELS + 2 * HEAP_BELOW)


def first_width(backbones: list[torch.nn.Module]) -> int:
    """The output channels of the first 3D convolution of ``backbones`` (16 if there is none)."""
    for bb in backbones:
        inner = bb.backbone if isinstance(bb, TiledBackbone) else bb
        first = next((m for m in inner.modules() if isinstance(m, torch.nn.Conv3d)), None)
        if first is not None:
            return int(first.out_channels)
    return 16

#: Copies of the input slab's image alive at the peak (estimate's constant, see the module doc).
IMAGE_COPIES = 4
#: Copies of the data read at once: a staged model's pieces, any other model's input slab.
DATA_COPIES = {True: 1, False: 2}
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """Bytes from ``512MiB``, ``1GiB``, ``2G`` (SI: 2·10⁹), ``1.5GB`` or a plain number of bytes."""
    if isinstance(text, bool):
        raise ValueError(f"a memory size must be bytes or a string like 1GiB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"a memory size is a number with an optional unit (B, KiB, MiB, GiB, TiB, "
                             f"K, M, G, T), e.g. 512MiB, 1GiB, 2G; got {text!r}")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """``n`` bytes as KiB, MiB or GiB."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages the ops under it allocate, while they live, and
    their peak: storages the inputs already held (views, in-place results) are not counted."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a mode's __torch_dispatch__ in ``torch._dynamo.disable`` unless this says
        # no; its first call then imports dynamo, inductor and sympy: +72 MiB resident for the
        # rest of the process, measured (BENCHMARKS.md, issue 17.2), for a mode that never compiles.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.refs: dict[int, list[int]] = {}

    def _drop(self, key: int) -> None:
        ref = self.refs.get(key)
        if ref is not None:
            ref[0] -= 1
            if ref[0] == 0:
                self.current -= ref[1]
                del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.refs:
                self.refs[key][0] += 1
            elif key in held or size == 0:
                continue
            else:
                self.refs[key] = [1, size]
                self.current += size
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._drop, key)
        return out


@torch.no_grad()
def activation_bytes_per_voxel(backbones: list[torch.nn.Module], channels: int, multiple: int,
                               device: torch.device) -> float:
    """The largest peak of live tensor bytes per input voxel of ``backbones`` (untiled), each
    run once on a zero input ``(1, channels, 2g, s, s)`` (``g`` = the pooling grid, ``s`` ≥ 16
    on the grid): what a backbone pass adds to memory, output included, input excluded. The
    convolution library's workspace is not in it (:func:`piece_workspace`)."""
    g = max(1, int(multiple))
    s = _test_plane(g)
    return max((_peak_bytes(bb, channels, 2 * g, s, device) / (2 * g * s * s) for bb in backbones), default=0.0)


def _test_plane(grid: int) -> int:
    """The side of the small zero inputs the counts run on: ≥ 16 and on the pooling grid."""
    return -(-max(16, 2 * grid) // grid) * grid


def _peak_bytes(backbone: torch.nn.Module, channels: int, depth: int, side: int,
                device: torch.device | str = "cpu") -> int:
    """The peak of live tensor bytes of one pass of ``backbone`` (the tiled network itself for a
    :class:`TiledBackbone`) on a zero input ``(1, C, depth, side, side)`` in its parameters'
    dtype, under whatever mode is active (e.g. :func:`~pipeline.models.rolling.rolling`)."""
    inner = backbone.backbone if isinstance(backbone, TiledBackbone) else backbone
    dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32)
    x = torch.zeros(1, int(getattr(inner, "in_channels", None) or channels), depth, side, side, dtype=dtype,
                    device=device)
    with _LiveBytes() as live:
        y = inner(x)
        del y
    return live.peak


#: What a rolled pass's freed chunk buffers (up to ~32 MiB each, from the heap while the pass
#: runs, :func:`~.pieces.pieces_for`) leave in the heap besides :func:`piece_workspace`'s share,
#: per worker. Measured: U-Net [16, 32] on 256² 8-coil MRI with slab 24, max RSS 703 MiB
#: against 664 estimated without it (1 worker), 1056 against 1007 (2 workers) (BENCHMARKS.md,
#: issue 17.2).
ROLLED_HEAP = 64 << 20


@torch.no_grad()
def rolling_activation_bytes(backbones: list[torch.nn.Module], channels: int, multiple: int,
                             plane: tuple[int, int]) -> tuple[float, float]:
    """``(a, b)``: an untiled pass of ``backbones`` on CPU under
    :func:`~pipeline.models.rolling.rolling` holds about ``a`` bytes per input voxel (its output
    and the residual sum) plus ``b`` bytes per voxel of the input plane (each layer's few
    slices, whatever the depth) besides its input: the largest of ``backbones``.

    Measured by the count of :func:`activation_bytes_per_voxel` on zero inputs of a small plane
    ``s × s`` at the chunk of ``c`` slices the real ``plane`` gets, at the depths ``n``, ``2n``
    (``n`` at least four chunks and 64 slices, so the pass is in its steady state) and ``c``:
    ``a = (p₂ − p₁)/(n·s²)``, ``b`` the largest of ``p₁/s² − a·n`` and ``p_c/s² − a·c`` (the
    peak of a thin input is its few slices' state, not its output). Every tensor of the pass is
    ``slices × plane`` (the pooled ones a quarter), so both scale exactly with the plane. A
    backbone that does not roll (instance or group norm) comes out as ``b ≈ 0`` and ``a`` its
    whole pass's bytes.
    """
    from pipeline.models.rolling import CHUNK_VOXELS, chunk_slices, rolling

    g = max(1, int(multiple))
    s = _test_plane(g)
    c = chunk_slices(CHUNK_VOXELS, int(plane[0]) * int(plane[1]), g)
    n = -(-max(4 * c, 64) // g) * g
    a = b = 0.0
    for bb in backbones:
        with rolling(c * s * s):
            peaks = [_peak_bytes(bb, channels, depth, s) / (s * s) for depth in (n, 2 * n, c)]
        slope = max(0.0, (peaks[1] - peaks[0]) / n)
        a = max(a, slope)
        b = max(b, peaks[0] - slope * n, peaks[2] - slope * c)
    return a, b


@dataclass(frozen=True)
class MemoryModel:
    """What a slab's peak is estimated from (bytes; see the module doc)."""

    shape: tuple[int, int, int]
    data_per_slice: int
    image_per_slice: int
    activation_per_voxel: float
    tile: tuple[int, int, int] | None
    tiles_per_batch: int
    staged: bool
    workers: int
    piece: int = 0  # slices per read of a staged model (0: the output slab)
    workspace: int = 0  # bytes outside the counted tensors, per worker (:func:`piece_workspace`)
    #: a rolled backbone's bytes per voxel of the input plane (:func:`rolling_activation_bytes`)
    activation_per_plane: float = 0.0

    def input_slices(self, slab: int, halo: int, multiple: int) -> int:
        """The most input slices an output slab of ``slab`` reads (halo both sides, the start
        rounded down to the grid), at most the volume."""
        return min(self.shape[0], slab + 2 * halo + max(0, int(multiple) - 1))

    def estimate(self, slab: int, halo: int, multiple: int) -> int:
        """The estimated peak bytes of the process with ``workers`` slabs of ``slab`` output slices
        in flight."""
        d, h, w = self.shape
        slab = min(slab, d)
        n = self.input_slices(slab, halo, multiple)
        read = (min(self.piece, n) if self.piece else slab) if self.staged else n
        if self.tile is not None and any(self.tile):
            td, th, tw = self.tile
            voxels = self.tiles_per_batch * min(n, td or n) * min(h, th or h) * min(w, tw or w)
            rolled = 0.0
        else:
            voxels = n * h * w
            rolled = self.activation_per_plane * h * w
        one = DATA_COPIES[self.staged] * self.data_per_slice * read + IMAGE_COPIES * self.image_per_slice * n \
            + self.activation_per_voxel * voxels + rolled + self.workspace
        return int(PROCESS_BYTES + self.workers * one)

    def to_dict(self) -> dict[str, Any]:
        return {"data_bytes_per_slice": self.data_per_slice, "image_bytes_per_slice": self.image_per_slice,
                "activation_bytes_per_voxel": round(self.activation_per_voxel, 3),
                "activation_bytes_per_plane_voxel": round(self.activation_per_plane, 3),
                "tile": list(self.tile) if self.tile else None, "workers": self.workers, "piece": self.piece,
                "workspace_bytes": self.workspace}


def choose_slab(model: MemoryModel, budget: int, *, chunk: int, halo: int, multiple: int) -> int:
    """The thickest output slab (a multiple of ``chunk``, and of the grid ``multiple`` when
    thicker than one step of both) whose estimate fits ``budget``; at most the volume.

    Raises:
        ValueError: not even one chunk fits; the message names the budget one chunk needs.
    """
    d = model.shape[0]
    need = model.estimate(chunk, halo, multiple)
    if need > budget:
        raise ValueError(f"reconstruct: --memory-budget {format_bytes(budget)} is below what a slab of one "
                         f"output chunk ({chunk} slices, halo {halo}) needs: about {format_bytes(need)} "
                         f"({need} bytes) with {model.workers} worker(s); raise it to at least that, lower "
                         "--workers, or give --slab/--tile")
    top = -(-d // chunk)  # chunks that cover the volume
    lo, hi = 1, top  # the largest k with estimate(k·chunk) ≤ budget (the estimate grows with k)
    while lo < hi:
        k = (lo + hi + 1) // 2
        if model.estimate(k * chunk, halo, multiple) <= budget:
            lo = k
        else:
            hi = k - 1
    slab = lo * chunk
    step = chunk * int(multiple) // math.gcd(chunk, int(multiple))
    if slab < d and slab >= step:
        slab = slab // step * step
    return slab
