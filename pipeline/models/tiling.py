"""Tiled evaluation of a backbone: overlapping 3D tiles, a blending window, checkpointing per tile.

A training step on a large slab cannot hold the network's activations for the whole slab.
:class:`TiledBackbone` runs any backbone ``(B, C, D, H, W) → (B, C', D, H, W)`` on overlapping
tiles, each under non-reentrant activation checkpointing (``torch.utils.checkpoint``,
``use_reentrant=False`` — the variant that survives a network applied twice per step under
ZeRO-2/3), so that in forward only the tile outputs survive and in backward one tile's
activations exist at a time. The slab input itself is what checkpointing keeps (a reference,
never a copy).

Blending. Along each axis, tiles of size ``T`` start on a grid of spacing at most
``T − overlap``, aligned to the backbone's ``size_multiple`` (pooling grids must line up). Where
two tiles overlap, each gives zero weight to the ``margin`` voxels next to its inner face and
ramps (``"cosine"``: ``sin²``, ``"linear"``, or ``"constant"``) across the rest of the overlap;
the 3D window is the product of the axis windows, and the output is
``Σ_t w_t f(x_t) / Σ_t w_t``. Faces on the slab's boundary get no margin (the backbone's own
zero padding is the same there).

Exactness. A tile's output at a voxel equals the whole-slab output when the voxel is at least
the backbone's receptive radius ``r`` from every inner face of the tile. With
``margin ≥ r`` (needs ``overlap ≥ 2r``) every voxel's weighted average takes only exact
values, so the tiled result equals the untiled one to float rounding, and so do all gradients.
With a smaller overlap the result is a smooth blend of slightly different tile values.
:class:`~pipeline.models.UNet3D` has ``r = 9`` (two levels), ``23`` (three), ``51`` (four).

Cost. Each voxel is computed ``Π_axes (tile / spacing)`` times (the recompute factor), plus one
more forward per step for checkpointing. On CPU, prefer few large tiles: oneDNN's batch-1
convolutions are inefficient on small or thin spatial shapes (an 8×136×136 tile ran at half
the speed per voxel of an 8×256×136 one here); ``tiles_per_batch=2`` recovers most of that at
twice the activation memory.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

__all__ = ["TiledBackbone", "tile_starts", "axis_windows", "tile_shape_for"]

_WINDOWS = ("cosine", "linear", "constant")


def _triple(value, what: str, owner: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    try:
        out = tuple(int(v) for v in value)
    except TypeError as err:
        raise TypeError(f"{owner}: {what} must be an int or (D, H, W) ints, got {value!r}") from err
    if len(out) != 3:
        raise ValueError(f"{owner}: {what} must be an int or (D, H, W) ints, got {value!r}")
    return out  # type: ignore[return-value]


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Tile starts along one axis: aligned to ``multiple``, covering ``[0, size)``.

    The first tile starts at 0, the last ends at ``size``, and consecutive starts are at most
    ``tile − overlap`` apart (rounded down to ``multiple``), so consecutive tiles overlap by at
    least ``overlap``. ``size`` and ``tile`` must be multiples of ``multiple``; a tile larger
    than ``size`` is clipped to it.
    """
    tile = min(tile, size)
    if size % multiple or tile % multiple:
        raise ValueError(
            f"tile_starts: size {size} and tile {tile} must be multiples of {multiple}"
        )
    if tile == size:
        return [0]
    step = (tile - overlap) // multiple * multiple
    if step < multiple:
        raise ValueError(
            f"tile_starts: a tile of {tile} with overlap {overlap} leaves no aligned step "
            f"(multiple {multiple}); use a larger tile or a smaller overlap"
        )
    last = size - tile
    count = math.ceil(last / step) + 1
    while True:
        # Spread the starts evenly, aligned to the grid; add a tile if rounding opened a gap.
        starts = sorted({round(i * last / (count - 1) / multiple) * multiple for i in range(count)})
        starts[0], starts[-1] = 0, last
        if all(b - a <= step for a, b in zip(starts, starts[1:])):
            return starts
        count += 1


def tile_shape_for(
    shape: Sequence[int], num_tiles: Sequence[int], overlap: Sequence[int], multiple: int = 1
) -> tuple[int, ...]:
    """The smallest tile (per axis, a multiple of ``multiple``) that covers ``shape`` with at most
    ``num_tiles`` tiles overlapping by at least ``overlap``.

    Example: ``tile_shape_for((64, 192, 192), (2, 2, 2), (4, 4, 4), 2) == (34, 98, 98)``.
    """
    out = []
    for n, k, o in zip(shape, num_tiles, overlap):
        padded = n + (-n) % multiple
        if k <= 1:
            out.append(padded)
            continue
        t = math.ceil((padded + (k - 1) * o) / k)
        t += (-t) % multiple
        while t < padded and len(tile_starts(padded, t, o, multiple)) > k:
            t += multiple
        out.append(min(t, padded))
    return tuple(out)


