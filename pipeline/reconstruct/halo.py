"""The slab layout of ``recon3d reconstruct``: output slabs and the input slabs they are read from.

An output slab is computed from an input slab extended by a halo along D (clipped at the
volume's ends, its start rounded down to the network's pooling grid); with a halo of at least
the model's receptive radius (:func:`pipeline.models.receptive.model_halo`) the slab equals the
whole volume's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .config import ReconstructConfig
from .memory import MemoryModel, choose_slab, format_bytes


@dataclass(frozen=True)
class _Layout:
    """How the volume is cut: output slabs of ``slab`` slices, each read with ``halo`` slices on
    each side from a start on the ``multiple`` grid, written in ``chunks``."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    slab: int
    halo: int
    multiple: int
    #: How the slab was chosen and its estimated peak (``None`` for classical methods); recorded
    #: in the output's ``memory`` attribute, not in its fingerprint.
    memory: dict[str, Any] | None = field(default=None, compare=False)
    model: MemoryModel | None = field(default=None, compare=False, repr=False)

    def with_slab(self, slab: int, slab_from: str, budget: int | None) -> "_Layout":
        """This layout with output slabs of ``slab`` (its memory record made again)."""
        return _with_memory(replace(self, slab=slab), slab_from, budget)

    def slabs(self) -> list[tuple[int, int]]:
        return _slabs(self.shape[0], self.slab)

    def input_range(self, a: int, b: int) -> tuple[int, int]:
        """The input slab of output slab ``[a, b)``: the halo on each side, clipped to the
        volume, its start rounded down to the pooling grid (the whole volume's starts at 0)."""
        return _input(a, b, self.halo, self.multiple, self.shape[0])


def _layout(config: ReconstructConfig, shape: tuple[int, int, int], recon) -> _Layout:
    """The layout of ``config`` for a volume of ``shape`` and the reconstructor's radius and grid.

    The slab: ``--slab`` if given; for a model the thickest that fits ``--memory-budget``
    (:func:`~.memory.choose_slab`); for a classical method the smallest chunk multiple ≥ 2·halo
    (one chunk; TV's halo of 2 too: its slabs stay one chunk)."""
    d, h, w = shape
    chunks = tuple(config.chunks) if config.chunks else (16, 256, 256)
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape))
    halo = int(config.halo) if config.halo is not None else int(recon.radius)
    model = recon.memory_model(shape, config) if hasattr(recon, "memory_model") else None
    chosen_by = "--slab"
    if config.slab is not None:
        slab = int(config.slab)
        if slab % chunks[0] and slab < d:
            raise ValueError(
                f"reconstruct: --slab {slab} must be a multiple of the output chunk depth {chunks[0]} "
                "(every output chunk must lie in one slab: one writer per chunk)"
            )
    elif model is not None:
        slab = choose_slab(model, int(config.memory_budget), chunk=chunks[0], halo=halo,
                           multiple=int(recon.multiple))
        chosen_by = "--memory-budget"
    else:
        want = max(chunks[0], 2 * halo)
        slab = -(-want // chunks[0]) * chunks[0]
    slab = min(slab, max(d, chunks[0]))
    layout = _Layout(shape, chunks, slab, halo, int(recon.multiple), None, model)  # type: ignore[arg-type]
    return _with_memory(layout, chosen_by, None if config.slab is not None else int(config.memory_budget))


def _with_memory(layout: _Layout, slab_from: str, budget: int | None) -> _Layout:
    """``layout`` with its memory record (``None`` without a memory model: classical methods)."""
    model = layout.model
    if model is None:
        return layout
    d = layout.shape[0]
    computed = sum(hi - lo for lo, hi in (layout.input_range(a, b) for a, b in layout.slabs()))
    memory = {"slab_from": slab_from, "budget": budget, "slab": layout.slab, "halo": layout.halo,
              "input_slices": model.input_slices(min(layout.slab, d), layout.halo, layout.multiple),
              "overhead": round(computed / d, 4),
              "estimated_peak": model.estimate(layout.slab, layout.halo, layout.multiple), **model.to_dict()}
    return replace(layout, memory=memory)


def _slabs(d: int, slab: int) -> list[tuple[int, int]]:
    return [(a, min(a + slab, d)) for a in range(0, d, slab)]


def _input(a: int, b: int, halo: int, multiple: int, d: int) -> tuple[int, int]:
    return max(0, a - halo) // multiple * multiple, min(d, b + halo)


def describe_memory(memory: dict[str, Any]) -> str:
    """One line of the slab choice for the log."""
    budget = f", budget {format_bytes(memory['budget'])}" if memory.get("budget") else ""
    return (f"slab {memory['slab']} (from {memory['slab_from']}{budget}), "
            f"halo {memory['halo']}: {memory['overhead']:.2f}x the output slices computed, estimated peak "
            f"{format_bytes(memory['estimated_peak'])} ({memory['workers']} worker(s))")
