"""Metrics through the OpenTelemetry metrics API: what a dashboard and an alert rule need.

Spans are for looking at one step; at hundreds of steps a second they are the wrong unit for a
dashboard. :class:`StepMetrics` is a processor (it runs last, after detection and incidents, on the
pipeline thread, in-process or in the companion) that turns every ``StepRecord`` and finished
``RequestRecord`` into a few instrument updates:

=============================================  =========  =============================================
instrument (OTel name)                         kind       attributes
=============================================  =========  =============================================
``prism.step.duration`` (s)                    histogram  ``prism.step.phase``
``prism.stage.duration`` (s)                   histogram  ``prism.stage.name`` (1 step in ``stage_sample``)
``prism.stage.time`` (s)                       counter    ``prism.stage.name`` (every step)
``prism.step.latency_ratio`` (observed/exp.)   histogram  ``prism.step.phase`` (judged steps)
``prism.step.time`` / ``prism.step.expected_time`` (s)  counter  ``prism.step.phase`` (judged steps)
``prism.steps``                                counter    ``prism.step.phase``, ``prism.judged``
``prism.anomaly.count``                        counter    ``prism.step.phase``, ``prism.anomaly.root_cause``
``prism.incidents`` / ``prism.incidents.open`` counter / up-down  ``prism.anomaly.root_cause``
``prism.tokens``                               counter    ``prism.token.type`` (prefill, decode)
``prism.requests``                             counter    ``prism.request.status``
``gen_ai.server.time_to_first_token`` (s)      histogram  ``gen_ai.operation.name``, ``gen_ai.provider.name``
``gen_ai.server.time_per_output_token`` (s)    histogram  same
``gen_ai.server.request.duration`` (s)         histogram  same
=============================================  =========  =============================================

Cost: an SDK instrument update costs about 7 us here, and this runs once per step on the pipeline
thread (in-process, that thread shares the interpreter lock with the engine). So counters are summed
here and added to their instruments about twice a second (``flush_s`` of step time, and at shutdown),
the step and ratio histograms get one record per step, and the stage histogram records the stages of
one step in ``stage_sample`` (``PRISM_OTEL_METRICS_STAGE_SAMPLE``, 8: its counts are a sample, for
percentiles; ``prism.stage.time`` has every step's stage time). bench/reporting_cost.py measures it.

(plus ``prism.slo.attainment`` / ``prism.slo.burn_rate`` gauges from :mod:`processors.slo` and
``prism.dropped`` from the pipeline). Histogram bounds are given as the API's advisory explicit
buckets, so they hold in any SDK ``MeterProvider``: steps resolve from 0.5 ms (the SDK's default
bounds are meant for milliseconds and would put every step of a second-based histogram into its first
bucket); the GenAI histograms use the bounds the GenAI semantic conventions recommend.

Where the metrics go: the application's own ``MeterProvider`` when it set one (e.g. under
``opentelemetry-instrument``), else one of ours built from the standard ``OTEL_METRICS_EXPORTER``
(``otlp``, ``prometheus``, ``console``, ``none``, a comma list, or any ``opentelemetry_metrics_exporter``
entry point). Unset, it is ``otlp`` when spans go over OTLP and ``none`` with the embedded default.
``prometheus`` serves ``/metrics`` on ``OTEL_EXPORTER_PROMETHEUS_HOST:OTEL_EXPORTER_PROMETHEUS_PORT``
(localhost:9464) from the process that runs the pipeline. docs/metrics.md has the Prometheus names.
"""

from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import entry_points
from typing import Optional

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord

logger = logging.getLogger(__name__)

STEP_BUCKETS_S = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                  0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGE_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
RATIO_BUCKETS = (0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 2.0, 3.0, 5.0, 10.0)
# GenAI semantic conventions (gen-ai-metrics.md): the recommended explicit bucket boundaries
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

_lock = threading.Lock()
_ours = None  # the MeterProvider we installed, if any


def service_name() -> str:
    """``service.name``: ``OTEL_SERVICE_NAME`` (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``), else
    the engine (``vllm``, ``transformers``), so an APM lists engines, not this tool."""
    v = os.environ.get(sc.OTEL_SERVICE_NAME, "").strip()
    if v:
        return v
    for part in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        k, _, val = part.partition("=")
        if k.strip() == sc.RES_SERVICE_NAME and val.strip():
            return val.strip()
    from prism_otel import config

    return config.framework_name()


def _exporter_names() -> list:
    names = os.environ.get(sc.OTEL_METRICS_EXPORTER, "").strip()
    if not names:
        traces = os.environ.get(sc.OTEL_TRACES_EXPORTER, "").lower()
        if "otlp" in traces or os.environ.get(sc.OTEL_EXPORTER_OTLP_ENDPOINT) or \
                os.environ.get(sc.OTEL_EXPORTER_OTLP_METRICS_ENDPOINT):
            names = "otlp"
    return [n.strip().lower() for n in names.split(",") if n.strip() and n.strip().lower() != "none"]


