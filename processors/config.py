"""Plain dataclass configs built from dicts (YAML in the collector, env in-process).

:func:`build` checks every key and value and raises ``ValueError`` naming the bad key, so a bad
collector config fails before anything starts, with the path of the problem.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, Optional, Type, TypeVar

T = TypeVar("T")


def _coerce(name: str, typ, value):
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, args[0], value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if f != f:
            raise ValueError(f"{name}: expected a number, got NaN")
        return f
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if origin in (dict, Mapping) or typ is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    return value


def build(cls: Type[T], data: Optional[Mapping[str, Any]], where: str = "") -> T:
    """``cls(**data)`` with every key known and every value of the declared type (coerced from strings)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ValueError(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
        kw[key] = _coerce(path, hints[key], value)
    obj = cls(**kw)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def positive(where: str, **values) -> None:
    for k, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{where + '.' if where else ''}{k}: must be > 0, got {v!r}")
