"""Plain dataclass configs built from dicts (YAML in the collector, env in-process).

:func:`build` is the one config decoder (:mod:`prism_otel.config_decode`, which the collector's
components use too) reading values that may be strings (an environment variable's ``key=value`` list):
it checks every key and value and raises :class:`~prism_otel.config_error.ConfigError` (a
``ValueError``) carrying the path of the bad key (dotted: ``baseline_key.gpu``), so a bad collector
config fails before anything starts with the path of the problem (the collector puts its YAML path in
front with ``ConfigError.under``, never parsing the message), and a bad environment variable names
the key. A config's ``validate(where="")`` reports paths relative to the config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, TypeVar, cast

from prism_otel.config_decode import decode
from prism_otel.config_error import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Optional[Mapping[str, Any]], where: str = "") -> T:
    """``cls(**data)`` with every key known and every value of the declared type (coerced from strings):
    the one decoder (:func:`prism_otel.config_decode.decode`), dotted paths under ``where``."""
    return cast(T, decode(cast(Any, cls), data, where, text=True, sep="."))


def key_path(where: str, key: str) -> str:
    """``key`` under ``where`` (dotted; ``where`` may be empty)."""
    return f"{where}.{key}" if where else key


def invalid(path: str, message: str) -> ConfigError:
    """The error for the key at ``path`` (dotted); ``raise invalid(...)``."""
    return ConfigError(path, message, sep=".")


def positive(where: str, **values) -> None:
    for k, v in values.items():
        if v is None or v <= 0:
            raise invalid(key_path(where, k), f"must be > 0, got {v!r}")


def env_pairs(var: str) -> dict[str, str]:
    """``key=value,key=value`` from the environment variable ``var`` (empty when unset); a part without
    ``=`` or with an empty key raises :class:`ConfigError` naming the variable."""
    text = os.environ.get(var, "").strip()
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise invalid(var, f"expected key=value pairs separated by commas, got {part!r}")
        out[k.strip()] = v.strip()
    return out
