"""The inference engines prism-otel knows, from one place: the ``opentelemetry_instrumentor`` entry points
whose name starts with ``prism_`` (pyproject.toml). Each is an
:class:`~prism_otel.instrumentation.base.EngineInstrumentor` that names its engine (``name``), the
distributions that provide it (``dists``), its top-level module (``module``), what its native
libraries look like in ``/proc/PID/maps`` (``maps_marker``, None for a pure-Python engine) and where it
ranks when several are loaded (``precedence``: vLLM imports transformers, so vLLM names the process).

Adding an engine: its instrumentation package and one entry-point line. The runtime (``start()``),
the resource (``prism.engine.framework``), the baseline key and attach's check for "this process runs
an engine" all read :func:`known` / :func:`instrumentor_classes`.

:data:`RECOGNISED` lists engines prism-otel recognises but does not instrument (so a process of one
is named after it). Where prism-otel is not installed (a checkout on ``sys.path``, or the bootstrap
attach puts into another environment) there are no entry points: :data:`BUILTIN` holds the same
entries as pyproject.toml (tests/test_packaging.py checks they agree; :mod:`prism_otel.plugins`). Entry
points are loaded at call time, so this module imports no instrumentation.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple, Optional

from prism_otel import semconv as sc
from prism_otel.plugins import declared, load

logger = logging.getLogger(__name__)

GROUP = "opentelemetry_instrumentor"
PREFIX = "prism_"
# pyproject.toml's [project.entry-points.opentelemetry_instrumentor], for a checkout that is not installed
BUILTIN = {
    "prism_transformers": "prism_otel.instrumentation.transformers:TransformersInstrumentor",
    "prism_vllm": "prism_otel.instrumentation.vllm:VLLMInstrumentor",
}


class Engine(NamedTuple):
    name: str
    dists: tuple[str, ...]
    module: str
    maps_marker: Optional[str]
    precedence: int
    instrumented: bool


RECOGNISED = (Engine("sglang", ("sglang",), "sglang", "/sglang/", 10, False),)


def _is_engine_instrumentor(cls) -> bool:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

    return isinstance(cls, type) and issubclass(cls, BaseInstrumentor) and bool(getattr(cls, "dists", ()))


@functools.lru_cache(maxsize=1)
def _all_classes() -> tuple[tuple[str, type], ...]:
    found = [(name, value) for name, value in declared(GROUP, BUILTIN).items() if name.startswith(PREFIX)]
    out: list[tuple[str, Any]] = []
    for ep_name, value in found:
        try:
            cls: Any = load(value)
        except Exception:  # noqa: BLE001 - one engine's import problem must not stop the others
            logger.warning("prism-otel: instrumentor %s could not be loaded", ep_name, exc_info=True)
            continue
        if _is_engine_instrumentor(cls) and cls not in [c for _, c in out]:
            out.append((cls.name, cls))
    return tuple(out)


def instrumentor_classes(everything: bool = False) -> list:
    """Our instrumentors as (name, class); ``PRISM_OTEL_INSTRUMENTATIONS`` keeps only the ones it names
    (unless ``everything``)."""
    out = list(_all_classes())
    return out if everything else wanted(out)


def wanted(classes: list) -> list:
    """The (name, class) pairs ``PRISM_OTEL_INSTRUMENTATIONS`` names (all when it is unset)."""
    names = os.environ.get(sc.ENV_INSTRUMENTATIONS)
    if not names:
        return classes
    keep = {w.strip() for w in names.split(",")}
    return [(n, c) for n, c in classes if n in keep]


@functools.lru_cache(maxsize=1)
def known() -> tuple[Engine, ...]:
    """Every engine, instrumented or recognised, the one that names a process first."""
    engines = [Engine(cls.name, tuple(cls.dists), cls.module or cls.name, cls.maps_marker, cls.precedence, True)
               for _, cls in _all_classes()]
    engines += [e for e in RECOGNISED if e.name not in {x.name for x in engines}]
    return tuple(sorted(engines, key=lambda e: e.precedence))


def installed() -> dict:
    """Instrumented engines installed here and their versions (first: the one that names the resource)."""
    from prism_otel.instrumentation import installed_version

    out = {}
    for e in known():
        if not e.instrumented:
            continue
        v = installed_version(*e.dists)
        if v:
            out[e.name] = v
    return out
