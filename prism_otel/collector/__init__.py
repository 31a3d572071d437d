"""The prism collector: OTLP in, step assembly and the prism processors, OTLP out.

Configured like the OpenTelemetry Collector (``receivers``, ``processors``, ``exporters``,
``extensions``, ``service.pipelines.traces``); run with ``prism-otel collector --config FILE.yaml``
or ``python -m prism_otel.collector --config FILE.yaml``. In code::

    from prism_otel.collector import Service, load
    svc = Service(load("otel-config/prism-local.yaml")); svc.start(); ...; svc.shutdown()

Modules: :mod:`.confmap` (YAML, env, durations), :mod:`.decode` (strict config dataclasses),
:mod:`.config` (the top level and graph checks), :mod:`.registry` (component types),
:mod:`.service` (lifecycle), :mod:`.pipeline` (intake → processors → exporters), :mod:`.wal` and
:mod:`.delivery` (the persistent queue: a checksummed segmented log, see docs/collector.md), :mod:`.exporters`, :mod:`.extensions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what __getattr__ below hands out on first use, for the type checker
    from prism_otel.collector.errors import ConfigError
    from prism_otel.collector.service import Service


def load(path: str):
    from prism_otel.collector.config import load as _load

    return _load(path)


def __getattr__(name: str):
    if name == "Service":
        from prism_otel.collector.service import Service

        return Service
    if name == "ConfigError":
        from prism_otel.collector.errors import ConfigError

        return ConfigError
    raise AttributeError(name)


__all__ = ["ConfigError", "Service", "load"]
