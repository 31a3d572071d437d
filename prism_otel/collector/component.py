"""What a collector component is: an ID, a factory, and a start/shutdown lifecycle.

Mirrors the OpenTelemetry Collector's component model:

* a :class:`ComponentID` is ``type[/name]`` as written in YAML (``otlp``, ``otlp_grpc/phoenix``);
* a :class:`Factory` is data: the type, its kind, its config dataclass (defaults = field defaults,
  strict keys, ``validate()``), and a ``create`` callable. The downstream consumer is handed to a
  receiver's ``create``; a component never looks up its successor;
* every component has ``start(host)`` (returns quickly; long work on its own thread) and
  ``shutdown()`` (idempotent, safe without ``start``: stop accepting, flush, release).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from prism_otel.collector.errors import ConfigError

RECEIVER = "receiver"
PROCESSOR = "processor"
EXPORTER = "exporter"
EXTENSION = "extension"
KIND_SECTIONS = {RECEIVER: "receivers", PROCESSOR: "processors", EXPORTER: "exporters", EXTENSION: "extensions"}

_TYPE_RE = re.compile(r"^[a-zA-Z][0-9a-zA-Z_]{0,62}$")
_NAME_RE = re.compile(r"^[^\s/]{1,1024}$")


@dataclass(frozen=True)
class ComponentID:
    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: Any, path: str) -> ComponentID:
        if not isinstance(text, str) or not text:
            raise ConfigError(path, f"a component id must be a non-empty string like type or type/name, got {text!r}")
        typ, sep, name = text.partition("/")
        if not _TYPE_RE.match(typ):
            raise ConfigError(path, f"invalid component type {typ!r} (letters, digits and _; starts with a letter)")
        if sep and not _NAME_RE.match(name):
            raise ConfigError(path, f"invalid component name {name!r} after '/'")
        return cls(typ, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


class Component(Protocol):
    """A started receiver or extension as the service drives it (exporters are
    :class:`~prism_otel.collector.exporters.base.QueuedExporter` s)."""

    def start(self, host: Any) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True)
class Factory:
    """How to make one component type. ``create(settings, config, *downstream)``."""

    type: str
    kind: str
    config_class: type
    create: Callable[..., Any]
    aliases: tuple[str, ...] = ()  # deprecated type names still accepted (a warning is logged)
    stability: str = "alpha"


@dataclass
class Settings:
    """What ``create`` gets besides the config: the component's id, the shared telemetry and the
    collector's memory budget."""

    id: ComponentID
    telemetry: Any  # prism_otel.collector.telemetry.Telemetry
    pipeline: Optional[str] = None
    memory: Any = None  # prism_otel.collector.memory.Budget; None: the default budget

    @property
    def budget(self):
        if self.memory is None:
            from prism_otel.collector.memory import Budget

            self.memory = Budget.default()
        return self.memory


@dataclass
class Host:
    """Passed to ``start``: the running extensions, by id string."""

    extensions: dict[str, Any] = field(default_factory=dict)

    def extension(self, ref: str) -> Any:
        return self.extensions[ref]
