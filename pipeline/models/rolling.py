"""Rolling evaluation of a backbone along D, for inference: each layer computed once, a few slices
held at a time.

``recon3d reconstruct --model`` runs the backbone on each output slab extended by a halo of the
receptive radius on each side. A pass over a whole slab holds every layer's full feature map at
once (272 B per input voxel for the recipes' U-Net [16, 32]), so a memory budget of 1 GiB left
room for 26 input slices at 256²: slab 8 and a halo of 9 each side, 3.4× the output slices
computed (BENCHMARKS.md, issue 17.2).

Here the input instead flows through the network in chunks of a few slices along D. Every layer
is a small state machine (:class:`_Conv`, :class:`_Pool`, …) that takes the next slices of its
input and gives the next slices of its output it can compute: a convolution of size ``k`` keeps
the last ``k − 1`` input slices it has seen, pooling keeps an odd slice, a U-Net level keeps
its skip tensor's slices until the coarser levels' upsampled output reaches them. The zero
padding of the whole input is added once, at its two ends. So every output slice is computed
once, from the same inputs as the whole pass: the output equals the whole pass's up to the
library's summation order (float32, a few ulp), and what a pass holds besides its input and
output is a few slices of each layer, whatever the slab's depth. The slab can then be as thick
as its input and output images allow, and the halo overhead falls to ``1 + 2·halo/slab``.

Supported: :class:`~pipeline.models.unet.UNet3D` and :class:`~pipeline.models.dncnn.DnCNN3D`
with local norms (``norm="none"``, or ``"batch"`` in eval mode; instance and group norm use the
whole input's statistics), under ``torch.no_grad``. Anything else runs whole.

Used by ``recon3d reconstruct`` on CPU through :func:`rolling`; the chunk is
:data:`CHUNK_VOXELS` voxels of the input plane, rounded up to the pooling grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["rolling", "rolling_for", "rolling_chunk", "chunk_slices", "roll_unet", "roll_dncnn", "dense_conv3d",
           "CHUNK_VOXELS"]

#: Input voxels per chunk (2¹⁷: 2 slices of 256², 8 of 128²), rounded up to whole slices and
#: the pooling grid. A U-Net [16, 32] pass on 90×256² (1 thread) took 4.9 s in chunks of 2¹⁷
#: voxels, 5.3 s in 2¹⁸, 6.7 s in 2¹⁹ and 6.3 s whole (BENCHMARKS.md, issue 17.2).
CHUNK_VOXELS = 1 << 17

_ACTIVE: ContextVar[int | None] = ContextVar("recon3d_rolling_chunk", default=None)


@contextmanager
def rolling(chunk_voxels: int = CHUNK_VOXELS) -> Iterator[None]:
    """Backbones called under this (and ``torch.no_grad``) evaluate along D in chunks of about
    ``chunk_voxels`` input voxels (see the module doc)."""
    if int(chunk_voxels) < 1:
        raise ValueError(f"rolling: chunk_voxels must be positive, got {chunk_voxels}")
    token = _ACTIVE.set(int(chunk_voxels))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def rolling_for(device: torch.device | str) -> Iterator[bool]:
    """:func:`rolling` on CPU, where ``recon3d reconstruct``'s memory budget bounds the process;
    nothing elsewhere (yields whether it rolls)."""
    if torch.device(device).type != "cpu":
        yield False
        return
    with rolling():
        yield True


def rolling_chunk() -> int | None:
    """The active chunk size in voxels (``None`` outside :func:`rolling` or with gradients on)."""
    value = _ACTIVE.get()
    return None if value is None or torch.is_grad_enabled() else value


def chunk_slices(chunk_voxels: int, plane: int, multiple: int) -> int:
    """Input slices per chunk: ``⌈chunk_voxels / plane⌉`` rounded up to ``multiple``."""
    c = max(1, -(-int(chunk_voxels) // max(1, int(plane))))
    m = max(1, int(multiple))
    return -(-c // m) * m


def dense_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                 stride=(1, 1, 1), dilation=(1, 1, 1), groups: int = 1) -> torch.Tensor:
    """``torch.conv3d`` for inference, on CPU in float32 through oneDNN directly: torch sends
    an input with ``N·C·D·H ≤ 20480`` (a chunk or piece of a few slices) to its unfolded
    convolution, 2–10× slower here. float32 only: oneDNN's bfloat16 path needs AVX-512."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(padding),
                                                 list(stride), list(dilation), int(groups))
    return torch.conv3d(x, weight, bias, stride, padding, dilation, groups)


def _cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
    """The given slices in order along D (``None`` stands for no slices)."""
    kept = [p for p in parts if p is not None]
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim=2)


