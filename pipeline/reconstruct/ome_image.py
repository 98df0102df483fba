"""Level 0 of an OME-Zarr image, read by D-ranges: what ``recon3d evaluate`` and ``report`` read.

:func:`open_ome_image` opens OME-Zarr 0.5 (the ``ome`` attribute of a zarr v3 group) or 0.4
(top-level ``multiscales``) read-only and checks that level 0
(``multiscales[0].datasets[0].path``) is a ``(z, y, x)`` volume; :class:`OmeImage` reads
D-ranges of it (NaN/Inf, the mark of an unfinished reconstruction, is an error) and single
planes. Writing OME-Zarr is :mod:`pipeline.reconstruct.ome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pipeline.paths import is_url, local_path

__all__ = ["OmeImage", "open_ome_image", "open_zarr", "require_exists"]


@dataclass
class OmeImage:
    """Level 0 of an OME-Zarr image, read by D-ranges.

    Attributes:
        path: the store.
        array: the level-0 zarr array.
        shape: its spatial ``(D, H, W)`` (leading singleton axes, e.g. ``t`` or ``c``, dropped).
        scale: the level-0 voxel size ``(dz, dy, dx)`` (1 where the metadata has none).
        units: the spatial axes' units (``None`` where absent).
        attrs: the group's ``recon3d`` attributes (``{}`` when absent).
        levels: the paths of every level, finest first.
    """

    path: str
    array: Any
    shape: tuple[int, int, int]
    scale: tuple[float, float, float]
    units: tuple[str | None, str | None, str | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    levels: tuple[str, ...] = ()

    @property
    def chunk_depth(self) -> int:
        return int(self.array.chunks[self.array.ndim - 3])

    def _lead(self) -> tuple[int, ...]:
        return (0,) * (self.array.ndim - 3)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Slices ``lo:hi`` along D as a ``(hi − lo, H, W)`` numpy array (NaN/Inf is an error)."""
        values = np.asarray(self.array[self._lead() + (slice(lo, hi),)])
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise ValueError(
                f"OME-Zarr '{self.path}': level 0 holds NaN/Inf in D {lo}:{hi}; an unfinished "
                "reconstruction leaves unwritten chunks as NaN — rerun `recon3d reconstruct`"
            )
        return values

    def plane(self, axis: int, index: int) -> np.ndarray:
        """The 2D slice at ``index`` along spatial ``axis`` (0: z, 1: y, 2: x); reads nothing else."""
        sel: list[Any] = [slice(None)] * 3
        sel[axis] = int(index)
        return np.asarray(self.array[self._lead() + tuple(sel)])


def require_exists(path: Any, what: str) -> None:
    if not is_url(path) and not local_path(path).exists():
        raise FileNotFoundError(f"{what} '{path}' not found")


def open_zarr(path: Any, what: str):
    import zarr

    from pipeline.data.store import open_store

    require_exists(path, what)
    store = open_store(path, read_only=True)
    try:
        return zarr.open(store=store, mode="r")
    except Exception as err:  # zarr raises several kinds for a folder that is not a store
        raise ValueError(f"{what} '{path}': not a readable zarr store ({type(err).__name__}: {err})") from None


def open_ome_image(path: Any) -> OmeImage:
    """Open an OME-Zarr image's level 0 (``multiscales[0].datasets[0]``) read-only.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: not an OME-Zarr image, or level 0 is not a (z, y, x) volume.
    """
    import zarr

    where = f"OME-Zarr '{path}'"
    group = open_zarr(path, "OME-Zarr store")
    if not isinstance(group, zarr.Group):
        raise ValueError(f"{where}: is a zarr array, not an OME-Zarr image group")
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)  # 0.5 nests under "ome"; 0.4 is top level
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if not multiscales:
        raise ValueError(f"{where}: no 'ome.multiscales' attribute; not an OME-Zarr image "
                         "(write one with `recon3d reconstruct`)")
    ms = multiscales[0]
    datasets = ms.get("datasets") or []
    if not datasets:
        raise ValueError(f"{where}: multiscales[0] lists no datasets")
    level0 = str(datasets[0]["path"])
    try:
        array = group[level0]
    except KeyError:
        raise ValueError(f"{where}: level-0 array '{level0}' is missing") from None
    if not isinstance(array, zarr.Array):
        raise ValueError(f"{where}: level 0 '{level0}' is not an array")
    if array.ndim < 3 or any(int(s) != 1 for s in array.shape[:-3]):
        raise ValueError(f"{where}: level 0 has shape {tuple(array.shape)}; expected a (z, y, x) "
                         "volume (leading axes, if any, of size 1)")
    axes = ms.get("axes") or []
    spatial = axes[-3:] if len(axes) >= 3 else [{} for _ in range(3)]
    for ax in spatial:
        if isinstance(ax, Mapping) and ax.get("type") not in (None, "space"):
            raise ValueError(f"{where}: the last three axes must be spatial (z, y, x), got {axes}")
    units = tuple(ax.get("unit") if isinstance(ax, Mapping) else None for ax in spatial)
    scale = [1.0] * array.ndim
    for transforms in (datasets[0].get("coordinateTransformations") or [],
                       ms.get("coordinateTransformations") or []):
        for t in transforms:
            if t.get("type") == "scale" and len(t.get("scale", [])) == array.ndim:
                scale = [s * float(v) for s, v in zip(scale, t["scale"])]
    recon = attrs.get("recon3d")
    return OmeImage(
        path=str(path),
        array=array,
        shape=tuple(int(s) for s in array.shape[-3:]),
        scale=tuple(scale[-3:]),
        units=units,  # type: ignore[arg-type]
        attrs=dict(recon) if isinstance(recon, Mapping) else {},
        levels=tuple(str(d["path"]) for d in datasets),
    )
