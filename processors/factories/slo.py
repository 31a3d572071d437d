"""``prism_slo``: TTFT / TPOT / step targets (:class:`processors.slo.SLOProcessor`).

In-process it runs when a target is set: ``PRISM_OTEL_SLO_TTFT_MS``, ``PRISM_OTEL_SLO_TPOT_MS``,
``PRISM_OTEL_SLO_STEP_MS`` (and ``PRISM_OTEL_SLO_OBJECTIVE``, ``PRISM_OTEL_SLO_WINDOW_S``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from prism_otel import semconv as sc
from processors.factory import ORDER_SLO, Context, ProcessorFactory
from processors.slo import SLOConfig, SLOProcessor

_ENV = {"ttft_ms": sc.ENV_SLO_TTFT_MS, "tpot_ms": sc.ENV_SLO_TPOT_MS, "step_ms": sc.ENV_SLO_STEP_MS,
        "objective": sc.ENV_SLO_OBJECTIVE, "window_s": sc.ENV_SLO_WINDOW_S}


def from_env(context: Context) -> Optional[dict[str, Any]]:
    cfg = {k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v)}
    if not any(k in cfg for k in ("ttft_ms", "tpot_ms", "step_ms")):
        return None
    return cfg


def create(config: SLOConfig, context: Context) -> SLOProcessor:
    return SLOProcessor(config)


factory = ProcessorFactory("prism_slo", SLOConfig, create, from_env=from_env, env=", ".join(_ENV.values()),
                           order=ORDER_SLO, needs_detection=True)
