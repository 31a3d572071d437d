"""Configuration from the environment: read by the engine process and by its companion alike.

Standard ``OTEL_*`` variables work unchanged; ours use the ``PRISM_OTEL_`` prefix (names in
:mod:`prism_otel.semconv`). Nothing here starts anything.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Optional

from prism_otel import semconv as sc

logger = logging.getLogger(__name__)


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        logger.warning("prism-otel: %s is not an integer; using %d", name, default)
        return default


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        logger.warning("prism-otel: %s is not a number; using %s", name, default)
        return default


def disabled() -> bool:
    """prism-otel is off in this process (``PRISM_OTEL_DISABLED``, or one of our own helper processes)."""
    return os.environ.get(sc.ENV_DISABLED, "") not in ("", "0") or bool(os.environ.get(sc.ENV_ROLE))


def ring_capacity() -> int:
    return max(16, env_int(sc.ENV_RING_SIZE, 65536))


def companion_restarts() -> int:
    return max(0, env_int(sc.ENV_COMPANION_RESTARTS, 3))


def pipeline_mode() -> str:
    """``companion`` (the default: the engine process keeps the hooks only) or ``inprocess`` (an
    explicit opt-in: a pipeline thread in the engine process, with the cost docs/engine.md states)."""
    v = os.environ.get(sc.ENV_PIPELINE, "").strip().lower()
    if v in ("inprocess", "companion"):
        return v
    if v:
        logger.warning("prism-otel: %s=%r is not inprocess or companion; using companion", sc.ENV_PIPELINE, v)
    return "companion"


def pipeline_limits() -> dict:
    return dict(max_step_links=env_int(sc.ENV_MAX_STEP_LINKS, 128),
                max_request_links=env_int(sc.ENV_MAX_REQUEST_LINKS, 16),
                max_open_requests=env_int(sc.ENV_MAX_OPEN_REQUESTS, 10000))


def link_limit() -> int:
    """Links per span for a provider we build: at least the step link cap."""
    return env_int(sc.OTEL_SPAN_LINK_COUNT_LIMIT, 0) or max(128, env_int(sc.ENV_MAX_STEP_LINKS, 128))


def instance_id(pid: Optional[int] = None) -> str:
    return os.environ.get(sc.ENV_INSTANCE) or f"{socket.gethostname()}:{pid or os.getpid()}"


def frameworks() -> dict[str, str]:
    """Engines installed here and their versions (first: the one that names the resource)."""
    from prism_otel import engines  # lazy: it loads the instrumentors' entry points

    return engines.installed()


def framework_name() -> str:
    return next(iter(frameworks()), "prism")


_engine_pid: Optional[int] = None  # set by the companion: the engine process it serves


def set_engine_pid(pid: Optional[int]) -> None:
    global _engine_pid
    _engine_pid = pid


def engine_pid() -> int:
    """The engine process this process describes: itself, or, in a companion, its engine."""
    return _engine_pid or os.getpid()


def resource(pid: Optional[int] = None, fw: Optional[dict[str, str]] = None):
    """The SDK ``Resource`` of an engine process (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME`` and
    ours). The companion builds it for the engine's pid, so both describe the same process. ``fw``:
    the engines (name -> version; by default those installed here): the first names ``service.name``
    unless the environment gives one."""
    from opentelemetry.sdk.resources import Resource

    attrs = {"process.pid": pid or os.getpid(), "service.instance.id": instance_id(pid)}
    fw = frameworks() if fw is None else fw
    if fw:
        name, ver = next(iter(fw.items()))
        attrs[sc.RES_FRAMEWORK] = name
        attrs[sc.RES_FRAMEWORK_VERSION] = ver
    if not os.environ.get(sc.OTEL_SERVICE_NAME) and "service.name=" not in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        # the engine (vllm, transformers), not this tool: an APM lists services by this name
        attrs["service.name"] = next(iter(fw), "prism-otel")
    return Resource.create(attrs)


def detect_enabled() -> bool:
    return os.environ.get(sc.ENV_DETECT, "1") != "0"


def out_dir() -> str:
    return os.environ.get(sc.ENV_OUT_DIR) or os.path.join(os.getcwd(), "prism-out")


def summary_enabled() -> bool:
    return os.environ.get(sc.ENV_SUMMARY, "1") != "0"
