"""The processors an engine's pipeline or its companion runs, built from the registered components
(:mod:`processors.registry`, the ``prism_otel.processors`` entry points) as the environment configures them.

Each component's ``from_env`` says whether it runs here and with what config (its module's docstring
lists its variables; the names are in :mod:`prism_otel.semconv`); they run in the components' order.
The components that need detection (detection, SLO, incidents, metrics: ``needs_detection``) are
built together, only where detection runs (``PRISM_OTEL_DETECT`` not ``0``, and asked for): a bad value
of theirs raises a ``ConfigError`` naming the variable, and the runtime logs it and starts without
detection. Every other component (the device processor, a third party's) is built on its own: its
failure is logged and leaves only it out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

from prism_otel import config
from prism_otel import semconv as sc
from processors.factory import Context, ProcessorFactory
from processors.registry import factories

logger = logging.getLogger(__name__)


def _one(f: ProcessorFactory, context: Context) -> Optional[Any]:
    cfg = f.config_from_env(context)
    if cfg is None:
        return None
    p = f.create(cfg, context)
    if p is not None:
        context.built.append(p)
    return p


def _all(facts: Sequence[ProcessorFactory], context: Context) -> dict[str, Any]:
    """Each of ``facts`` that runs here, by type; the first error is raised (the ones built are shut down)."""
    out: dict[str, Any] = {}
    try:
        for f in facts:
            p = _one(f, context)
            if p is not None:
                out[f.type] = p
    except BaseException:
        for p in out.values():
            try:
                p.shutdown()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
    return out


def _context_role() -> str:
    return sc.ROLE_COMPANION if os.environ.get(sc.ENV_ROLE) == sc.ROLE_COMPANION else sc.ROLE_ENGINE


def in_process_processors(model_name: Optional[Callable[[], Optional[str]]] = None) -> list:
    """The components that need detection (detection, SLO, incidents, metrics), as the environment
    configures them, in order. ``model_name``: asked for the served model's name (the engine reports it
    late), part of the baseline key. A bad value raises ``ConfigError`` naming the variable."""
    facts = [f for f in factories() if f.needs_detection]
    built = _all(facts, Context(role=_context_role(), model_name=model_name))
    return [built[f.type] for f in facts if f.type in built]


def processor_chain(context: Context, detect: bool = True) -> list[Any]:
    """Every component that runs here, in order: those that need detection when ``detect`` and detection
    is on (an error leaves them all out, logged), then the others each on its own (an error leaves it
    out, logged). Never raises: processors must never stop tracing from starting."""
    facts = factories()
    built: dict[str, Any] = {}
    if detect and config.detect_enabled():
        try:
            built.update(_all([f for f in facts if f.needs_detection], context))
        except Exception:  # noqa: BLE001 - detection must never stop tracing from starting
            logger.warning("prism-otel: detection processors unavailable", exc_info=True)
    for f in facts:
        if f.needs_detection:
            continue
        try:
            p = _one(f, context)
        except Exception:  # noqa: BLE001 - one component must never stop tracing from starting
            logger.warning("prism-otel: processor %s unavailable", f.type, exc_info=True)
            continue
        if p is not None:
            built[f.type] = p
    return [built[f.type] for f in facts if f.type in built]
