"""A model's receptive field along D: how many slices of a slab's halo make its result exact.

A reconstructor (``ArtifactRemoval``, ``UnrolledNetwork``) couples neighbouring D-slices only
through its backbones, so a slab extended by a halo of at least :func:`model_halo`'s radius
(its start on the backbones' pooling grid) equals the whole volume's result.
:func:`reconstructor_of` finds the reconstructor inside a wrapped model; :func:`retile` replaces
its backbones' tiling. The slab layout that uses the radius is ``recon3d reconstruct``'s
(:mod:`pipeline.reconstruct.halo`); the model card records it (:mod:`pipeline.modelcard`).
"""

from __future__ import annotations

import torch

from .reconstructors import ArtifactRemoval, UnrolledNetwork
from .tiling import TiledBackbone

__all__ = ["model_halo", "reconstructor_of", "retile"]


def reconstructor_of(model: torch.nn.Module):
    """The ``ArtifactRemoval`` or ``UnrolledNetwork`` inside ``model`` (``None`` if it holds neither)."""
    return next((m for m in model.modules() if isinstance(m, (ArtifactRemoval, UnrolledNetwork))), None)


def _backbones(rec) -> list[torch.nn.Module]:
    """The backbone a reconstructor applies at each of its steps (one for an artifact removal)."""
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
    rec = reconstructor_of(model)
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
    if tile is None:
        return model
    rec = reconstructor_of(model)

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
