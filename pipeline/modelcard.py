"""The model card of an exported model: what applying it needs to know of its training run.

``recon3d export`` writes the card into the weights file (the key ``model_card``, plain values:
the file is read weights-only), and ``recon3d reconstruct`` reads it instead of the run's
``config.resolved.yaml``. An export made before cards existed has none (:func:`read_card` gives
``None``); its reader falls back to what it used before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .errors import InputError

__all__ = ["ModelCard", "read_card", "CARD_VERSION", "OPERATORS", "INTENSITY_SCALES"]

CARD_VERSION = 1
#: The training scans' forward operator: multi-coil Cartesian MRI, parallel- or cone-beam CT.
OPERATORS = ("mri", "parallel", "cone")
#: How a network scales its input: by the RMS of its initial estimate over the scan's slabs.
INTENSITY_SCALES = ("initial-rms",)


@dataclass(frozen=True)
class ModelCard:
    """What an exported model needs of its training run when it is applied.

    Attributes:
        modality: ``mri`` or ``ct``.
        operator: the training scans' forward operator (one of :data:`OPERATORS`); ``None`` when
            the export could not tell (image-mode CT whose scans were not readable).
        slab_thickness: the training slabs' thickness along D (``data.slab_thickness``; ``None``:
            each scan's chunk depth). The scan's intensity scale is measured on slabs of it.
        intensity_scale: how the network scales its input: ``initial-rms`` (the RMS of its
            initial estimate over the scan's slabs, :func:`pipeline.train.build.scan_scale`), or
            ``None`` when it does not normalise.
        receptive_radius: the model's receptive radius along D
            (:func:`pipeline.models.receptive.model_halo`); ``None`` when it normalises over its
            whole input (no halo makes slabs exact).
        version: the card's format, :data:`CARD_VERSION`.
    """

    modality: str
    operator: str | None
    slab_thickness: int | None
    intensity_scale: str | None
    receptive_radius: int | None
    version: int = CARD_VERSION

    def __post_init__(self) -> None:
        if self.modality not in ("mri", "ct"):
            raise ValueError(f"model card: modality must be mri or ct, got {self.modality!r}")
        if self.operator is not None and self.operator not in OPERATORS:
            raise ValueError(f"model card: operator must be one of {OPERATORS} or None, got {self.operator!r}")
        if self.intensity_scale is not None and self.intensity_scale not in INTENSITY_SCALES:
            raise ValueError(f"model card: intensity_scale must be one of {INTENSITY_SCALES} or None, "
                             f"got {self.intensity_scale!r}")
        for name in ("slab_thickness", "receptive_radius"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"model card: {name} must be an integer >= 0 or None, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The card as plain values (what the export file holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """The card of :meth:`to_dict`'s values.

        Raises:
            ValueError: a card of a newer format, or one with missing or unknown fields.
        """
        version = data.get("version")
        if not isinstance(version, int) or version > CARD_VERSION:
            raise ValueError(f"model card: format {version!r}, this recon3d reads up to {CARD_VERSION}; "
                             "upgrade recon3d")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"model card: fields {sorted(data)}, expected {sorted(names)}")
        return cls(**data)


def read_card(payload: Mapping[str, Any], path: object) -> ModelCard | None:
    """The model card of an export's payload; ``None`` for an export made before cards.

    Raises:
        InputError: a card that is not one (names ``path``).
    """
    card = payload.get("model_card")
    if card is None:
        return None
    if not isinstance(card, Mapping):
        raise InputError(f"{path}: its model card is a {type(card).__name__}, not a mapping; export the run again")
    try:
        return ModelCard.from_dict(card)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {exc}") from None