def _keep(x: torch.Tensor, n: int) -> torch.Tensor | None:
    """The last ``n`` slices of ``x`` as a tensor of their own (a view would keep all of ``x``)."""
    return x[:, :, x.shape[2] - n:].clone() if n > 0 else None


class _Stage:
    """One step of the rolling pass. ``push`` takes the next input slices and yields, one piece
    at a time, the next output slices it can compute; ``finish``, called once after the last
    input, yields what the end's zero padding completes. Pieces are yielded lazily, so a piece
    flows through the whole network before the next one is made: no stage ever holds more than
    a chunk of output at once, also when the coarse levels' last slices arrive together."""

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def finish(self) -> Iterator[torch.Tensor]:
        return iter(())


class _Conv(_Stage):
    """A convolution of odd size ``k`` along D with zero padding ``k//2`` at its input's two ends,
    then ``after`` (the bias is in the convolution), in windows of at most ``chunk`` output
    slices. Keeps the last ``k − 1`` input slices."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding, chunk: int,
                 after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        padding = tuple(int(p) for p in padding)
        self.weight, self.bias = weight, bias
        self.k = int(weight.shape[2])
        self.pad = padding[0]
        if self.k != 2 * self.pad + 1:
            raise ValueError(f"rolling: a convolution of size {self.k} along D needs 'same' padding, got {padding}")
        self.hw = (0, padding[1], padding[2])
        self.chunk = max(1, int(chunk))
        self.after = after
        self.held: torch.Tensor | None = None
        self.started = False

    def _zeros(self, like: torch.Tensor) -> torch.Tensor | None:
        return like.new_zeros(like.shape[:2] + (self.pad,) + like.shape[3:]) if self.pad else None

    def _run(self, buf: torch.Tensor) -> Iterator[torch.Tensor]:
        n = buf.shape[2] - self.k + 1
        self.held = _keep(buf, self.k - 1) if n > 0 else buf
        for a in range(0, max(0, n), self.chunk):
            b = min(n, a + self.chunk)
            out = dense_conv3d(buf[:, :, a:b + self.k - 1], self.weight, self.bias, self.hw)
            if b == n:
                del buf  # not alive while the pieces downstream run
            yield self.after(out) if self.after is not None else out
            del out

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        if not self.started:  # the zero padding at the input's start
            self.held, self.started = self._zeros(x), True
        return self._run(_cat(self.held, x))

    def finish(self) -> Iterator[torch.Tensor]:
        held, self.held = self.held, None
        if held is None or not self.pad:
            return
        yield from self._run(_cat(held, self._zeros(held)))
        self.held = None


class _Pointwise(_Stage):
    """A stage without memory along D (a 1×1×1 convolution, a transposed convolution whose kernel
    equals its stride)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        out = self.fn(x)
        del x
        yield out


class _Pool(_Stage):
    """2× max pooling: keeps an odd slice for the next push."""

    def __init__(self) -> None:
        self.held: torch.Tensor | None = None

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        buf = _cat(self.held, x)
        del x
        n = buf.shape[2] // 2 * 2
        self.held = _keep(buf, buf.shape[2] - n)
        if n:
            out = F.max_pool3d(buf[:, :, :n], 2)
            del buf
            yield out

    def finish(self) -> Iterator[torch.Tensor]:
        if self.held is not None:
            raise RuntimeError("rolling: pooling was left an odd slice (the input is not on the pooling grid)")
        return iter(())


class _Chain(_Stage):
    """Stages one after the other, each piece fed through all of them before the next."""

    def __init__(self, stages: list[_Stage]) -> None:
        self.stages = stages

    def _feed(self, i: int, x: torch.Tensor) -> Iterator[torch.Tensor]:
        if i == len(self.stages):
            yield x
            return
        pieces = self.stages[i].push(x)
        del x  # each piece's input is freed once its output exists
        for y in pieces:
            rest = self._feed(i + 1, y)
            del y
            yield from rest

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        return self._feed(0, x)

    def finish(self) -> Iterator[torch.Tensor]:
        for i, stage in enumerate(self.stages):  # each stage's last slices through the rest first
            for y in stage.finish():
                rest = self._feed(i + 1, y)
                del y
                yield from rest


