"""Reading a Collector-format YAML file: ``${env:VAR}`` expansion, Go durations, byte sizes.

Follows the OpenTelemetry Collector's confmap rules:

* ``${env:VAR}`` and ``${env:VAR:-default}``; a bare ``${VAR}`` means ``${env:VAR}``; ``$$`` is a
  literal ``$``. An unset variable with no default expands to an empty string (a warning is logged,
  as the Collector does); any other provider scheme (``${file:...}``) is an error naming the path.
* When a whole scalar is one reference, the expanded text is read as YAML for typed fields, so
  ``port: ${env:PORT}`` yields an int; a string field keeps the text as it was (as the Collector
  does: a token ``0x1f2e3d4c`` stays that string, not 523124044). The value is an
  :class:`EnvText`, a ``str`` that carries its YAML reading for the decoder
  (:mod:`prism_otel.config_decode`). Inside a longer string a reference is spliced in as text.
* Durations are Go durations: ``200ms``, ``1.5s``, ``1m30s``, ``300us``; ``0`` needs no unit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import yaml

from prism_otel.collector.errors import ConfigError, join_path
from prism_otel.config_decode import EnvText

logger = logging.getLogger(__name__)

_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _lookup(ref: str, path: str, env: Mapping[str, str]) -> str:
    body = ref
    if ":" in ref and not ref.startswith(":"):
        scheme, _, body = ref.partition(":")
        if scheme != "env":
            raise ConfigError(path, f"unsupported config provider ${{{scheme}:...}} (only env is supported)")
    name, sep, default = body.partition(":-")
    if not _ENV_NAME.match(name):
        raise ConfigError(path, f"invalid environment variable name in ${{{ref}}}")
    if name in env:
        return env[name]
    if sep:
        return default
    logger.warning("%s: environment variable %s is not set; using an empty value", path, name)
    return ""


def typed(node: Any) -> Any:
    """``node`` with every :class:`EnvText` replaced by its YAML reading (for untyped consumers)."""
    if isinstance(node, EnvText):
        return node.typed
    if isinstance(node, dict):
        return {k: typed(v) for k, v in node.items()}
    if isinstance(node, list):
        return [typed(v) for v in node]
    return node


def expand_scalar(value: str, path: str, env: Optional[Mapping[str, str]] = None) -> Any:
    """Expand references in one string scalar (see module docstring)."""
    env = os.environ if env is None else env
    m = _REF.fullmatch(value)
    if m is not None and m.group(0) != "$$":
        text = _lookup(m.group(1), path, env)
        try:
            parsed = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            parsed = text
        # Only scalars come back typed; a value that reads as a mapping/list stays text.
        if not (isinstance(parsed, (str, int, float, bool)) or parsed is None):
            parsed = text
        return EnvText(text, parsed)

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return _lookup(match.group(1), path, env)

    return _REF.sub(sub, value)


def expand(node: Any, path: str = "", env: Optional[Mapping[str, str]] = None) -> Any:
    """Expand every string scalar in a parsed YAML tree (keys are left as written)."""
    if isinstance(node, dict):
        return {k: expand(v, join_path(path, str(k)), env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, join_path(path, str(i)), env) for i, v in enumerate(node)]
    if isinstance(node, str):
        return expand_scalar(node, path, env)
    return node


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the Collector's YAML parser does too)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_text(text: str, source: str = "<config>") -> dict:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_file(path: str, env: Optional[Mapping[str, str]] = None) -> dict:
    """Read, parse and env-expand a config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from exc
    return expand(load_yaml_text(text, path), "", env)


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
