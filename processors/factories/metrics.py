"""``prism_metrics``: step, stage and request metrics and the incidents' counters
(:class:`prism_otel.metrics.StepMetrics`), in-process only, where a metrics exporter is configured
(``OTEL_METRICS_EXPORTER``; nothing is built otherwise). The collector has telemetry of its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from processors.factory import ORDER_METRICS, Context, ProcessorFactory
from processors.incidents import IncidentProcessor


@dataclass
class MetricsConfig:
    """No keys: the OTel metrics variables configure the exporter."""


def from_env(context: Context) -> dict[str, Any]:
    return {}


def create(config: MetricsConfig, context: Context) -> Any:
    from prism_otel import metrics

    m = metrics.metrics_processor()
    if m is None:
        return None  # metrics go nowhere
    for p in context.built:
        if isinstance(p, IncidentProcessor):
            p.on_event = m.on_incident  # incidents opened and closed are counted
    return m


factory = ProcessorFactory("prism_metrics", MetricsConfig, create, from_env=from_env, order=ORDER_METRICS,
                           needs_detection=True, collector=False)
