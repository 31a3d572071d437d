"""The one config decoder: a mapping laid over a config dataclass, strictly, every error a
:class:`~prism_otel.config_error.ConfigError` carrying the path of the bad key.

A config is a dataclass whose field names are its keys and whose defaults are its defaults. Unknown
keys, values of the wrong type and failed ``validate()`` rules are errors before anything starts.
Every config of prism-otel goes through :func:`decode`: the collector's components (YAML, paths in the
Collector's ``::`` notation: ``receivers::otlp::protocols``) and the processors' options, whether they
come from the collector's YAML or from an environment variable's ``key=value`` list (``text=True``:
values may be strings, read as the declared type; paths dotted: ``baseline_key.gpu``, ``sep="."``).

Field types: ``str``, ``int``, ``float``, ``bool``, :data:`Duration` (a Go duration string read as
seconds), ``Optional[X]``, ``List[X]``, ``Dict[str, X]``, ``Literal[...]``, ``Any`` and nested config
dataclasses. For ``Optional[<dataclass>]`` a key written with no value (``grpc:``) means "on, with
defaults", as it does for the Collector's receiver protocols. A whole-value ``${env:VAR}`` of the
collector's YAML arrives as an :class:`EnvText`: its text for a string field, its YAML reading for the
others. ``validate()`` (no argument: paths relative to the config) runs last; its errors are put under
the config's own path.

Core: imports nothing of ours but the error type.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NewType, TypeVar

from prism_otel.config_error import ConfigError, join_path

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Duration = NewType("Duration", float)  # seconds, written as a Go duration in YAML

T = TypeVar("T", bound="DataclassInstance")  # decode() builds config dataclasses only
_NONE = type(None)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_DUR_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class EnvText(str):
    """The text of a whole-value ``${env:VAR}`` reference, with its YAML reading in ``typed``.

    A string field takes the text; a typed field (int, float, bool, duration) takes ``typed``."""

    __slots__ = ("typed",)

    def __new__(cls, text: str, typed: Any) -> EnvText:
        obj = super().__new__(cls, text)
        obj.typed = typed
        return obj


def parse_duration(value: Any, path: str) -> float:
    """A Go duration string (``"200ms"``) → seconds. Bare ``0`` is allowed, other bare numbers are not."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like 200ms, got {value!r}")
    if isinstance(value, (int, float)) and value == 0:
        return 0.0
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a duration like 200ms or 5s, got {value!r}")
    s = value.strip()
    sign = 1.0
    if s[:1] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DUR_PART.match(s, pos)
        if m is None:
            raise ConfigError(path, f"invalid duration {value!r} (use units ns, us, ms, s, m, h: e.g. 200ms, 1m30s)")
        total += float(m.group(1)) * _DUR_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ConfigError(path, f"invalid duration {value!r}")
    return sign * total


class _Ctx:
    """How one :func:`decode` call reads values: strings as typed values (``text``), its path separator."""

    __slots__ = ("text", "sep")

    def __init__(self, text: bool, sep: str) -> None:
        self.text = text
        self.sep = sep

    def join(self, path: str, key: str) -> str:
        if self.sep == "::":
            return join_path(path, key)
        return f"{path}{self.sep}{key}" if path else key

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(path, message, sep=self.sep)

    def under(self, exc: ConfigError, path: str) -> ConfigError:
        """``exc`` (a path relative to the config at ``path``) with ``path`` in front."""
        keys = [*(path.split(self.sep) if path else ()), *exc.keys]
        return ConfigError(self.sep.join(keys), exc.message, sep=self.sep)


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "duration"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _scalar(tp: Any, value: Any, path: str, c: _Ctx) -> Any:
    """``value`` as a ``bool``, ``int``, ``float`` or ``str`` field; from a string too where ``c.text``."""
    text = c.text and isinstance(value, str)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if c.text and isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = value.strip().lower() if text and isinstance(value, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise c.error(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise c.error(path, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if c.text and isinstance(value, (float, str)):
            try:
                f = float(value)
            except ValueError:
                raise c.error(path, f"expected an integer, got {value!r}") from None
            if f == f and f not in (float("inf"), float("-inf")) and f == int(f):
                return int(f)
        raise c.error(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise c.error(path, f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):  # a bool was refused above
            f = float(value)
        elif text:
            try:
                f = float(value)
            except ValueError:
                raise c.error(path, f"expected a number, got {value!r}") from None
        else:
            raise c.error(path, f"expected a number, got {value!r}")
        if c.text and f != f:
            raise c.error(path, "expected a number, got NaN")
        return f
    # str
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list, tuple)):
        raise c.error(path, f"expected a string, got {value!r}")
    return str(value)


def _decode_value(tp: Any, value: Any, path: str, c: _Ctx) -> Any:
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
            if len(inner) == 1 and isinstance(inner[0], type) and dataclasses.is_dataclass(inner[0]):
                return _decode(inner[0], {}, path, c)
            return None
        if len(inner) == 1:
            return _decode_value(inner[0], value, path, c)
        for a in inner:
            try:
                return _decode_value(a, value, path, c)
            except ConfigError:
                continue
        raise c.error(path, f"expected one of {', '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise c.error(path, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list or tp is list:
        if value is None:
            return []
        if c.text and isinstance(value, str):  # from the environment: comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or (isinstance(value, tuple) and not c.text):
            raise c.error(path, f"expected a list, got {type(value).__name__}")
        return [_decode_value(args[0] if args else Any, v, c.join(path, str(i)), c) for i, v in enumerate(value)]
    if origin is dict or origin is Mapping or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise c.error(path, f"expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _decode_value(vt, v, c.join(path, str(k)), c) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a type hint: a class, never an instance
        return _decode(tp, value, path, c)
    if tp in (bool, int, float, str):
        return _scalar(tp, value, path, c)
    raise TypeError(f"decode: unsupported field type {tp!r} at {path}")


def _hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def _decode(cls: Any, data: Any, path: str, c: _Ctx) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise c.error(path or (cls.__name__ if c.text else ""), f"expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields)) or "(none)"
        raise c.error(c.join(path, str(unknown[0])), f"unknown key (valid keys here: {known})")
    hints = _hints(cls)
    kwargs = {name: _decode_value(hints[name], value, c.join(path, name), c) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError as exc:
        raise c.under(exc, path) from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise c.under(exc, path) from None
    return obj


def decode(cls: type[T], data: Any, path: str = "", *, text: bool = False, sep: str = "::") -> T:
    """Build ``cls`` from ``data`` (a mapping, or None for all defaults), then run its ``validate()``.

    ``path``: where the config sits (its keys' paths start with it; errors name them). ``text``: values
    may be strings read as the declared type (an environment variable's ``key=value`` list: ``"0.5"``,
    ``"true"``, ``"a,b"`` for a list). ``sep``: the path notation (``::`` the Collector's, ``.`` dotted)."""
    return _decode(cls, data, path, _Ctx(text, sep))


def defaults(cls: type[T]) -> T:
    return decode(cls, {}, "")


def check(condition: bool, key: str, message: str) -> None:
    """``validate()`` helper: raise a ConfigError at ``key`` (relative to the config) unless ``condition``."""
    if not condition:
        raise ConfigError(key, message)
