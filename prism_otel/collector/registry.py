"""Which component types exist: receivers, exporters and extensions found through the
``prism_otel.collector`` entry-point group, processors through the processors' own registry
(:mod:`processors.registry`), by kind and type (aliases included).

Each entry point is named ``<kind>.<type>`` (``exporter.otlp_grpc``) and points at a function without
arguments that returns the component's :class:`~prism_otel.collector.component.Factory`. A third party's
distribution adds a receiver, an exporter or an extension with one such line in its own metadata. Our
own lines are in :data:`BUILTIN` too (equal to pyproject.toml's, tests/collector/test_registry.py keeps
them so; :mod:`prism_otel.plugins`). One that cannot be loaded, does not return a ``Factory`` or returns
one of another kind or type is logged and left out: one distribution's problem must not stop the others.
"""

from __future__ import annotations

import functools
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.collector.component import Factory
from prism_otel.collector.errors import ConfigError, join_path
from prism_otel.plugins import load_each

# pyproject.toml's [project.entry-points."prism_otel.collector"], for a tree that is not installed
BUILTIN = {
    "receiver.otlp": "receivers.otlp:factory",
    "exporter.otlp_grpc": "prism_otel.collector.exporters.otlp_grpc:factory",
    "exporter.otlp_http": "prism_otel.collector.exporters.otlp_http:factory",
    "exporter.file": "prism_otel.collector.exporters.file:factory",
    "exporter.debug": "prism_otel.collector.exporters.debug:factory",
    "extension.file_storage": "prism_otel.collector.extensions:file_storage_factory",
    "extension.bearertokenauth": "prism_otel.collector.extensions:bearer_token_factory",
}


def _problem(name: str, f: object) -> Optional[str]:
    if not isinstance(f, Factory) or f"{f.kind}.{f.type}" != name:
        return "did not return a Factory of that kind and type"
    return None


def _components() -> list[Factory]:
    return load_each(sc.ENTRY_POINT_COLLECTOR, BUILTIN, "collector component", _problem, call=True)


@functools.lru_cache(maxsize=1)
def _factories() -> dict[str, dict[str, Factory]]:
    from prism_otel.collector import prism_processors

    table: dict[str, dict[str, Factory]] = {}
    for f in [*_components(), *prism_processors.factories()]:
        kind = table.setdefault(f.kind, {})
        for name in (f.type, *f.aliases):
            kind[name] = f
    return table


def reload() -> None:
    """Look the entry points up again (a distribution installed since the first look)."""
    _factories.cache_clear()


def lookup(kind: str, type_name: str) -> Optional[Factory]:
    return _factories().get(kind, {}).get(type_name)


def types(kind: str) -> list[str]:
    return sorted({f.type for f in _factories().get(kind, {}).values()})


def all_factories() -> list[Factory]:
    seen = {}
    for kind in _factories().values():
        for f in kind.values():
            seen[(f.kind, f.type)] = f
    return list(seen.values())


def validate_pipeline(processors, path: str) -> None:
    """The prism processors of one pipeline share an assembler: their ``assembly`` blocks must agree."""
    from prism_otel.collector.prism_processors import AssemblyConfig

    first = None
    for i, comp in enumerate(processors):
        a = getattr(comp.config, "assembly", None)
        if a is None or a == AssemblyConfig():
            continue
        if first is not None and a != first[1]:
            raise ConfigError(join_path(path, str(i)), f"its assembly settings differ from those of {first[0]!r} "
                                                       "in the same pipeline (they share one assembler)")
        first = (str(comp.id), a)


def assembly_for(processors):
    from prism_otel.collector.prism_processors import AssemblyConfig

    for comp in processors:
        a = getattr(comp.config, "assembly", None)
        if a is not None and a != AssemblyConfig():
            return a
    return AssemblyConfig()
