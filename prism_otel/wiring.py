"""The composition root: what a pipeline is made of, read from the environment, in one place.

The companion process (:mod:`prism_otel.companion`) and an in-process pipeline (:mod:`prism_otel._runtime`)
build their span sink, their processor chain and the pipeline itself here, so both run the same
components with the same limits:

* :func:`span_sink`: the OTLP encoder and the exporters the ``OTEL_*`` variables name (or SDK spans
  when an exporter comes from an SDK entry point), the sampler and the anomaly-aware export policy;
* :func:`processor_chain`: the registered processor components (:mod:`processors.registry`) for a role:
  detection, SLO, incidents and metrics where detection runs, then the device processors;
* :func:`pipeline`: a :class:`~prism_otel.pipeline.Pipeline` on a ring reader with the configured limits.

Imports of what is optional or heavy (the exporters, the processors package) stay inside the functions:
a process that only records never loads them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Callable, Optional

from prism_otel import config
from prism_otel import semconv as sc

logger = logging.getLogger(__name__)


def span_sink(engine_pid: int, telemetry, limits: dict) -> tuple:
    """(the span sink, whether it is the embedded default, the SDK provider it owns or None)."""
    from prism_otel import export, sampling
    from prism_otel.otlp_encode import OTLPSink
    from prism_otel.version import __version__

    res = config.resource(engine_pid)
    byte_exps, sdk_exps, embedded = export.exporters_from_env(engine_pid, telemetry)
    sampler, window = sampling.from_env()
    batch = export.BatchSettings.from_env()
    if not sdk_exps:
        sink = OTLPSink(dict(res.attributes), byte_exps, sc.SCOPE, __version__, limits["max_step_links"],
                        limits["max_request_links"], None, config.framework_name(), sampler, window,
                        batch.batch_spans, batch.delay_s, batch.max_queue_spans, batch_bytes=batch.batch_bytes)
        return sink, embedded, None
    # An SDK exporter from an entry point: SDK spans for every exporter (the slower path, documented).
    from prism_otel.sdk_sink import sdk_sink

    return sdk_sink(res, sampler, sdk_exps, byte_exps, limits) + (None,)


def processor_chain(role: str, model_name: Optional[Callable[[], Optional[str]]] = None, deepdive=None,
                    detect: bool = True) -> list:
    """The registered processor components a pipeline of ``role`` runs (:func:`processors.defaults.processor_chain`).
    ``deepdive``: what the device processor triggers (the companion's :class:`~prism_otel.companion.RemoteDeepDive`);
    ``detect``: False leaves out detection (an in-process pipeline: a model fit must never run in the
    engine's interpreter). Empty where the processors package is absent (a trimmed install)."""
    try:
        from processors.defaults import processor_chain as chain
        from processors.factory import Context
    except ImportError:
        return []
    return chain(Context(role=role, model_name=model_name, deepdive=deepdive), detect=detect)


def pipeline(reader, instance: str, processors: Sequence, sink, limits: Optional[dict] = None):
    """A pipeline on ``reader`` with the configured limits (``limits``: :func:`prism_otel.config.pipeline_limits`)."""
    from prism_otel.pipeline import Pipeline

    return Pipeline(reader, None, instance, list(processors), sink=sink,
                    **(config.pipeline_limits() if limits is None else limits), provider_name=config.framework_name())