def _reader(name: str):
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    if name == "otlp":
        proto = (os.environ.get(sc.OTEL_EXPORTER_OTLP_METRICS_PROTOCOL) or os.environ.get(sc.OTEL_EXPORTER_OTLP_PROTOCOL)
                 or "grpc").strip().lower()
        name = "otlp_proto_http" if proto.startswith("http") else "otlp_proto_grpc"
    for ep in entry_points(group="opentelemetry_metrics_exporter"):
        if ep.name == name:
            obj = ep.load()()
            if isinstance(obj, MetricReader):
                return obj  # prometheus: a pull reader serving /metrics
            return PeriodicExportingMetricReader(obj)  # OTEL_METRIC_EXPORT_INTERVAL (ms) applies
    if name == "prometheus":
        raise ValueError("OTEL_METRICS_EXPORTER=prometheus needs the opentelemetry-exporter-prometheus package "
                         "(pip install 'prism-otel[prometheus]')")
    raise ValueError(f"{sc.OTEL_METRICS_EXPORTER}: unknown exporter {name!r}")


def ensure_meter_provider():
    """The SDK MeterProvider the metrics go to: the application's when it set one, else ours, built once
    from ``OTEL_METRICS_EXPORTER`` (None when that names no exporter: the API's no-op then)."""
    global _ours
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider

    with _lock:
        if _ours is not None:
            return _ours
        glob = metrics.get_meter_provider()
        if isinstance(glob, MeterProvider):
            return glob
        readers = []
        for n in _exporter_names():
            try:
                readers.append(_reader(n))
            except Exception as exc:  # noqa: BLE001 - one bad name is reported, the others still work
                logger.error("prism-otel: cannot create metrics exporter %r: %s", n, exc)
        if not readers:
            return None
        from prism_otel import config

        # the engine's resource (in the companion: the engine process's pid and instance, as its spans)
        _ours = MeterProvider(metric_readers=readers, resource=config.resource(config.engine_pid()))
        metrics.set_meter_provider(_ours)
        return _ours


def metrics_processor(meter_provider=None) -> Optional[StepMetrics]:
    """The metrics processor for this process, or None when metrics go nowhere."""
    try:
        provider = meter_provider or ensure_meter_provider()
    except Exception:  # noqa: BLE001 - metrics must never stop tracing from starting
        logger.warning("prism-otel: metrics unavailable", exc_info=True)
        return None
    if provider is None:
        return None
    return StepMetrics(provider)


