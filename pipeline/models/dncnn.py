"""A plain 3D convolutional denoiser (DnCNN-style), the small backbone of unrolled networks.

Zhang et al., "Beyond a Gaussian denoiser: residual learning of deep CNN for image denoising",
IEEE TIP 2017; MoDL (Aggarwal, Mani & Jacob, IEEE TMI 2019) unrolls a 5-layer version.

Receptive field: ``depth`` convolutions of size ``k`` give the radius ``depth · (k // 2)``
(5 for the default ``depth = 5, k = 3``); no pooling, so tiles need no alignment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rolling import chunk_slices, roll_dncnn, rolling_chunk
from .unet import _ACTIVATIONS, _activate, _kernel

__all__ = ["DnCNN3D"]


class DnCNN3D(nn.Module):
    """``depth`` 3D convolutions with activations between them, optionally residual.

    Shape:
        ``(B, in_channels, D, H, W) → (B, out_channels, D, H, W)``.

    Math:
        ``f(x) = x + C_L ∘ σ ∘ C_{L−1} ∘ … ∘ σ ∘ C_1 (x)`` (residual); receptive radius
        ``L · (k // 2)``.

    Args:
        in_channels: input channels (2 for a complex image, 1 for a real one).
        out_channels: output channels.
        width: channels of the hidden layers.
        depth: number of convolutions (≥ 2).
        kernel_size: odd convolution size.
        activation: ``"relu"``, ``"leaky_relu"``, ``"silu"`` or ``"gelu"``.
        residual: add the input to the output (needs ``in_channels == out_channels``).
        reorder_axes: on CPU, put the two largest spatial axes first (see :mod:`.unet`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 32,
        depth: int = 5,
        kernel_size: int = 3,
        activation: str = "relu",
        residual: bool = True,
        reorder_axes: bool = True,
    ) -> None:
        super().__init__()
        name = "DnCNN3D"
        if depth < 2:
            raise ValueError(f"{name}: depth must be >= 2, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be odd and positive, got {kernel_size}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if residual and in_channels != out_channels:
            raise ValueError(
                f"{name}: residual=True needs in_channels == out_channels, got {in_channels} "
                f"and {out_channels}"
            )
        chans = [in_channels] + [width] * (depth - 1) + [out_channels]
        self.convs = nn.ModuleList(
            nn.Conv3d(a, b, kernel_size, padding=kernel_size // 2) for a, b in zip(chans, chans[1:])
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.kernel_size = kernel_size
        self.activation = activation
        self.residual = residual
        self.reorder_axes = reorder_axes

    @property
    def size_multiple(self) -> int:
        return 1

    @property
    def receptive_radius(self) -> int:
        return self.depth * (self.kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"DnCNN3D: expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        chunk = rolling_chunk()
        if chunk is not None:  # inference under rolling(): each layer once, a few slices held
            h = roll_dncnn(self, x, chunk_slices(chunk, x.shape[3] * x.shape[4], 1))
            return h + x if self.residual else h
        perm = (0, 1, 2)
        h = x
        if self.reorder_axes and x.device.type == "cpu":
            sizes = x.shape[2:]
            perm = tuple(sorted(range(3), key=lambda a: -sizes[a]))
            h = h.permute(0, 1, 2 + perm[0], 2 + perm[1], 2 + perm[2])
        for i, conv in enumerate(self.convs):
            h = F.conv3d(h, _kernel(conv.weight, perm), conv.bias, padding=conv.padding)
            if i < len(self.convs) - 1:
                h = _activate(h, self.activation)
        if perm != (0, 1, 2):
            inverse = [perm.index(a) for a in range(3)]
            h = h.permute(0, 1, 2 + inverse[0], 2 + inverse[1], 2 + inverse[2])
        return h + x if self.residual else h