def _ramp(width: int, kind: str, dtype, device) -> torch.Tensor:
    """Values in (0, 1), increasing; a ramp and its reverse sum to 1."""
    t = torch.arange(1, width + 1, dtype=torch.float64, device=device) / (width + 1)
    if kind == "cosine":
        r = torch.sin(0.5 * math.pi * t) ** 2
    elif kind == "linear":
        r = t
    else:
        r = torch.full_like(t, 0.5)
    return r.to(dtype)


def axis_windows(
    size: int, tile: int, starts: Sequence[int], margin: int, kind: str, *, dtype=torch.float32,
    device=None,
) -> list[torch.Tensor]:
    """Normalised 1D weights of each tile along one axis (they sum to 1 at every position).

    Each tile gets weight 0 on the ``min(margin, overlap // 2)`` voxels next to an inner face
    and a ramp over the rest of the overlap; faces on ``0`` or ``size`` get neither.

    Shape:
        one tensor ``(tile,)`` per start.
    """
    tile = min(tile, size)
    raw = []
    for i, s in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64, device=device)
        if i > 0:
            o = starts[i - 1] + tile - s
            m = min(margin, o // 2)
            w[:m] = 0
            w[m : o - m] *= _ramp(o - 2 * m, kind, torch.float64, device)
        if i < len(starts) - 1:
            o = s + tile - starts[i + 1]
            m = min(margin, o // 2)
            if m:
                w[tile - m :] = 0
            w[tile - o + m : tile - m] *= _ramp(o - 2 * m, kind, torch.float64, device).flip(0)
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64, device=device)
    for s, w in zip(starts, raw):
        total[s : s + tile] += w
    if bool((total <= 0).any()):
        raise AssertionError("axis_windows: a position has no weight (overlap < 2·margin?)")
    return [(w / total[s : s + tile]).to(dtype) for s, w in zip(starts, raw)]


class TiledBackbone(nn.Module):
    """Run a backbone on overlapping 3D tiles with a blending window and checkpointing per tile.

    Shape:
        ``(B, C, D, H, W) → (B, C', D, H, W)``, as the backbone.

    Math:
        ``f̃(x) = Σ_t w_t ⊙ f(x_t)`` with ``Σ_t w_t = 1``; equals ``f(x)`` to rounding when
        ``margin ≥`` the backbone's receptive radius (see the module docstring).

    Args:
        backbone: any module ``(B, C, D, H, W) → (B, C', D, H, W)``; if it has
            ``size_multiple`` (pooling grid) tiles align to it, and its ``receptive_radius``
            sets the default overlap and margin.
        tile_shape: tile size ``(D, H, W)`` (or one int), multiples of ``size_multiple``.
        overlap: minimum overlap of neighbouring tiles per axis; default ``2·r`` (exact).
        margin: voxels at an inner face given zero weight; default ``r`` (or ``overlap // 2``
            if smaller). Exact when ``margin ≥ r``.
        window: ``"cosine"`` (default), ``"linear"`` or ``"constant"`` ramp across the overlap.
        checkpoint: checkpoint each group of tiles (default True); without it all tiles'
            activations are kept, as in the untiled network.
        tiles_per_batch: tiles stacked along the batch axis per backbone call (one checkpoint
            per call); more is faster on CPU for small tiles, costs memory proportionally.
        allow_global_norm: accept a backbone whose normalisation uses statistics over the
            whole input (``receptive_radius`` is ``None``); tiles then differ from the slab.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        tile_shape: int | Sequence[int],
        overlap: int | Sequence[int] | None = None,
        margin: int | Sequence[int] | None = None,
        window: str = "cosine",
        checkpoint: bool = True,
        tiles_per_batch: int = 1,
        allow_global_norm: bool = False,
    ) -> None:
        super().__init__()
        name = "TiledBackbone"
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"{name}: backbone must be an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.tile_shape = _triple(tile_shape, "tile_shape", name)
        f = self.size_multiple
        if any(t < 1 or t % f for t in self.tile_shape):
            raise ValueError(
                f"{name}: tile_shape must be positive multiples of the backbone's size_multiple "
                f"{f}, got {self.tile_shape}"
            )
        if window not in _WINDOWS:
            raise ValueError(f"{name}: window must be one of {_WINDOWS}, got {window!r}")
        has_radius = hasattr(backbone, "receptive_radius")
        radius = getattr(backbone, "receptive_radius", None)
        if has_radius and radius is None and not allow_global_norm:
            raise ValueError(
                f"{name}: the backbone normalises with statistics over its whole input "
                "(instance/group norm, or batch norm in training mode), which differ per tile; "
                "use norm='none' (or batch norm in eval mode), or pass allow_global_norm=True"
            )
        if overlap is None:
            if radius is None:
                raise ValueError(
                    f"{name}: the backbone states no receptive_radius; give overlap= (and margin=)"
                )
            overlap = 2 * radius
        self.overlap = _triple(overlap, "overlap", name)
        if margin is None:
            margin = tuple(min(radius, o // 2) if radius is not None else o // 2 for o in self.overlap)
        self.margin = _triple(margin, "margin", name)
        if any(o < 0 for o in self.overlap) or any(m < 0 for m in self.margin):
            raise ValueError(
                f"{name}: overlap and margin must be >= 0, got {self.overlap}, {self.margin}"
            )
        if not isinstance(tiles_per_batch, int) or tiles_per_batch < 1:
            raise ValueError(f"{name}: tiles_per_batch must be a positive int, got {tiles_per_batch!r}")
        self.window = window
        self.checkpoint = bool(checkpoint)
        self.tiles_per_batch = tiles_per_batch

    # ------------------------------------------------------------------ pass-through
    @property
    def size_multiple(self) -> int:
        return int(getattr(self.backbone, "size_multiple", 1))

    @property
    def receptive_radius(self) -> int | None:
        return getattr(self.backbone, "receptive_radius", None)

    @property
    def in_channels(self) -> int | None:
        return getattr(self.backbone, "in_channels", None)

    @property
    def out_channels(self) -> int | None:
        return getattr(self.backbone, "out_channels", None)

    @property
    def exact(self) -> bool:
        """Whether the tiled output equals the untiled one to rounding (margin ≥ radius)."""
        r = self.receptive_radius
        return r is not None and all(m >= r for m in self.margin) and all(
            o >= 2 * r for o in self.overlap
        )

    def extra_repr(self) -> str:
        return (
            f"tile_shape={self.tile_shape}, overlap={self.overlap}, margin={self.margin}, "
            f"window={self.window}, checkpoint={self.checkpoint}, exact={self.exact}"
        )

    # ------------------------------------------------------------------ tiling
    def plan(
        self, shape: Sequence[int]
    ) -> tuple[tuple[int, int, int], list[list[int]], tuple[int, int, int]]:
        """The padded size, the tile starts per axis, and the tile size for a ``(D, H, W)`` input."""
        f = self.size_multiple
        padded = tuple(n + (-n) % f for n in shape)
        tiles = tuple(min(t, n) for t, n in zip(self.tile_shape, padded))
        starts = [tile_starts(n, t, o, f) for n, t, o in zip(padded, tiles, self.overlap)]
        return padded, starts, tiles  # type: ignore[return-value]

    def recompute_factor(self, shape: Sequence[int]) -> float:
        """Voxels computed over voxels in the slab (``Σ tile volumes / slab volume``)."""
        padded, starts, tiles = self.plan(shape)
        return math.prod(len(s) * t for s, t in zip(starts, tiles)) / math.prod(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"TiledBackbone: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        padded, starts, tiles = self.plan(size)
        if padded != size:
            pads = [p - n for p, n in zip(padded, size)]
            x = nn.functional.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        windows = [
            axis_windows(n, t, s, m, self.window, dtype=x.dtype, device=x.device)
            for n, t, s, m in zip(padded, tiles, starts, self.margin)
        ]
        boxes = [
            (sd, sh, sw, wd, wh, ww)
            for sd, wd in zip(starts[0], windows[0])
            for sh, wh in zip(starts[1], windows[1])
            for sw, ww in zip(starts[2], windows[2])
        ]
        out: torch.Tensor | None = None
        use_ckpt = self.checkpoint and torch.is_grad_enabled()
        td, th, tw = tiles
        for g in range(0, len(boxes), self.tiles_per_batch):
            group = boxes[g : g + self.tiles_per_batch]
            corners = tuple((b[0], b[1], b[2]) for b in group)
            if use_ckpt:
                y = torch_checkpoint(self._run, x, corners, tiles, use_reentrant=False)
            else:
                y = self._run(x, corners, tiles)
            if out is None:
                out = x.new_zeros((x.shape[0], y.shape[1]) + padded)
            for k, (sd, sh, sw, wd, wh, ww) in enumerate(group):
                part = y[k * x.shape[0] : (k + 1) * x.shape[0]]
                part = part * wd.view(-1, 1, 1) * wh.view(-1, 1) * ww
                out[:, :, sd : sd + td, sh : sh + th, sw : sw + tw].add_(part)
        assert out is not None
        if padded != size:
            out = out[:, :, : size[0], : size[1], : size[2]]
        return out

    def _run(self, x: torch.Tensor, corners, tiles) -> torch.Tensor:
        td, th, tw = tiles
        parts = [x[:, :, d : d + td, h : h + th, w : w + tw] for d, h, w in corners]
        batch = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.backbone(batch)
