"""The model boundary: volumes ``(B, D, H, W)`` (real or complex) ↔ channels ``(B, C, D, H, W)``.

Networks work on real tensors with a channel axis; MRI images are complex. A complex volume
becomes two real channels (real part, imaginary part) and back; a real volume becomes one
channel. This is the only place that conversion happens (DESIGN.md, *MRI*).
"""

from __future__ import annotations

import torch

__all__ = ["to_channels", "from_channels", "num_channels"]


def num_channels(x: torch.Tensor) -> int:
    """Channels a volume takes at the network boundary: 2 if complex, else 1."""
    return 2 if x.is_complex() else 1


def to_channels(x: torch.Tensor) -> torch.Tensor:
    """A real ``(B, C, D, H, W)`` tensor from a volume ``(B, D, H, W)``.

    Shape:
        ``(B, D, H, W)`` complex → ``(B, 2, D, H, W)`` real (real, imaginary);
        ``(B, D, H, W)`` real → ``(B, 1, D, H, W)``.

    Math:
        ``z ↦ (Re z, Im z)``; gradients flow (``view_as_real`` is differentiable).
    """
    if x.ndim != 4:
        raise ValueError(f"to_channels: expected a volume (B, D, H, W), got shape {tuple(x.shape)}")
    if x.is_complex():
        return torch.view_as_real(x).permute(0, 4, 1, 2, 3)
    return x.unsqueeze(1)


def from_channels(z: torch.Tensor, *, complex: bool) -> torch.Tensor:
    """The volume ``(B, D, H, W)`` from network channels ``(B, C, D, H, W)``.

    Shape:
        ``(B, 2, D, H, W)`` → ``(B, D, H, W)`` complex if ``complex``;
        ``(B, 1, D, H, W)`` → ``(B, D, H, W)`` real otherwise.

    Math:
        ``(a, b) ↦ a + i b``.
    """
    want = 2 if complex else 1
    if z.ndim != 5 or z.shape[1] != want:
        kind = "complex" if complex else "real"
        raise ValueError(
            f"from_channels: a {kind} volume needs (B, {want}, D, H, W) network output, got "
            f"shape {tuple(z.shape)}"
        )
    if complex:
        return torch.complex(z[:, 0], z[:, 1])
    return z[:, 0]
