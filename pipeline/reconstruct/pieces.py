"""3D convolutions run in pieces along their outermost spatial axis, for inference on CPU.

A CPU convolution (oneDNN) holds, besides its input and output, a blocked copy of the
full-resolution feature map with its channels padded to 16: for the first layers of a U-Net of
widths [4, 8] that is 96 B per input voxel, more than the 68 B of all the tensors the backbone
keeps alive (BENCHMARKS.md, issue 17.2). That workspace scales with the convolution's output,
so a slab's memory per input slice was mostly workspace, and a thinner slab (more halo
recomputed) was the only way to fit a memory budget.

:class:`ConvolutionPieces` intercepts ``conv3d`` (and ``conv_transpose3d`` whose kernel equals
its stride along that axis) and computes the output in pieces of about
:data:`PIECE_VOXELS` output voxels along its outermost spatial axis (dim 2, whatever the
network's axis order): each piece reads its own input slices plus the kernel's reach, with the
zero padding of the whole input at the two ends, and is copied into the preallocated output.
Every output voxel is computed once from the same inputs, so the result equals the whole
convolution's up to the library's summation order (float32: within a few ulp), and the
workspace is that of one piece, a constant instead of a cost per voxel.

Used by ``recon3d reconstruct --model`` under ``torch.no_grad`` on CPU (:func:`pieces_for`);
a convolution that needs gradients, uses a string padding, a stride along dim 2, or is too
small for two pieces runs whole.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.models.rolling import dense_conv3d

__all__ = ["ConvolutionPieces", "PIECE_VOXELS", "HEAP_BELOW", "pieces_for"]

#: Output voxels per piece. A piece's workspace is about ``cpu_conv_workspace(width)`` bytes per
#: voxel of it (12 MiB for width 4). With the library's own convolution on every piece, a [4, 8]
#: U-Net pass on 59×256² took 0.4 s in pieces of 2¹⁷ voxels against 1.2–1.8 s whole, 2 threads
#: (BENCHMARKS.md, issue 17.2; ``benchmarks/conv_pieces.py``).
PIECE_VOXELS = 1 << 17

_CONV = {torch.conv3d, F.conv3d}
_CONV_T = {torch.conv_transpose3d, F.conv_transpose3d}


def _triple(value: Any) -> tuple[int, int, int]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == 3 else (int(value[0]),) * 3  # type: ignore[return-value]
    return (int(value),) * 3


def _new_output(piece: torch.Tensor, depth: int) -> torch.Tensor:
    """An uninitialised output like ``piece`` with ``depth`` slices along dim 2, in its layout."""
    shape = (piece.shape[0], piece.shape[1], depth, piece.shape[3], piece.shape[4])
    channels_last = piece.is_contiguous(memory_format=torch.channels_last_3d) and not piece.is_contiguous()
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=piece.dtype, device=piece.device, memory_format=fmt)


class ConvolutionPieces(TorchFunctionMode):
    """Runs 3D convolutions in pieces of about ``voxels`` output voxels along dim 2 (see the
    module doc). ``calls`` counts the convolutions that were split, ``pieces`` their pieces."""

    def __init__(self, voxels: int = PIECE_VOXELS, transposed: bool = True) -> None:
        super().__init__()
        if int(voxels) < 1:
            raise ValueError(f"ConvolutionPieces: voxels per piece must be positive, got {voxels}")
        self.voxels = int(voxels)
        self.transposed = bool(transposed)
        self.calls = self.pieces = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV:
            out = self._conv(*args, **kwargs)
        elif func in _CONV_T and self.transposed:
            out = self._conv_transpose(*args, **kwargs)
        else:
            out = None
        return func(*args, **kwargs) if out is None else out

    def _step(self, depth: int, plane: int) -> int:
        """Output slices per piece for an output of ``depth`` slices of ``plane`` voxels each
        (0: run whole)."""
        step = max(1, self.voxels // max(1, plane))
        return step if depth > step else 0

    @staticmethod
    def _eligible(x: Any, weight: Any, bias: Any) -> bool:
        tensors = [t for t in (x, weight, bias) if isinstance(t, torch.Tensor)]
        return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.ndim == 5
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))

    @staticmethod
    def _run(x, weight, bias, stride, padding, dilation, groups):
        # torch sends small inputs (N·C·D·H ≤ 20480, i.e. most pieces) to its slow unfolded
        # convolution, which made small pieces 2-10× slower here: oneDNN, as for the whole
        # convolution, instead (dense_conv3d, shared with the rolled pass).
        return dense_conv3d(x, weight, bias, padding, stride, dilation, groups)

    def _conv(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if not self._eligible(x, weight, bias) or isinstance(padding, str):
            return None
        st, pad, dil = _triple(stride), _triple(padding), _triple(dilation)
        depth, k = x.shape[2], weight.shape[2]
        out_depth = depth + 2 * pad[0] - dil[0] * (k - 1)
        if st[0] != 1 or out_depth < 1:
            return None
        plane_h = (x.shape[3] + 2 * pad[1] - dil[1] * (weight.shape[3] - 1) - 1) // st[1] + 1
        plane_w = (x.shape[4] + 2 * pad[2] - dil[2] * (weight.shape[4] - 1) - 1) // st[2] + 1
        step = self._step(out_depth, plane_h * plane_w)
        if not step:
            return None
        out = None
        for a in range(0, out_depth, step):
            b = min(out_depth, a + step)
            lo, hi = a - pad[0], b - 1 - pad[0] + dil[0] * (k - 1) + 1  # input slices, may overhang
            part = x[:, :, max(lo, 0):min(hi, depth)]
            if lo < 0 or hi > depth:  # the whole input's zero padding, at its two ends only
                part = F.pad(part, (0, 0, 0, 0, max(0, -lo), max(0, hi - depth)))
            piece = self._run(part, weight, bias, st, (0, pad[1], pad[2]), dil, groups)
            del part
            if out is None:
                out = _new_output(piece, out_depth)
            out[:, :, a:b] = piece
            del piece
            self.pieces += 1
        self.calls += 1
        return out

    def _conv_transpose(self, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                        dilation=1):
        if not self._eligible(x, weight, bias) or isinstance(padding, str):
            return None
        st, pad, opad, dil = _triple(stride), _triple(padding), _triple(output_padding), _triple(dilation)
        k = weight.shape[2]
        # Only where input slice i makes exactly output slices [i·s, (i+1)·s): no overlap.
        if k != st[0] or pad[0] or opad[0] or dil[0] != 1:
            return None
        depth = x.shape[2]
        plane_h = (x.shape[3] - 1) * st[1] - 2 * pad[1] + dil[1] * (weight.shape[3] - 1) + opad[1] + 1
        plane_w = (x.shape[4] - 1) * st[2] - 2 * pad[2] + dil[2] * (weight.shape[4] - 1) + opad[2] + 1
        step = self._step(depth, plane_h * plane_w * k)  # input slices per piece
        if not step:
            return None
        out = None
        for a in range(0, depth, step):
            b = min(depth, a + step)
            piece = torch.conv_transpose3d(x[:, :, a:b], weight, bias, st, pad, opad, groups, dil)
            if out is None:
                out = _new_output(piece, depth * k)
            out[:, :, a * k:b * k] = piece
            del piece
            self.pieces += 1
        self.calls += 1
        return out


#: Blocks below this come from the heap while a backbone runs in pieces, in a lean job (see
#: :func:`pieces_for`).
HEAP_BELOW = 32 << 20


@contextmanager
def pieces_for(device: torch.device | str) -> Iterator[ConvolutionPieces | None]:
    """:class:`ConvolutionPieces` on CPU (where the convolution workspace scales with the
    output), nothing elsewhere.

    In a lean job (``recon3d reconstruct --memory lean``, :mod:`pipeline.allocator`) every
    block of 1 MiB or more is a fresh mapping, and a piece's buffers (1–32 MiB, allocated
    per piece and layer) would each pay their page faults: the pass in pieces took 1.8 s
    against 0.65 s with glibc's heap (U-Net [4, 8], 59×256², 1 thread). So blocks below
    :data:`HEAP_BELOW` come from the heap while the backbone runs and the heap is trimmed
    after; slab-sized feature maps above it are still mapped and returned at once.
    """
    if torch.device(device).type != "cpu":
        yield None
        return
    from pipeline.allocator import heap_for_small_work

    with heap_for_small_work(HEAP_BELOW), ConvolutionPieces() as mode:
        yield mode
