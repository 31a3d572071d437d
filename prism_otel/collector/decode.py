"""Strict decoding of a YAML mapping onto a config dataclass (the Collector's ``mapstructure`` role).

A component's config is a dataclass whose field names are its YAML keys and whose defaults are its
defaults; the user's mapping is laid over them. Unknown keys, wrong types and failed ``validate()``
rules are :class:`~prism_otel.collector.errors.ConfigError` s carrying the YAML path.

Supported field types: ``str``, ``int``, ``float``, ``bool``, :data:`Duration` (a Go duration string
read as seconds), ``Optional[X]``, ``List[X]``, ``Dict[str, X]``, ``Literal[...]`` and nested config
dataclasses. For ``Optional[<dataclass>]`` a key written with no value (``grpc:``) means "on, with
defaults", as it does for the Collector's receiver protocols.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, Dict, List, NewType, Type, TypeVar

from prism_otel.collector.confmap import EnvText, parse_duration
from prism_otel.collector.errors import ConfigError, join_path

Duration = NewType("Duration", float)  # seconds, written as a Go duration in YAML

T = TypeVar("T")
_NONE = type(None)


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "duration"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _decode_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, EnvText) and origin is not typing.Union:
        # a whole ${env:VAR}: its text for string fields, its YAML reading for the others
        if tp is str or (origin is typing.Literal and all(isinstance(a, str) for a in args)):
            return str(value)
        value = value.typed
    if tp is Any:
        return value
    if tp is Duration:
        return parse_duration(value, path)
    if origin is typing.Union:
        inner = [a for a in args if a is not _NONE]
        if isinstance(value, EnvText) and value.typed is None and str not in inner:
            value = None
        if value is None:
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                return decode(inner[0], {}, path)
            return None
        if len(inner) == 1:
            return _decode_value(inner[0], value, path)
        for a in inner:
            try:
                return _decode_value(a, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"expected one of {', '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, List):
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return [_decode_value(args[0] if args else Any, v, join_path(path, str(i))) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _decode_value(vt, v, join_path(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"decode: unsupported field type {tp!r} at {path}")


def _hints(cls: type) -> Dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def decode(cls: Type[T], data: Any, path: str = "") -> T:
    """Build ``cls`` from ``data`` (a mapping, or None for all defaults); then run ``validate()``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields)) or "(none)"
        raise ConfigError(join_path(path, str(unknown[0])), f"unknown key (valid keys here: {known})")
    hints = _hints(cls)
    kwargs = {name: _decode_value(hints[name], value, join_path(path, name)) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        raise exc.under(path) from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise exc.under(path) from None
    return obj


def defaults(cls: Type[T]) -> T:
    return decode(cls, {}, "")


def check(condition: bool, key: str, message: str) -> None:
    """``validate()`` helper: raise a ConfigError at ``key`` (relative to the config) unless ``condition``."""
    if not condition:
        raise ConfigError(key, message)
