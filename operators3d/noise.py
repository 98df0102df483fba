"""Measurement noise models: Gaussian, Poisson with a gain, Poisson–Gaussian, and the
transmission (photon-counting) noise of CT line integrals after ``−log``.

Each model is an immutable object (a frozen dataclass) with

- ``sample(clean, *, generator=None, mask=None)``: a noisy copy of ``clean = A x``, every random
  number drawn from ``generator`` (the global RNG if ``None``). The generator must live on the
  device of ``clean`` (``torch.Generator(device=clean.device)``); a ``mask`` restricts the noise
  to the measured entries ``mask != 0``, and the others are returned as given (zero for the
  output of a masked MRI operator: they are not measurements and must stay zero).
- ``variance(clean, *, mask=None)``: the variance of each entry (for complex entries, of the
  real part and of the imaginary part each).
- ``gain`` and ``sigma``: the Poisson gain ``γ`` and the Gaussian standard deviation ``σ``
  (zero for a model without that part), which is all the SURE / PURE / PG-URE losses need
  (``METHODS.md``).
- ``to_dict()`` / ``from_dict()``, JSON-ready (``{"kind": "gaussian", "sigma": 0.01}``), so a
  scan stores its noise model in its metadata; :func:`noise_model_from_dict` reads any kind.

Gradients: ``sample`` passes gradients to ``clean`` as additive noise does (``∂y/∂z = I``);
for Poisson noise this is a straight-through estimate, exact in expectation since ``E y = z``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from .base import check_broadcast

__all__ = [
    "NoiseModel",
    "GaussianNoise",
    "PoissonNoise",
    "PoissonGaussianNoise",
    "TransmissionNoise",
    "noise_model_from_dict",
]

#: Entries of ``clean`` in ``[−NEGATIVE_RTOL · max|clean|, 0)`` are read as rounding error and
#: treated as 0 by the Poisson models; more negative entries are an error unless clamped.
NEGATIVE_RTOL = 1e-6


def _parameter(value: Any, what: str, owner: str, *, positive: bool) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}: {what} must be a real number, got {value!r}")
    value = float(value)
    bound = "> 0" if positive else ">= 0"
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{owner}: {what} must be finite and {bound}, got {value!r}")
    return value


def _check_clean(clean: torch.Tensor, owner: str, *, allow_complex: bool) -> None:
    if not isinstance(clean, torch.Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor, got {type(clean).__name__}")
    if clean.is_complex() and not allow_complex:
        raise TypeError(f"{owner}: expected a real floating tensor, got {clean.dtype}")
    if not (clean.is_floating_point() or clean.is_complex()):
        raise TypeError(f"{owner}: expected a floating or complex tensor, got {clean.dtype}")


def _check_generator(generator: torch.Generator | None, clean: torch.Tensor, owner: str) -> None:
    if generator is None:
        return
    g, c = torch.device(generator.device), clean.device
    same = g.type == c.type and (g.index is None or c.index is None or g.index == c.index)
    if not same:
        raise ValueError(
            f"{owner}: the generator is on {g} but clean is on {c}; pass "
            f"torch.Generator(device={str(c)!r})"
        )


def _measured(mask: torch.Tensor | None, clean: torch.Tensor, owner: str) -> torch.Tensor | None:
    """``mask != 0`` as a bool tensor on ``clean``'s device, checked to broadcast to ``clean``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{owner}: mask must be a tensor, got {type(mask).__name__}")
    check_broadcast(mask.shape, clean.shape, f"{owner}: mask", f"clean's {tuple(clean.shape)}")
    return (mask != 0).to(clean.device)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _standard_normal(
    clean: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``n`` shaped like ``clean``: N(0, 1), or complex with N(0, 1) real and imaginary parts."""
    real = _real_dtype(clean.dtype)
    if clean.is_complex():
        n = torch.randn(
            (*clean.shape, 2), generator=generator, dtype=real, device=clean.device
        )
        return torch.view_as_complex(n)
    return torch.randn(clean.shape, generator=generator, dtype=real, device=clean.device)


def _poisson_rates(
    clean: torch.Tensor, owner: str, *, clamp_negative: bool
) -> torch.Tensor:
    """``max(clean, 0)``, after checking that negatives are rounding unless ``clamp_negative``."""
    z = clean.detach()
    if not clamp_negative and z.numel() > 0:
        low = float(z.min())
        if low < 0 and low < -NEGATIVE_RTOL * float(z.abs().max()):
            raise ValueError(
                f"{owner}: clean must be >= 0 (Poisson rates), got a minimum of {low:.6g}; "
                "pass clamp_negative=True to read negative entries as 0"
            )
    return z.clamp_min(0)


def _poisson(z: torch.Tensor, gain: float, generator: torch.Generator | None) -> torch.Tensor:
    """``γ · Poisson(z / γ)`` for ``z >= 0``."""
    return gain * torch.poisson(z / gain, generator=generator)


def _finish(
    clean: torch.Tensor, noisy: torch.Tensor, measured: torch.Tensor | None
) -> torch.Tensor:
    """Keep unmeasured entries as given; pass gradients straight through to ``clean``."""
    if not clean.requires_grad:
        return noisy if measured is None else torch.where(measured, noisy, clean)
    delta = noisy.detach() - clean.detach()
    if measured is not None:
        delta = torch.where(measured, delta, torch.zeros_like(delta))
    return clean + delta


class NoiseModel:
    """Base class of the noise models (see the module docstring for the contract)."""

    kind: ClassVar[str] = ""

    @property
    def name(self) -> str:
        return type(self).__name__

    def sample(
        self,
        clean: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A noisy measurement of ``clean``; entries where ``mask == 0`` stay unchanged.

        Shape:
            ``clean``: any; returns the same shape and dtype.
        """
        raise NotImplementedError(f"{self.name} does not implement sample")

    def variance(self, clean: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-entry variance of the noise at ``clean`` (of each part, for complex entries).

        Shape:
            ``clean``: any; returns the same shape (real).
        """
        raise NotImplementedError(f"{self.name} does not implement variance")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready description ``{"kind": ..., <parameters>}``."""
        raise NotImplementedError(f"{self.name} does not implement to_dict")

    @classmethod
    def _parameter_names(cls) -> tuple[str, ...]:
        raise NotImplementedError(f"{cls.__name__} does not list its parameters")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NoiseModel":
        """The model described by ``data`` (as written by :meth:`to_dict`)."""
        where = f"{cls.__name__}.from_dict"
        if not isinstance(data, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
        if data.get("kind") != cls.kind:
            raise ValueError(f"{where}: expected kind {cls.kind!r}, got {data.get('kind')!r}")
        names = cls._parameter_names()
        given = set(data) - {"kind"}
        missing, unknown = set(names) - given, given - set(names)
        if missing or unknown:
            raise ValueError(
                f"{where}: expected keys {sorted(names)} besides 'kind', got {sorted(given)}"
                + (f" (missing {sorted(missing)})" if missing else "")
                + (f" (unknown {sorted(unknown)})" if unknown else "")
            )
        return cls(**{n: data[n] for n in names})


@dataclass(frozen=True)
class GaussianNoise(NoiseModel):
    """Additive white Gaussian noise, real or complex.

    For complex measurements ``σ`` is the standard deviation of the real part and of the
    imaginary part each (as in deepinv), so ``E|n|² = 2σ²``.

    Shape:
        ``clean``: any; returns the same shape and dtype.

    Math:
        ``y = z + σ n``, ``n ~ N(0, I)`` (complex: ``n = n_r + i n_i``), ``Var y = σ²``.

    Args:
        sigma: ``σ >= 0``.
    """

    sigma: float

    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        sigma = _parameter(self.sigma, "sigma", self.name, positive=False)
        object.__setattr__(self, "sigma", sigma)

    @property
    def gain(self) -> float:
        """No Poisson part: 0."""
        return 0.0

    @classmethod
    def _parameter_names(cls) -> tuple[str, ...]:
        return ("sigma",)

    def sample(self, clean, *, generator=None, mask=None):
        """A noisy copy of ``clean``; noise only where ``mask != 0`` if a mask is given."""
        where = f"{self.name}.sample"
        _check_clean(clean, where, allow_complex=True)
        _check_generator(generator, clean, where)
        measured = _measured(mask, clean, where)
        noise = self.sigma * _standard_normal(clean, generator)
        if measured is not None:
            noise = torch.where(measured, noise, torch.zeros_like(noise))
        return clean + noise

    def variance(self, clean, *, mask=None):
        """``σ²`` per entry (real dtype), 0 outside ``mask``."""
        where = f"{self.name}.variance"
        _check_clean(clean, where, allow_complex=True)
        var = torch.full(
            clean.shape, self.sigma**2, dtype=_real_dtype(clean.dtype), device=clean.device
        )
        measured = _measured(mask, clean, where)
        return var if measured is None else var * measured

    def to_dict(self):
        return {"kind": self.kind, "sigma": self.sigma}


@dataclass(frozen=True)
class PoissonNoise(NoiseModel):
    """Poisson (photon-counting) noise with a gain, unbiased: ``E y = z``, ``Var y = γ z``.

    ``clean`` must be real and ``>= 0``. Entries in ``[−1e-6 · max|z|, 0)`` count as rounding
    and are read as 0; more negative entries raise a ``ValueError`` unless
    ``clamp_negative=True`` (for re-measuring a network's output, as REI does), which reads
    every negative entry as 0. The check costs one device synchronisation; the clamped path
    none.

    Shape:
        ``clean``: any; returns the same shape and dtype.

    Math:
        ``y = γ · Poisson(z / γ)``.

    Args:
        gain: ``γ > 0`` (larger means noisier; ``1`` gives plain counts).
    """

    gain: float

    kind: ClassVar[str] = "poisson"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _parameter(self.gain, "gain", self.name, positive=True))

    @property
    def sigma(self) -> float:
        """No Gaussian part: 0."""
        return 0.0

    @classmethod
    def _parameter_names(cls) -> tuple[str, ...]:
        return ("gain",)

    def sample(self, clean, *, generator=None, mask=None, clamp_negative=False):
        """A noisy copy of ``clean``; noise only where ``mask != 0`` if a mask is given."""
        where = f"{self.name}.sample"
        _check_clean(clean, where, allow_complex=False)
        _check_generator(generator, clean, where)
        measured = _measured(mask, clean, where)
        z = _poisson_rates(clean, where, clamp_negative=clamp_negative)
        return _finish(clean, _poisson(z, self.gain, generator), measured)

    def variance(self, clean, *, mask=None):
        """``γ · max(z, 0)`` per entry, 0 outside ``mask``."""
        where = f"{self.name}.variance"
        _check_clean(clean, where, allow_complex=False)
        var = self.gain * clean.clamp_min(0)
        measured = _measured(mask, clean, where)
        return var if measured is None else var * measured

    def to_dict(self):
        return {"kind": self.kind, "gain": self.gain}


@dataclass(frozen=True)
class PoissonGaussianNoise(NoiseModel):
    """Poisson noise with a gain plus additive Gaussian (read-out) noise.

    ``clean`` must be real; negative entries are handled as in :class:`PoissonNoise`.

    Shape:
        ``clean``: any; returns the same shape and dtype.

    Math:
        ``y = γ · Poisson(z / γ) + σ n``, ``n ~ N(0, I)``; ``E y = z``, ``Var y = γ z + σ²``.

    Args:
        gain: ``γ > 0``.
        sigma: ``σ >= 0``.
    """

    gain: float
    sigma: float

    kind: ClassVar[str] = "poisson_gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _parameter(self.gain, "gain", self.name, positive=True))
        sigma = _parameter(self.sigma, "sigma", self.name, positive=False)
        object.__setattr__(self, "sigma", sigma)

    @classmethod
    def _parameter_names(cls) -> tuple[str, ...]:
        return ("gain", "sigma")

    def sample(self, clean, *, generator=None, mask=None, clamp_negative=False):
        """A noisy copy of ``clean``; noise only where ``mask != 0`` if a mask is given."""
        where = f"{self.name}.sample"
        _check_clean(clean, where, allow_complex=False)
        _check_generator(generator, clean, where)
        measured = _measured(mask, clean, where)
        z = _poisson_rates(clean, where, clamp_negative=clamp_negative)
        noisy = _poisson(z, self.gain, generator) + self.sigma * _standard_normal(z, generator)
        return _finish(clean, noisy, measured)

    def variance(self, clean, *, mask=None):
        """``γ · max(z, 0) + σ²`` per entry, 0 outside ``mask``."""
        where = f"{self.name}.variance"
        _check_clean(clean, where, allow_complex=False)
        var = self.gain * clean.clamp_min(0) + self.sigma**2
        measured = _measured(mask, clean, where)
        return var if measured is None else var * measured

    def to_dict(self):
        return {"kind": self.kind, "gain": self.gain, "sigma": self.sigma}


@dataclass(frozen=True)
class TransmissionNoise(NoiseModel):
    """Photon-counting noise of transmission CT, seen on the line integrals after ``−log``.

    ``clean`` are line integrals ``p = A x``; the detector counts ``N ~ Poisson(I₀ e^{−p})``
    photons and the measurement is ``y = −log(max(N, 1)/I₀)`` (a zero count is read as one, as
    the simulator does). To first order (the delta method) ``y`` is Gaussian around ``p`` with
    variance ``e^{p}/I₀``: heteroscedastic, larger behind dense material. The SURE losses use
    that variance (:class:`~pipeline.losses.SureGaussianLoss` accepts this model); robust EI
    re-measures with :meth:`sample`.

    Shape:
        ``clean``: any (real); returns the same shape and dtype.

    Math:
        ``y = −log(max(Poisson(I₀ e^{−p}), 1)/I₀)``, ``Var y ≈ e^{p}/I₀``.

    Args:
        photons: incident photons per detector pixel ``I₀ > 0``.
    """

    photons: float

    kind: ClassVar[str] = "transmission_poisson"

    def __post_init__(self) -> None:
        photons = _parameter(self.photons, "photons", self.name, positive=True)
        object.__setattr__(self, "photons", photons)

    @classmethod
    def _parameter_names(cls) -> tuple[str, ...]:
        return ("photons",)

    def sample(self, clean, *, generator=None, mask=None):
        """A noisy copy of ``clean`` (line integrals); noise only where ``mask != 0``."""
        where = f"{self.name}.sample"
        _check_clean(clean, where, allow_complex=False)
        _check_generator(generator, clean, where)
        measured = _measured(mask, clean, where)
        i0 = self.photons
        rate = i0 * torch.exp(-clean.detach().to(torch.float64))
        counts = torch.poisson(rate, generator=generator).clamp_min(1.0)
        noisy = (-torch.log(counts / i0)).to(clean.dtype)
        return _finish(clean, noisy, measured)

    def variance(self, clean, *, mask=None):
        """``e^{p}/I₀`` per entry (the delta method), 0 outside ``mask``."""
        where = f"{self.name}.variance"
        _check_clean(clean, where, allow_complex=False)
        var = torch.exp(clean) / self.photons
        measured = _measured(mask, clean, where)
        return var if measured is None else var * measured

    def to_dict(self):
        return {"kind": self.kind, "photons": self.photons}


_KINDS: dict[str, type[NoiseModel]] = {
    cls.kind: cls for cls in (GaussianNoise, PoissonNoise, PoissonGaussianNoise, TransmissionNoise)
}


def noise_model_from_dict(data: Mapping[str, Any]) -> NoiseModel:
    """The noise model described by ``data``, of any kind (``{"kind": "gaussian", ...}``)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"noise_model_from_dict: expected a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in _KINDS:
        raise ValueError(
            f"noise_model_from_dict: expected kind among {sorted(_KINDS)}, got {kind!r}"
        )
    return _KINDS[kind].from_dict(data)
