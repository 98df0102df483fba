"""The slab layout of ``recon3d reconstruct``: output slabs and the input slabs they are read from.

An output slab is computed from an input slab extended by a halo along D (clipped at the
volume's ends, its start rounded down to the network's pooling grid); with a halo of at least
the model's receptive radius (:func:`pipeline.models.receptive.model_halo`) the slab equals the
whole volume's result.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ReconstructConfig


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
