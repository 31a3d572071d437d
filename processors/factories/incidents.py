"""``prism_incidents``: anomalous steps grouped into incidents and delivered
(:class:`processors.incidents.IncidentProcessor`; docs/alerting.md). After detection, wherever it runs.

In-process: ``PRISM_OTEL_ALERT_FILE``, ``PRISM_OTEL_ALERT_WEBHOOK``, ``PRISM_OTEL_ALERTMANAGER_URL`` and
``PRISM_OTEL_INCIDENT_CONFIG`` (``key=value,...``). In the collector one log serves many engines
(``log_per_engine`` false: ``incidents-<collector pid>.jsonl``).
"""

from __future__ import annotations

from typing import Any

from prism_otel import semconv as sc
from processors.factory import ORDER_INCIDENTS, Context, ProcessorFactory
from processors.incidents import IncidentConfig, IncidentProcessor, incident_config_from_env


def from_env(context: Context) -> dict[str, Any]:
    return incident_config_from_env()


def create(config: IncidentConfig, context: Context) -> IncidentProcessor:
    if not context.in_process:
        return IncidentProcessor(config)
    from prism_otel import metrics

    return IncidentProcessor(config, service=metrics.service_name())


factory = ProcessorFactory(
    "prism_incidents", IncidentConfig, create, from_env=from_env, order=ORDER_INCIDENTS, needs_detection=True,
    env=f"{sc.ENV_INCIDENT_CONFIG} (or {sc.ENV_ALERT_FILE}, {sc.ENV_ALERT_WEBHOOK}, {sc.ENV_ALERTMANAGER_URL})",
    collector_defaults={"log_per_engine": False})
