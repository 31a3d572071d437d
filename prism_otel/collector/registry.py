"""Which component types exist: the built-in factories, by kind and type (aliases included)."""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

from prism_otel.collector.component import Factory
from prism_otel.collector.errors import ConfigError, join_path


@functools.lru_cache(maxsize=1)
def _factories() -> Dict[str, Dict[str, Factory]]:
    from prism_otel.collector import extensions, prism_processors
    from prism_otel.collector.exporters import debug, file, otlp_grpc, otlp_http
    from receivers import otlp

    table: Dict[str, Dict[str, Factory]] = {}
    facts = [otlp.factory(), *prism_processors.factories(), otlp_grpc.factory(), otlp_http.factory(),
             file.factory(), debug.factory(), extensions.file_storage_factory(), extensions.bearer_token_factory()]
    for f in facts:
        kind = table.setdefault(f.kind, {})
        for name in (f.type, *f.aliases):
            kind[name] = f
    return table


def lookup(kind: str, type_name: str) -> Optional[Factory]:
    return _factories().get(kind, {}).get(type_name)


def types(kind: str) -> List[str]:
    return sorted({f.type for f in _factories().get(kind, {}).values()})


def all_factories() -> List[Factory]:
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
