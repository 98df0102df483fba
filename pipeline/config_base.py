"""The one config system of recon3d: frozen pydantic models, and their errors as one line.

Every settings object derives from :class:`FrozenModel`: unknown keys are refused, instances
are immutable (``model_copy(update=...)`` makes a changed copy, ``model_dump()`` a dict). The
settings of ``recon3d simulate``, ``ingest``, ``preprocess``, ``reconstruct``, ``quickstart``,
the slab stream and the codecs derive from :class:`Settings`: a value that fails its checks
raises :class:`~pipeline.errors.InputError` (exit status 2) with one line naming the setting,
e.g. ``simulate ct: --angles must be greater than or equal to 1, got -3``. The training
config's sections (:mod:`pipeline.train.config`) format their errors per YAML key instead.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from pipeline.errors import InputError

__all__ = ["FrozenModel", "Settings", "ConfigError", "PathStr", "describe_errors"]


class ConfigError(ValueError):
    """An experiment config that cannot be used; the message says which key and why."""


def _path_to_str(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


#: A path or URL kept as a string (a ``pathlib.Path`` is accepted and turned into one).
PathStr = Annotated[str, BeforeValidator(_path_to_str)]


_COMPARISONS = (("greater than or equal to", ">="), ("less than or equal to", "<="),
                ("greater than", ">"), ("less than", "<"))


def _field_path(cls: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names at the start of an error's location (not list indices or union tags)."""
    names: list[str] = []
    for part in loc:
        field = cls.model_fields.get(part) if cls is not None and isinstance(part, str) else None
        if field is None:
            break
        names.append(part)
        ann = field.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return names


def describe_errors(err: ValidationError, cls: type[BaseModel], *, where: str, flags: bool) -> str:
    """``err`` as one line: ``WHERE: SETTING MESSAGE, got VALUE`` for each failed setting.

    ``flags`` names a setting as its command-line option (``--noise-sigma``), else by its
    field path (``codec.clevel``); a check of several settings at once gives its message alone.
    """
    found: dict[str, str] = {}
    for e in err.errors():
        names = _field_path(cls, e["loc"]) or [str(p) for p in e["loc"][:1]]
        msg = e["msg"].removeprefix("Value error, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = "is not a setting"
        elif kind == "missing":
            msg = "has too few values" if len(e["loc"]) > len(names) else "is required"
        elif kind == "too_short":
            msg = f"needs at least {e['ctx']['min_length']} value(s)"
        elif msg.startswith("Input should be "):
            msg = "must be " + msg.removeprefix("Input should be ")
            for words, sign in _COMPARISONS:
                msg = msg.replace(words, sign)
        got = e.get("input")
        if kind not in ("missing", "value_error", "extra_forbidden") and not isinstance(got, (dict, BaseModel)):
            msg += f", got {got!r}"
        if not names:
            found[msg] = msg
            continue
        name = f"--{names[-1].replace('_', '-')}" if flags else ".".join(names)
        text = f"{name}: {msg}" if kind == "value_error" else f"{name} {msg}"
        # a union (``auto`` or a number) fails once per member: one message for the setting
        found[name] = f"{name} has an invalid value, got {got!r}" if name in found else text
    return f"{where}: " + "; ".join(found.values())


class FrozenModel(BaseModel):
    """Base of every recon3d config: frozen, unknown keys refused. The training config's
    sections use it as is (:mod:`pipeline.train.config` formats their errors per YAML key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Settings(FrozenModel):
    """A command's or a component's settings: a failed check raises one line.

    ``_where`` (what the message starts with) and ``_flags`` (name settings as command-line
    options) say how it reads.
    """

    _where: ClassVar[str] = ""
    _flags: ClassVar[bool] = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise InputError(describe_errors(err, type(self), where=self._where or type(self).__name__,
                                             flags=self._flags)) from None
