"""The length units of a scan that OME-Zarr knows: the specification's names and common spellings.

An OME-Zarr 0.5 axis of type ``space`` takes a unit from the specification's list (UDUNITS-2
names, :data:`SPACE_UNITS`); :func:`ngff_unit` maps what a scan records (``mm``, ``µm``,
``millimetre``...) to that name. ``recon3d simulate``/``ingest`` refuse a unit it does not know
(it would be dropped from every output); :mod:`pipeline.reconstruct.ome` writes and checks it.
"""

from __future__ import annotations

__all__ = ["SPACE_UNITS", "TIME_UNITS", "ngff_unit"]

#: Space units the specification allows (UDUNITS-2 names).
SPACE_UNITS = (
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile",
    "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter", "yard",
    "yoctometer", "yottameter", "zeptometer", "zettameter",
)
#: Time units the specification allows (for the validator; recon3d writes no time axis).
TIME_UNITS = (
    "attosecond", "centisecond", "day", "decisecond", "exasecond", "femtosecond", "gigasecond",
    "hectosecond", "hour", "kilosecond", "megasecond", "microsecond", "millisecond", "minute",
    "nanosecond", "petasecond", "picosecond", "second", "terasecond", "yoctosecond",
    "yottasecond", "zeptosecond", "zettasecond",
)
_UNIT_ALIASES = {
    "m": "meter", "metre": "meter", "dm": "decimeter", "cm": "centimeter", "mm": "millimeter",
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "nm": "nanometer", "pm": "picometer", "a": "angstrom", "å": "angstrom", "km": "kilometer",
    "in": "inch", "ft": "foot",
}


def ngff_unit(units: str | None) -> str | None:
    """The NGFF name of a length unit (``mm`` → ``millimeter``), or ``None`` if it has none."""
    if not units:
        return None
    text = str(units).strip()
    low = text.lower()
    for name in SPACE_UNITS:
        if low in (name, name.replace("meter", "metre")):
            return name
    return _UNIT_ALIASES.get(text, _UNIT_ALIASES.get(low))
