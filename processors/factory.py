"""A processor as a component, as in the OpenTelemetry Collector: a config, a factory, the processor.

A :class:`ProcessorFactory` is data:

* ``type``: the component's name: its key under ``processors:`` in the collector's YAML and its
  entry-point name in the ``prism_otel.processors`` group (:data:`prism_otel.semconv.ENTRY_POINT_PROCESSORS`);
* ``config_class``: a dataclass (its fields the keys, their defaults the defaults, an optional
  ``validate(where)``), decoded by the one strict decoder, :func:`processors.config.build`: an unknown
  key or a bad value is a :class:`~prism_otel.config_error.ConfigError` carrying the key's path;
* ``create(config, context)``: the processor (a :class:`processors.base.Processor`), or None when
  there is nothing to run here (the metrics processor where metrics go nowhere);
* ``from_env(context)``, for a processor that runs in an engine's pipeline or its companion: its config
  from the environment (a mapping the decoder reads), or None where it does not run; ``env`` names
  the variables it reads (a bad value is a ``ConfigError`` under that name);
* ``order``: where it runs in the in-process chain (lower first; ties by type);
  ``needs_detection``: it runs in-process only where detection runs (it judges steps, or reads the
  verdicts of the processors that do); ``collector``: whether the collector offers it.

Factories are found through the entry-point group by :mod:`processors.registry`; the in-process
chain (:mod:`processors.defaults`) and the collector (:mod:`prism_otel.collector.prism_processors`) are
both built from there, so adding a processor is its own module plus one entry-point line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from prism_otel import semconv as sc
from prism_otel.config_error import ConfigError
from processors.config import build

# in-process order of the processors that ship with prism-otel (a third party's default: after them)
ORDER_DETECT, ORDER_SLO, ORDER_INCIDENTS, ORDER_METRICS, ORDER_DEVICE, ORDER_DEFAULT = 100, 200, 300, 400, 500, 1000


@dataclass
class Context:
    """What a factory gets besides its config: where the processor runs and what that place offers."""

    role: str = sc.ROLE_ENGINE  # sc.ROLE_ENGINE (an in-process pipeline), sc.ROLE_COMPANION, sc.ROLE_COLLECTOR
    model_name: Optional[Callable[[], Optional[str]]] = None  # the served model's name (known late), in-process
    deepdive: Any = None  # the DeepDive controller a device processor triggers (the companion's: through the ring)
    settings: Any = None  # in the collector: the component's Settings (id, telemetry, memory budget)
    built: list[Any] = field(default_factory=list)  # the processors created before this one in the same chain

    @property
    def in_process(self) -> bool:
        return self.role != sc.ROLE_COLLECTOR


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class ProcessorFactory:
    """How to make one processor component (module docstring)."""

    type: str
    config_class: type
    create: Callable[[Any, Context], Any]
    from_env: Optional[Callable[[Context], Optional[Mapping[str, Any]]]] = None
    env: str = ""
    order: int = ORDER_DEFAULT
    needs_detection: bool = False
    collector: bool = True
    collector_defaults: Mapping[str, Any] = field(default_factory=dict)  # defaults the collector lays under the YAML

    def config(self, data: Optional[Mapping[str, Any]], where: str = "") -> Any:
        """``config_class`` from ``data`` (strict; a ``ConfigError`` carries the key's path)."""
        return build(self.config_class, data, where)

    def config_from_env(self, context: Context) -> Optional[Any]:
        """The config the environment gives this processor, or None where it does not run in-process.
        A bad value raises a ``ConfigError`` whose path names the variables (``env``)."""
        if self.from_env is None:
            return None
        data = self.from_env(context)  # a ConfigError raised here names its variable itself
        if data is None:
            return None
        try:
            return self.config(data)
        except ConfigError as exc:  # its path is a key of the config: named under the variables
            raise ConfigError(self.env or self.type, str(exc)) from None
