"""The loss terms a training config can name: each term's settings and how it is built.

:data:`LOSS_TERMS` maps a term's ``name`` (the ``Literal`` of its settings class) to a
:class:`LossTerm`: the settings class, the builder and whether the term splits the data (and so
wraps the model). The experiment config's ``loss.terms`` union (:data:`TermConfig`) and
:func:`pipeline.train.build.build_loss` both read it: a new term is one settings class, one
builder and one entry in :data:`LOSS_TERMS`.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, NamedTuple, Union

from pydantic import Field, model_validator

from pipeline.config_base import ConfigError, FrozenModel

from .consistency import MeasurementConsistencyLoss, SupervisedLoss
from .equivariant import EquivariantImagingLoss
from .noise2inverse import Noise2InverseLoss
from .splitting import SplittingLoss
from .ssdu import SSDULoss
from .sure import SureGaussianLoss, SurePoissonLoss

__all__ = ["LossTerm", "LOSS_TERMS", "SPLITTING_TERMS", "TermConfig", "MCTerm", "EITerm", "SureTerm",
           "SplittingTerm", "SSDUTerm", "N2ITerm", "SupervisedTerm"]


# Loss terms: a list of {name: ..., weight: ..., options}.
class _Term(FrozenModel):
    weight: float = Field(1.0, ge=0)


class MCTerm(_Term):
    """Measurement consistency ``‖A x̂ − y‖²`` (through the scans' detector when it is non-linear)."""

    name: Literal["mc"]


class EITerm(_Term):
    """Equivariant imaging; ``noise: true`` adds fresh noise of the scan's model (robust EI); the
    re-measurement goes through the scans' detector when it is non-linear."""

    name: Literal["ei"]
    transform: Literal["rotate90", "rotate", "reflect", "shift", "cube_rotations"] = "rotate90"
    noise: bool = False
    #: ``[lo, hi]``: also scale the transformed image by a factor drawn log-uniformly in it (the
    #: amplitude group, which moves rays across a clipping detector's level; see
    #: EquivariantImagingLoss).
    amplitude: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _amplitude_range(self) -> "EITerm":
        if self.amplitude is not None and not 0 < self.amplitude[0] <= self.amplitude[1]:
            raise ValueError(f"amplitude must be [lo, hi] with 0 < lo <= hi, got {list(self.amplitude)}")
        return self


class SureTerm(_Term):
    """SURE (Gaussian, and CT transmission noise after −log) / PURE, PG-URE (Poisson,
    Poisson–Gaussian) with the scan's noise model. ``metric: image`` (parallel-beam CT,
    Gaussian-type noise) estimates the image-domain error instead of the measurement error."""

    name: Literal["sure"]
    tau: float | None = Field(None, gt=0)
    metric: Literal["measurement", "image"] = "measurement"


class SplittingTerm(_Term):
    name: Literal["splitting"]
    rho: float = Field(0.4, gt=0, lt=1)


class SSDUTerm(_Term):
    name: Literal["ssdu"]
    rho: float = Field(0.4, gt=0, lt=1)
    metric: Literal["l1l2", "mse"] = "l1l2"
    weighted: bool = False


class N2ITerm(_Term):
    name: Literal["n2i"]
    num_splits: int = Field(4, ge=2)
    target: Literal["reconstruction", "measurement"] = "reconstruction"


class SupervisedTerm(_Term):
    """MSE (or L1) against the scan's ``reference`` array — simulated scans only. Not a
    self-supervised loss: it measures the gap a self-supervised recipe leaves to a network
    trained with ground truth, through the same command."""

    name: Literal["supervised"]
    metric: Literal["mse", "l1"] = "mse"


# ----------------------------------------------------------------------------- builders
# build(term, facts, seed, where): ``facts`` is the training scans' ScanFacts
# (pipeline.train.build), ``where`` names the term in messages (``loss.terms[1] (ei)``).
_TRANSFORMS = {"rotate90": "Rotate90", "rotate": "Rotate", "reflect": "Reflect", "shift": "Shift",
               "cube_rotations": "CubeRotation"}


def _linear_only(facts: Any, where: str) -> None:
    """Refuse a term that assumes ``y = A x + n`` on scans measured through a non-linear detector."""
    detector = getattr(facts, "detector", None)
    if detector is not None:
        raise ConfigError(
            f"{where}: assumes linear measurements, and the scans were measured through a non-linear "
            f"detector ({detector.get('model')}); use the mc and ei terms, which measure through it, or set "
            "loss.detector: ignore to train with the linear model")


def _mc(t: MCTerm, facts: Any, seed: int, where: str) -> Any:
    return MeasurementConsistencyLoss(detector=getattr(facts, "detector", None))


def _ei(t: EITerm, facts: Any, seed: int, where: str) -> Any:
    import operators3d

    noise = None
    if t.noise:
        if facts.noise_model is None:
            raise ConfigError(f"{where}: noise: true (robust EI) needs scans with a noise model in their metadata")
        noise = facts.noise_model
    return EquivariantImagingLoss(transform=getattr(operators3d, _TRANSFORMS[t.transform]),
                                  noise_model=noise, amplitude=t.amplitude, detector=getattr(facts, "detector", None),
                                  seed=seed)


def _sure(t: SureTerm, facts: Any, seed: int, where: str) -> Any:
    import operators3d

    detector = getattr(facts, "detector", None)
    if detector is None or detector.get("model") != "clip":
        _linear_only(facts, where)
    elif t.metric != "measurement":
        raise ConfigError(f"{where}: the scans' detector clips; SURE through it compares the rays it passed "
                          "in the measurement metric: set metric: measurement (or loss.detector: ignore)")
    nm = facts.noise_model
    if nm is None:
        raise ConfigError(f"{where}: SURE needs scans with a noise model in their metadata")
    if isinstance(nm, (operators3d.GaussianNoise, operators3d.TransmissionNoise)):
        if t.metric == "image" and (facts.modality, facts.geometry) != ("ct", "parallel"):
            raise ConfigError(f"{where}: metric: image needs parallel-beam CT scans")
        return SureGaussianLoss(noise_model=nm, tau=t.tau, metric=t.metric, detector=detector, seed=seed)
    if detector is not None:
        raise ConfigError(f"{where}: SURE through a clipping detector needs Gaussian or transmission noise, "
                          f"the scans have {nm.kind}")
    if t.metric == "image":
        raise ConfigError(f"{where}: metric: image needs Gaussian or transmission noise, "
                          f"the scans have {nm.kind}")
    return SurePoissonLoss(noise_model=nm, tau=t.tau, seed=seed)


def _splitting(t: SplittingTerm, facts: Any, seed: int, where: str) -> Any:
    _linear_only(facts, where)
    return SplittingLoss(t.rho, seed=seed)


def _supervised(t: SupervisedTerm, facts: Any, seed: int, where: str) -> Any:
    if facts.without_reference:
        raise ConfigError(
            f"{where}: needs the scans' reference array, and {facts.without_reference[0]} has none "
            f"({len(facts.without_reference)} scan(s) without one); simulated scans carry it, measured "
            "ones do not: train those with a self-supervised term")
    return SupervisedLoss(metric=t.metric)


def _ssdu(t: SSDUTerm, facts: Any, seed: int, where: str) -> Any:
    _linear_only(facts, where)
    if facts.modality != "mri":
        raise ConfigError(f"{where}: SSDU splits MRI k-space; use n2i or splitting for CT")
    return SSDULoss(t.rho, metric=t.metric, weighted=t.weighted, seed=seed)


def _n2i(t: N2ITerm, facts: Any, seed: int, where: str) -> Any:
    _linear_only(facts, where)
    return Noise2InverseLoss(t.num_splits, target=t.target, seed=seed)


# ----------------------------------------------------------------------------- the registry
class LossTerm(NamedTuple):
    """A loss term: its settings class, its builder and whether it splits the data."""

    config: type[_Term]
    build: Callable[[Any, Any, int, str], Any]
    splits: bool = False

    @property
    def name(self) -> str:
        return self.config.model_fields["name"].annotation.__args__[0]


LOSS_TERMS: dict[str, LossTerm] = {term.name: term for term in (
    LossTerm(MCTerm, _mc),
    LossTerm(EITerm, _ei),
    LossTerm(SureTerm, _sure),
    LossTerm(SplittingTerm, _splitting, splits=True),
    LossTerm(SSDUTerm, _ssdu, splits=True),
    LossTerm(N2ITerm, _n2i, splits=True),
    LossTerm(SupervisedTerm, _supervised),
)}

#: Terms that split the data and wrap the model (at most one per loss).
SPLITTING_TERMS = tuple(name for name, term in LOSS_TERMS.items() if term.splits)

#: One entry of ``loss.terms``: the settings class its ``name`` picks.
TermConfig = Annotated[Union[tuple(term.config for term in LOSS_TERMS.values())], Field(discriminator="name")]
