"""A 3D U-Net backbone whose memory and receptive field are known.

The network is the usual encoder–decoder with skip connections (Ronneberger, Fischer & Brox,
MICCAI 2015; 3D: Çiçek et al., MICCAI 2016), written so that a training step on large slabs
keeps as little as possible:

* ReLU-type activations run in place, and so does their backward: the incoming gradient, which
  always comes fresh from this network's own convolution or pooling, is masked where it lies
  instead of into a new tensor (same kernel, same values);
* the first decoder convolution is applied to the upsampled and the skip tensors separately
  and summed in place — the same arithmetic as a convolution of their concatenation, without
  ever holding the concatenated tensor; the skip half is computed first, so that in backward
  the upsampled branch finishes (and frees its full-size gradient) before the skip branch;
* ``checkpoint="level"`` recomputes each encoder and decoder level in backward
  (``torch.utils.checkpoint``, non-reentrant), so only level inputs and outputs are kept; the
  full-size upsampled tensor of a decoder level is not kept through the backward of the
  level's later convolutions but made again by its transposed convolution (a few percent of
  a pass: the recomputation stops as soon as that tensor exists);
* ``checkpoint="network"`` keeps only the network's input, nested around level checkpointing:
  backward recomputes the pass once (keeping only level inputs) and each level once more, so
  the encoders run three times and the decoders twice. A step that runs the network several
  times (EI, SURE, unrolled networks) then holds one input per pending pass instead of every
  pass's level outputs;
* for inference under :func:`~pipeline.models.rolling.rolling` (``recon3d reconstruct`` on
  CPU), the pass rolls along D in chunks of a few slices, each layer keeping only the slices it
  still needs (:mod:`.rolling`): the same output to float rounding, a few slices per layer
  instead of every layer's whole feature map;
* on CPU the spatial axes are reordered so that the two largest come first: PyTorch sends a
  ``conv3d`` with batch 1 to a slow im2col kernel unless ``C·D·H > 20480`` (a heuristic meant
  for 2D), which thin slabs and small tiles fail; the reordering is exact (the kernels are
  reordered with the data) and only changes float rounding.

Receptive field. With ``L = len(widths)`` levels, ``n`` convolutions of size ``k`` per level
and ``c = n·(k//2)``, an output voxel depends on the input voxels within the radius
``r = c·(2^L − 1) + (1 + c)·(2^(L−1) − 1)`` along each axis (9 for two levels, 23 for three,
51 for four, with ``k = 3, n = 2``), provided every norm is local (``norm="none"``, or
``"batch"`` in eval mode). Pooling makes the output depend on the grid's alignment too: the
network pads its input at the end of each axis to a multiple of ``size_multiple = 2^(L−1)``,
and a tile of it computes the same values only if it starts on that grid. The tiled wrapper
(:class:`~pipeline.models.TiledBackbone`) uses both facts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from .rolling import chunk_slices, roll_unet, rolling_chunk

__all__ = ["UNet3D", "unet_receptive_radius"]

_NORMS = ("none", "batch", "instance", "group")
_ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu")
_CHECKPOINTS = ("none", "level", "network")


def unet_receptive_radius(num_levels: int, *, convs_per_level: int = 2, kernel_size: int = 3) -> int:
    """The receptive radius of :class:`UNet3D` (voxels each side, per axis).

    Math:
        ``r = c·(2^L − 1) + (1 + c)·(2^(L−1) − 1)``, ``c = convs_per_level · (kernel_size // 2)``:
        each convolution at level ``i`` adds ``(k//2)·2^i``, each transposed convolution into
        level ``i`` adds ``2^i``, pooling adds nothing beyond the grid alignment.
    """
    c = convs_per_level * (kernel_size // 2)
    return c * (2**num_levels - 1) + (1 + c) * (2 ** (num_levels - 1) - 1)


def _kernel(weight: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
    """The kernel of a convolution applied to spatially permuted data."""
    if perm == (0, 1, 2):
        return weight
    return weight.permute(0, 1, 2 + perm[0], 2 + perm[1], 2 + perm[2])


def _make_norm(kind: str, channels: int, groups: int) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class _RectifyInPlace(torch.autograd.Function):
    """ReLU or leaky ReLU in place, whose backward masks the incoming gradient in place.

    PyTorch's own backward (``threshold_backward``) allocates its result, so a full-size
    feature map more is alive at every activation's backward. Here the incoming gradient always
    comes fresh from this network's own convolution or pooling backward (the activation output
    feeds nothing else), so it is overwritten with the same kernel's ``grad_input=`` form:
    identical values. Under double backward (``create_graph``) the out-of-place form is used.
    A backward hook registered on a unit inside the network sees that gradient before masking
    and must not keep it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, slope: float) -> torch.Tensor:  # type: ignore[override]
        if slope == 0.0:
            h.relu_()
        else:
            F.leaky_relu_(h, slope)
        ctx.mark_dirty(h)
        ctx.save_for_backward(h)
        ctx.slope = slope
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        slope = ctx.slope
        if torch.is_grad_enabled():  # double backward: stay differentiable
            return torch.where(out > 0, grad, grad * slope), None
        if slope == 0.0:
            torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
        else:
            torch.ops.aten.leaky_relu_backward.grad_input(grad, out, slope, True, grad_input=grad)
        return grad, None


