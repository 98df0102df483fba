"""The halo of a slab: a model's receptive radius along D, its retiling, and the slab layout.

An output slab is computed from an input slab extended by a halo along D (clipped at the
volume's ends, its start rounded down to the network's pooling grid); with a halo of at least
the model's receptive radius (:func:`model_halo`) the slab equals the whole volume's result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ReconstructConfig

__all__ = ["model_halo", "retile"]


def _reconstructor(model: torch.nn.Module):
    """The ``ArtifactRemoval`` or ``UnrolledNetwork`` inside ``model`` (``None`` if it holds neither)."""
    from pipeline.models import ArtifactRemoval, UnrolledNetwork

    return next((m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork))), None)


def _backbones(rec) -> list[torch.nn.Module]:
    """The backbone a reconstructor applies at each of its steps (one for an artifact removal)."""
    from pipeline.models import UnrolledNetwork

    if isinstance(rec, UnrolledNetwork):
        return [rec.backbones[0 if rec.shared else k] for k in range(rec.num_iters)]
    return [rec.backbone]


def model_halo(model: torch.nn.Module) -> tuple[int | None, int, list[str]]:
    """``(radius, multiple, notes)``: the receptive radius of ``model`` along D, the pooling
    grid its input slabs must start on, and why slab-wise results may still differ.

    The rule: the backbone's radius ``r`` (``UNet3D``: ``unet_receptive_radius``; ``DnCNN3D``:
    ``depth·(k//2)``; a ``TiledBackbone``: its backbone's); an ``UnrolledNetwork`` couples D once
    per iteration through its backbone (its data-consistency step with a hybrid-space MRI or a
    parallel-beam CT operator acts on each D-slice alone), so ``Σ_k r_k``. ``radius`` is
    ``None`` when a backbone normalises with statistics over its whole input (instance or group
    norm): no halo makes slabs exact. Not D-local either, whatever the halo (``notes`` say so):
    a SENSE initial estimate or CG data consistency (conjugate gradient's step sizes are sums
    over the whole slab; equal only as CG converges), and a tiled backbone whose overlap is
    below twice its radius (tiles blend slightly different values).
    """
    from pipeline.models import TiledBackbone, UnrolledNetwork

    rec = _reconstructor(model)
    if rec is None:
        raise ValueError(f"reconstruct: {type(model).__name__} holds no ArtifactRemoval or UnrolledNetwork")
    notes: list[str] = []
    total: int | None = 0
    multiple = 1
    for bb in _backbones(rec):
        r = getattr(bb, "receptive_radius", None)
        multiple = max(multiple, int(getattr(bb, "size_multiple", 1)))
        if isinstance(bb, TiledBackbone) and not bb.exact:
            notes.append(f"tiles overlap {bb.overlap} < 2 x radius {r}: tiled values blend")
        if r is None:
            total = None
        elif total is not None:
            total += int(r)
    if rec.initial in ("sense", "classical"):
        notes.append("SENSE initial estimate: CG over each slab (equal to the whole volume's as CG converges)")
    if isinstance(rec, UnrolledNetwork) and rec.data_consistency == "cg":
        notes.append("CG data consistency: CG over each slab (equal to the whole volume's as CG converges)")
    return total, multiple, notes


def retile(model: torch.nn.Module, tile: tuple[int, int, int] | None, overlap: int | None) -> torch.nn.Module:
    """Replace the tiling of ``model``'s backbones (in place): tiles of ``tile`` with
    ``overlap`` (default exact, ``2·radius``); ``tile=(0, 0, 0)`` runs them untiled."""
    from pipeline.models import TiledBackbone, UnrolledNetwork

    if tile is None:
        return model
    rec = _reconstructor(model)

    def swap(bb: torch.nn.Module) -> torch.nn.Module:
        inner = bb.backbone if isinstance(bb, TiledBackbone) else bb
        if not any(tile):
            return inner
        return TiledBackbone(inner, tile_shape=tuple(tile), overlap=overlap, checkpoint=False)

    if isinstance(rec, UnrolledNetwork):
        for k, bb in enumerate(rec.backbones):
            rec.backbones[k] = swap(bb)
    else:
        rec.backbone = swap(rec.backbone)
    return model


@dataclass(frozen=True)
class _Layout:
    """How the volume is cut: output slabs of ``slab`` slices, each read with ``halo`` slices on
    each side from a start on the ``multiple`` grid, written in ``chunks``."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    slab: int
    halo: int
    multiple: int

    def slabs(self) -> list[tuple[int, int]]:
        d = self.shape[0]
        return [(a, min(a + self.slab, d)) for a in range(0, d, self.slab)]

    def input_range(self, a: int, b: int) -> tuple[int, int]:
        """The input slab of output slab ``[a, b)``: the halo on each side, clipped to the
        volume, its start rounded down to the pooling grid (the whole volume's starts at 0)."""
        lo = max(0, a - self.halo) // self.multiple * self.multiple
        return lo, min(self.shape[0], b + self.halo)


def _layout(config: ReconstructConfig, shape: tuple[int, int, int], recon) -> _Layout:
    """The layout of ``config`` for a volume of ``shape`` and the reconstructor's radius and grid."""
    d, h, w = shape
    chunks = tuple(config.chunks) if config.chunks else (16, 256, 256)
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))
    halo = int(config.halo) if config.halo is not None else int(recon.radius)
    if config.slab is not None:
        slab = int(config.slab)
        if slab % chunks[0] and slab < d:
            raise ValueError(
                f"reconstruct: --slab {slab} must be a multiple of the output chunk depth {chunks[0]} "
                "(every output chunk must lie in one slab: one writer per chunk)"
            )
    else:
        want = max(chunks[0], 2 * halo)
        slab = -(-want // chunks[0]) * chunks[0]
    return _Layout(shape, chunks, min(slab, max(d, chunks[0])), halo, int(recon.multiple))  # type: ignore[arg-type]
