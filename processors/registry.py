"""The processor components there are, found through the ``prism_otel.processors`` entry-point group.

Each entry point is named for its component's type and points at a
:class:`~processors.factory.ProcessorFactory` (``name = "package.module:factory"``), as the engines'
``opentelemetry_instrumentor`` entry points point at their instrumentors (:mod:`prism_otel.engines`).
A third party's distribution adds a processor with one such line in its own metadata; the in-process
chain (:mod:`processors.defaults`) and the collector (:mod:`prism_otel.collector.prism_processors`)
both build theirs from :func:`factories`.

Where prism-otel itself is not installed (a checkout on ``sys.path``, or installed from an older tree)
its own entry points are not in any metadata: :data:`BUILTIN` holds the same lines as pyproject.toml
(tests/processors/test_registry.py keeps the two equal) and is always read first; an entry point of the same
name found in the metadata takes its place. A factory that cannot be loaded, is not a
``ProcessorFactory`` or does not carry its entry point's name is logged and left out: one
distribution's problem must not stop the others.
"""

from __future__ import annotations

import functools
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.plugins import declared, load_each
from processors.factory import ProcessorFactory

# pyproject.toml's [project.entry-points."prism_otel.processors"], for a tree that is not installed
BUILTIN = {
    "prism_anomaly": "processors.factories.detection:factory",
    "prism_slo": "processors.factories.slo:factory",
    "prism_incidents": "processors.factories.incidents:factory",
    "prism_metrics": "processors.factories.metrics:factory",
    "prism_fleet": "processors.factories.fleet:factory",
    "prism_device": "prism_otel.device.component:factory",
}


def entry_point_values() -> dict[str, str]:
    """Component type -> ``module:attribute``: the built-in ones, then what the metadata declares."""
    return declared(sc.ENTRY_POINT_PROCESSORS, BUILTIN)


def _problem(name: str, f: object) -> Optional[str]:
    if not isinstance(f, ProcessorFactory):
        return "is not a ProcessorFactory"
    if f.type != name:
        return f"names a factory of type {f.type!r}"
    return None


@functools.lru_cache(maxsize=1)
def _factories() -> tuple[ProcessorFactory, ...]:
    out: list[ProcessorFactory] = load_each(sc.ENTRY_POINT_PROCESSORS, BUILTIN, "processor", _problem)
    return tuple(sorted(out, key=lambda f: (f.order, f.type)))


def factories() -> list[ProcessorFactory]:
    """Every processor component, in in-process chain order."""
    return list(_factories())


def lookup(type_name: str) -> Optional[ProcessorFactory]:
    return next((f for f in _factories() if f.type == type_name), None)


def reload() -> None:
    """Look the entry points up again (a distribution installed since the first look)."""
    _factories.cache_clear()