class StepMetrics:
    """A processor (duck-typed :class:`processors.base.StepProcessor`) recording every step and request."""

    name = "metrics"

    def __init__(self, meter_provider, provider_name: Optional[str] = None, stage_sample: Optional[int] = None,
                 flush_s: float = 0.5) -> None:
        from prism_otel.version import __version__

        m = meter_provider.get_meter(sc.SCOPE, __version__)
        self._step = m.create_histogram(sc.METRIC_STEP_DURATION, unit="s", description="engine step latency",
                                        explicit_bucket_boundaries_advisory=STEP_BUCKETS_S)
        self._stage = m.create_histogram(sc.METRIC_STAGE_DURATION, unit="s",
                                         description="host stage latency (a sample of the steps)",
                                         explicit_bucket_boundaries_advisory=STAGE_BUCKETS_S)
        self._ratio = m.create_histogram(sc.METRIC_LATENCY_RATIO, unit="1",
                                         description="step latency over the latency expected for its workload",
                                         explicit_bucket_boundaries_advisory=RATIO_BUCKETS)
        counters = {
            "stage_time": m.create_counter(sc.METRIC_STAGE_TIME, unit="s", description="host stage time"),
            "observed": m.create_counter(sc.METRIC_STEP_TIME, unit="s", description="step time of judged steps"),
            "expected": m.create_counter(sc.METRIC_STEP_EXPECTED_TIME, unit="s",
                                         description="step time the detector expected for the judged steps"),
            "steps": m.create_counter(sc.METRIC_STEPS, unit="{step}", description="engine steps"),
            "anomalies": m.create_counter(sc.METRIC_ANOMALY_COUNT, unit="{step}", description="anomalous steps"),
            "tokens": m.create_counter(sc.METRIC_TOKENS, unit="{token}", description="tokens computed by steps"),
            "requests": m.create_counter(sc.METRIC_REQUESTS, unit="{request}", description="finished requests"),
        }
        self._counters = counters
        self._pending: dict = {}  # (counter name, frozen attributes) -> amount not added yet
        self._incidents = m.create_counter(sc.METRIC_INCIDENTS, unit="{incident}", description="incidents opened")
        self._open = m.create_up_down_counter(sc.METRIC_INCIDENTS_OPEN, unit="{incident}",
                                              description="incidents open now")
        self._ttft = m.create_histogram(sc.METRIC_TTFT, unit="s", description="time to first token",
                                        explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S)
        self._tpot = m.create_histogram(sc.METRIC_TPOT, unit="s", description="time per output token",
                                        explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S)
        self._dur = m.create_histogram(sc.METRIC_REQUEST_DURATION, unit="s", description="request duration",
                                       explicit_bucket_boundaries_advisory=REQUEST_BUCKETS_S)
        if provider_name is None:
            from prism_otel import config

            provider_name = config.framework_name()
        if stage_sample is None:
            try:
                stage_sample = int(os.environ.get(sc.ENV_METRICS_STAGE_SAMPLE, "8"))
            except ValueError:
                logger.warning("prism-otel: %s is not an integer; using 8", sc.ENV_METRICS_STAGE_SAMPLE)
                stage_sample = 8
        self.stage_sample = max(1, stage_sample)
        self.flush_ns = int(flush_s * 1e9)
        self._next_flush = 0
        self._n = 0
        self._lock = threading.Lock()
        self._req_attrs = {sc.GEN_AI_OPERATION_NAME: sc.GEN_AI_OPERATION_TEXT_COMPLETION,
                           sc.GEN_AI_PROVIDER_NAME: provider_name}
        self._phase_attrs = {p: {sc.STEP_PHASE: p} for p in sc.PHASES}
        self._stage_attrs: dict = {}

    def _add(self, name: str, amount, attrs: tuple) -> None:
        key = (name, attrs)
        p = self._pending
        p[key] = p.get(key, 0) + amount

    def flush(self) -> None:
        """Add what the counters summed to their instruments."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for (name, attrs), amount in pending.items():
            self._counters[name].add(amount, dict(attrs))

    def process(self, step: StepRecord) -> StepRecord:
        phase = step.phase
        pa = self._phase_attrs.get(phase) or {sc.STEP_PHASE: phase}
        pkey = ((sc.STEP_PHASE, phase),)
        dur_s = (step.end_ns - step.start_ns) / 1e9
        self._step.record(dur_s, pa)
        self._n += 1
        sample = self._n % self.stage_sample == 0
        add = self._add
        for name, (a, b) in step.stages.items():
            add("stage_time", (b - a) / 1e9, ((sc.STAGE_NAME, name),))
            if sample:
                sa = self._stage_attrs.get(name)
                if sa is None:
                    sa = self._stage_attrs[name] = {sc.STAGE_NAME: name}
                self._stage.record((b - a) / 1e9, sa)
        v = step.verdict
        exp_ms = v.expected_ms if v is not None else None
        judged = exp_ms is not None and exp_ms > 0
        add("steps", 1, ((sc.STEP_PHASE, phase), (sc.JUDGED, "true" if judged else "false")))
        if v is not None and exp_ms is not None and exp_ms > 0:  # judged
            exp_s = exp_ms / 1e3
            self._ratio.record(dur_s / exp_s, pa)
            add("observed", dur_s, pkey)
            add("expected", exp_s, pkey)
            if v.anomaly:
                add("anomalies", 1, ((sc.STEP_PHASE, phase), (sc.ANOMALY_ROOT_CAUSE, v.root_cause or "unknown")))
        if step.prefill_tokens:
            add("tokens", step.prefill_tokens, ((sc.TOKEN_TYPE, "prefill"),))
        if step.decode_tokens:
            add("tokens", step.decode_tokens, ((sc.TOKEN_TYPE, "decode"),))
        if step.end_ns >= self._next_flush:
            self._next_flush = step.end_ns + self.flush_ns
            self.flush()
        return step

    def process_request(self, rec: RequestRecord) -> RequestRecord:
        attrs = self._req_attrs
        self._add("requests", 1, ((sc.REQUEST_STATUS, rec.status),))
        self._dur.record(max(0.0, rec.duration_ms) / 1e3, attrs)
        if rec.ttft_ms is not None:
            self._ttft.record(max(0.0, rec.ttft_ms) / 1e3, attrs)
        if rec.tpot_ms is not None:
            self._tpot.record(max(0.0, rec.tpot_ms) / 1e3, attrs)
        return rec

    def on_incident(self, event: dict) -> None:
        cause = event["incident"].get("root_cause") or "unknown"
        if event["event"] == sc.INCIDENT_EVENT_OPEN:
            self._incidents.add(1, {sc.ANOMALY_ROOT_CAUSE: cause})
            self._open.add(1)
        else:
            self._open.add(-1)

    def shutdown(self) -> None:
        self.flush()