def _activate(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in ("relu", "leaky_relu"):
        slope = 0.0 if kind == "relu" else 0.01
        if torch.is_grad_enabled() and x.requires_grad:
            return _RectifyInPlace.apply(x, slope)
        return F.relu_(x) if slope == 0.0 else F.leaky_relu_(x, slope)
    if kind == "silu":
        return F.silu(x)
    return F.gelu(x)


class _ConvUnit(nn.Module):
    """conv → norm → activation; ``split`` > 0 takes two inputs whose channels are concatenated."""

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int, norm: str,
        norm_groups: int, activation: str, bias: bool, split: int = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self.norm = _make_norm(norm, out_channels, norm_groups)
        self.activation = activation
        self.split = split

    def skip_part(self, skip: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
        """The skip tensor's half of a split convolution (no bias)."""
        weight = _kernel(self.conv.weight, perm)[:, self.split :]
        return F.conv3d(skip, weight, None, padding=self.conv.padding)

    def main_part(self, x: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
        """The convolution of ``x`` (the first input's half of a split convolution), with bias."""
        weight = _kernel(self.conv.weight, perm)
        if self.split:
            weight = weight[:, : self.split]
        return F.conv3d(x, weight, self.conv.bias, padding=self.conv.padding)

    def finish(self, h: torch.Tensor, skip_part: torch.Tensor | None = None) -> torch.Tensor:
        """``act(norm(h + skip_part))`` from the convolution's output ``h``."""
        if skip_part is not None:
            # conv(cat(x, skip)) = conv(x, W₁) + conv(skip, W₂), without the concatenated
            # tensor; in place, since a convolution keeps its input, not its output.
            h = h.add_(skip_part)
        if self.norm is not None:
            h = self.norm(h)
        return _activate(h, self.activation)

    def forward(self, x: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
        return self.finish(self.main_part(x, perm))


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, width: int, *, pool: bool, num_convs: int, **unit) -> None:
        super().__init__()
        self.pool = pool
        chans = [in_channels] + [width] * num_convs
        self.units = nn.ModuleList(_ConvUnit(a, b, **unit) for a, b in zip(chans, chans[1:]))

    def forward(self, x: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
        if self.pool:
            x = F.max_pool3d(x, 2)
        for unit in self.units:
            x = unit(x, perm)
        return x


class _Decoder(nn.Module):
    def __init__(self, below: int, width: int, *, num_convs: int, bias: bool, **unit) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(below, width, 2, stride=2, bias=bias)
        units = [_ConvUnit(2 * width, width, split=width, bias=bias, **unit)]
        units += [_ConvUnit(width, width, bias=bias, **unit) for _ in range(num_convs - 1)]
        self.units = nn.ModuleList(units)

    def _up_branch(self, x: torch.Tensor, perm: tuple[int, int, int]) -> torch.Tensor:
        """The first convolution's upsampled half: ``conv(convT(x), W₁) + b``."""
        up = F.conv_transpose3d(x, _kernel(self.up.weight, perm), self.up.bias, stride=2)
        return self.units[0].main_part(up, perm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, perm: tuple[int, int, int],
                recompute_up: bool = False) -> torch.Tensor:
        # The skip half first: autograd runs later nodes first, so in backward the upsampled
        # branch finishes, freeing its full-size gradient, before the skip branch's is made.
        part = self.units[0].skip_part(skip, perm)
        if recompute_up and torch.is_grad_enabled():
            # Keep the coarse input rather than the full-size upsampled tensor, which would be
            # alive through the backward of the next units (costs one transposed convolution:
            # the recomputation stops once the upsampled tensor exists).
            h = torch_checkpoint(self._up_branch, x, perm, use_reentrant=False)
        else:
            h = self._up_branch(x, perm)
        h = self.units[0].finish(h, part)
        del part  # as a local it would stay alive (full size) through the next units
        for unit in self.units[1:]:
            h = unit(h, perm)
        return h


class UNet3D(nn.Module):
    """A 3D U-Net on real multi-channel volumes.

    Levels have widths ``widths[0], widths[1], …`` (depth = ``len(widths)``), each with
    ``convs_per_level`` convolutions (size ``kernel_size``, zero padding), 2× max pooling down
    and 2× transposed convolution up, skip connections by (implicit) concatenation, and a 1×1×1
    output convolution; ``residual=True`` adds the input to the output. Complex images enter as
    two real channels (:func:`~pipeline.models.to_channels`, done by the reconstructors).

    Shape:
        ``(B, in_channels, D, H, W) → (B, out_channels, D, H, W)``, any ``D, H, W`` (padded
        internally at the end of each axis to a multiple of ``size_multiple``).

    Math:
        ``f(x) = x + U(x)`` (residual) or ``U(x)``; receptive radius
        ``r = c·(2^L − 1) + (1 + c)·(2^(L−1) − 1)``, ``c = convs_per_level·(kernel_size//2)``.

    Args:
        in_channels: input channels (2 for a complex image, 1 for a real one).
        out_channels: output channels.
        widths: channels per level, from the finest; its length is the depth (≥ 1).
        convs_per_level: convolutions per level and per side.
        kernel_size: odd convolution size.
        norm: ``"none"`` (default; local, so tiling is exact), ``"batch"`` (local only in eval
            mode), ``"instance"`` or ``"group"`` (statistics over the whole input: tiles differ).
        norm_groups: groups of ``"group"`` norm (its gcd with the width is used).
        activation: ``"relu"``, ``"leaky_relu"``, ``"silu"`` or ``"gelu"``.
        residual: add the input to the output (needs ``in_channels == out_channels``).
        checkpoint: ``"none"``, ``"level"`` (recompute each level in backward) or
            ``"network"`` (keep only the input; recompute the pass, then each level).
            Values and gradients are bitwise those of ``"none"``.
        bias: convolution biases.
        reorder_axes: on CPU, put the two largest spatial axes first (see module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        widths: Sequence[int] = (16, 32),
        convs_per_level: int = 2,
        kernel_size: int = 3,
        norm: str = "none",
        norm_groups: int = 8,
        activation: str = "relu",
        residual: bool = True,
        checkpoint: str = "none",
        bias: bool = True,
        reorder_axes: bool = True,
    ) -> None:
        super().__init__()
        name = "UNet3D"
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(
                f"{name}: widths must be a non-empty sequence of positive ints, got {widths}"
            )
        for what, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("convs_per_level", convs_per_level)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd and positive, got {kernel_size}")
        if norm not in _NORMS:
            raise ValueError(f"{name}: norm must be one of {_NORMS}, got {norm!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if checkpoint is False or checkpoint is None:
            checkpoint = "none"
        if checkpoint not in _CHECKPOINTS:
            raise ValueError(f"{name}: checkpoint must be one of {_CHECKPOINTS}, got {checkpoint!r}")
        if residual and in_channels != out_channels:
            raise ValueError(
                f"{name}: residual=True needs in_channels == out_channels, got {in_channels} "
                f"and {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.widths = widths
        self.convs_per_level = convs_per_level
        self.kernel_size = kernel_size
        self.norm = norm
        self.residual = residual
        self.checkpoint = checkpoint
        self.reorder_axes = reorder_axes
        unit = dict(kernel_size=kernel_size, norm=norm, norm_groups=norm_groups,
                    activation=activation)
        chans = [in_channels] + list(widths)
        self.encoders = nn.ModuleList(
            _Encoder(chans[i], widths[i], pool=i > 0, num_convs=convs_per_level, bias=bias, **unit)
            for i in range(len(widths))
        )
        self.decoders = nn.ModuleList(
            _Decoder(widths[i + 1], widths[i], num_convs=convs_per_level, bias=bias, **unit)
            for i in range(len(widths) - 1)
        )
        self.head = nn.Conv3d(widths[0], out_channels, 1, bias=bias)

    # ------------------------------------------------------------------ structure
    @property
    def num_levels(self) -> int:
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        """Tiles must start on, and have sizes that are multiples of, this grid."""
        return 2 ** (self.num_levels - 1)

    @property
    def receptive_radius(self) -> int | None:
        """Voxels each side an output depends on; ``None`` if a norm uses global statistics."""
        if self.norm in ("instance", "group") or (self.norm == "batch" and self.training):
            return None
        return unet_receptive_radius(
            self.num_levels, convs_per_level=self.convs_per_level, kernel_size=self.kernel_size
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, widths={list(self.widths)}, "
            f"norm={self.norm}, residual={self.residual}, checkpoint={self.checkpoint}"
        )

    # ------------------------------------------------------------------ forward
    def _layout(self, x: torch.Tensor) -> tuple[int, int, int]:
        if not self.reorder_axes or x.device.type != "cpu":
            return (0, 1, 2)
        sizes = x.shape[2:]
        return tuple(sorted(range(3), key=lambda a: -sizes[a]))  # stable: ties keep order

    def _call(self, block: nn.Module, *args) -> torch.Tensor:
        if self.checkpoint != "none" and torch.is_grad_enabled():
            return torch_checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # The head joins the last block, so level checkpointing keeps no finest-level output.
    def _decode_head(self, h: torch.Tensor, skip: torch.Tensor, perm,
                     recompute_up: bool = False) -> torch.Tensor:
        return self.head(self.decoders[0](h, skip, perm, recompute_up))

    def _encode_head(self, h: torch.Tensor, perm) -> torch.Tensor:
        return self.head(self.encoders[0](h, perm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet3D: expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(
                f"UNet3D: expected a real floating tensor (complex images enter as 2 channels), "
                f"got {x.dtype}"
            )
        chunk = rolling_chunk()
        if chunk is not None and self.receptive_radius is not None:
            # Inference under rolling(): each layer once, a few slices held (.rolling).
            slices = chunk_slices(chunk, x.shape[3] * x.shape[4], self.size_multiple)
            out = roll_unet(self, x, slices)
        elif self.checkpoint == "network" and torch.is_grad_enabled():
            # Keeps only x; the nested level checkpoints keep the recomputed pass small.
            out = torch_checkpoint(self._network, x, use_reentrant=False)
        else:
            out = self._network(x)
        return out + x if self.residual else out

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        f = self.size_multiple
        pads = [(-n) % f for n in size]
        h = x
        if any(pads):
            h = F.pad(h, (0, pads[2], 0, pads[1], 0, pads[0]))
        perm = self._layout(h)
        if perm != (0, 1, 2):
            h = h.permute(0, 1, 2 + perm[0], 2 + perm[1], 2 + perm[2])
        skips = []
        last = self.num_levels - 1
        for i, enc in enumerate(self.encoders):
            if i == last and last == 0:
                h = self._call(self._encode_head, h, perm)
            else:
                h = self._call(enc, h, perm)
            if i < last:
                skips.append(h)
        for i in reversed(range(last)):
            block = self._decode_head if i == 0 else self.decoders[i]
            h = self._call(block, h, skips.pop(), perm, self.checkpoint != "none")
        out = h
        if perm != (0, 1, 2):
            inverse = [perm.index(a) for a in range(3)]
            out = out.permute(0, 1, 2 + inverse[0], 2 + inverse[1], 2 + inverse[2])
        if any(pads):
            out = out[:, :, : size[0], : size[1], : size[2]]
        return out