class _Level(_Stage):
    """A U-Net level that is not the coarsest: its encoder, then the coarser levels on its
    (pooled) output, their upsampled output joined with the skip slices it kept, its decoder."""

    def __init__(self, encoder: _Chain, below: _Stage, up: _Pointwise, decoder: _Chain) -> None:
        self.encoder, self.below, self.up, self.decoder = encoder, below, up, decoder
        self.skip: list[torch.Tensor] = []  # encoder slices the upsampled branch has not reached

    def _take_skip(self, n: int) -> torch.Tensor:
        """The first ``n`` skip slices kept (removed from the queue)."""
        parts = []
        while n > 0:
            if not self.skip:
                raise RuntimeError("rolling: the upsampled branch ran ahead of the skip connection")
            head = self.skip[0]
            m = min(n, head.shape[2])
            parts.append(head[:, :, :m])
            if m == head.shape[2]:
                self.skip.pop(0)
            else:
                self.skip[0] = head[:, :, m:]
            n -= m
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _decode(self, coarse: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for b in coarse:
            ups = self.up.push(b)
            del b
            for u in ups:
                joined = torch.cat([u, self._take_skip(u.shape[2])], dim=1)  # the decoder's order
                del u
                rest = self.decoder.push(joined)
                del joined
                yield from rest

    def _encoded(self, e: torch.Tensor) -> Iterator[torch.Tensor]:
        self.skip.append(e)
        coarse = self.below.push(e)
        del e
        return self._decode(coarse)

    def push(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        pieces = self.encoder.push(x)
        del x
        for e in pieces:
            rest = self._encoded(e)
            del e
            yield from rest

    def finish(self) -> Iterator[torch.Tensor]:
        for e in self.encoder.finish():
            rest = self._encoded(e)
            del e
            yield from rest
        yield from self._decode(self.below.finish())
        if self.skip:
            raise RuntimeError("rolling: skip slices were left without their upsampled branch")
        yield from self.decoder.finish()


def _run(stage: _Stage, x: torch.Tensor, chunk: int, extra: int) -> torch.Tensor:
    """``stage`` over ``x`` (and ``extra`` zero slices after it) in chunks of ``chunk`` slices:
    the output's first ``x.shape[2]`` slices, written into one preallocated tensor."""
    d = x.shape[2]
    out: torch.Tensor | None = None
    at = 0

    def take(parts: Iterator[torch.Tensor]) -> None:
        nonlocal out, at
        for part in parts:
            if out is None:
                out = part.new_empty(part.shape[:2] + (d,) + part.shape[3:])
            n = min(part.shape[2], d - at)
            if n > 0:
                out[:, :, at:at + n] = part[:, :, :n]
            at += part.shape[2]
            del part

    for a in range(0, d, chunk):
        take(stage.push(x[:, :, a:a + chunk]))
    if extra:
        take(stage.push(x.new_zeros(x.shape[:2] + (extra,) + x.shape[3:])))
    take(stage.finish())
    if out is None or at != d + extra:
        raise RuntimeError(f"rolling: the pass gave {at} slices for {d + extra}")
    return out


def _unit_stage(unit, chunk: int) -> _Conv:
    return _Conv(unit.conv.weight, unit.conv.bias, unit.conv.padding, chunk, unit.finish)


def _unet_level(net, i: int, chunk: int) -> _Stage:
    enc = net.encoders[i]
    stages: list[_Stage] = [_Pool()] if enc.pool else []
    stages += [_unit_stage(u, chunk) for u in enc.units]
    encoder = _Chain(stages)
    if i == net.num_levels - 1:
        return encoder
    dec = net.decoders[i]
    up = _Pointwise(lambda h, m=dec.up: F.conv_transpose3d(h, m.weight, m.bias, stride=2))
    decoder = _Chain([_unit_stage(u, chunk) for u in dec.units])
    return _Level(encoder, _unet_level(net, i + 1, chunk), up, decoder)


def roll_unet(net, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """:class:`~pipeline.models.unet.UNet3D`'s ``_network`` (everything but the residual) on
    ``x`` rolled along D in chunks of ``chunk`` slices (a multiple of its pooling grid)."""
    f = net.size_multiple
    if chunk % f:
        raise ValueError(f"rolling: the chunk ({chunk} slices) must be a multiple of the pooling grid {f}")
    d, h, w = x.shape[2:]
    ph, pw = (-h) % f, (-w) % f
    head = net.head
    stages: list[_Stage] = [_Pointwise(lambda t: F.pad(t, (0, pw, 0, ph)))] if ph or pw else []  # per chunk
    stages += [_unet_level(net, 0, chunk), _Pointwise(lambda t: dense_conv3d(t, head.weight, head.bias, (0, 0, 0)))]
    out = _run(_Chain(stages), x, chunk, (-d) % f)
    return out[:, :, :, :h, :w] if ph or pw else out


def roll_dncnn(net, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """:class:`~pipeline.models.dncnn.DnCNN3D` without its residual, rolled along D."""
    from .unet import _activate

    last = len(net.convs) - 1
    stages: list[_Stage] = [
        _Conv(c.weight, c.bias, c.padding, chunk, None if i == last else (lambda t: _activate(t, net.activation)))
        for i, c in enumerate(net.convs)]
    return _run(_Chain(stages), x, chunk, 0)
