"""The metrics processor on an SDK MeterProvider (in-memory reader): exact totals, buckets that resolve
ms steps, the stage sample, the GenAI request histograms; exporters chosen from OTEL_METRICS_EXPORTER.
The real Prometheus path is tests/test_prometheus.py."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from prism_otel import metrics as pm
from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord, Verdict


def _points(reader):
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out[m.name] = list(m.data.data_points)
    return out


def test_totals_are_exact_and_buckets_resolve_ms():
    reader = InMemoryMetricReader()
    m = pm.StepMetrics(MeterProvider(metric_readers=[reader]), provider_name="t", stage_sample=8)
    t = 10**18
    n = 1000
    for i in range(n):
        d = 2_000_000 + (i % 3) * 1_000_000  # 2, 3, 4 ms
        m.process(StepRecord(instance="h:1", index=i, start_ns=t, end_ns=t + d, phase="decode", batch_size=4,
                             prefill_tokens=0, decode_tokens=4, stages={"forward": (t, t + d - 500_000),
                                                                        "update": (t + d - 500_000, t + d)},
                             verdict=Verdict(expected_ms=2.5, anomaly=i % 100 == 0,
                                             root_cause="gc" if i % 100 == 0 else None) if i >= 200 else None))
        t += d
    m.process_request(RequestRecord(instance="h:1", request_id="r", arrival_ns=0, end_ns=10**9,
                                    first_scheduled_ns=10**7, first_token_ns=5 * 10**7, last_token_ns=9 * 10**8,
                                    output_tokens=11))
    m.shutdown()
    p = _points(reader)
    steps = {tuple(sorted(x.attributes.items())): x.value for x in p[sc.METRIC_STEPS]}
    assert steps == {((sc.JUDGED, "false"), (sc.STEP_PHASE, "decode")): 200,
                     ((sc.JUDGED, "true"), (sc.STEP_PHASE, "decode")): 800}
    assert sum(x.value for x in p[sc.METRIC_TOKENS]) == 4 * n
    assert sum(x.value for x in p[sc.METRIC_ANOMALY_COUNT]) == 8
    assert p[sc.METRIC_STEP_EXPECTED_TIME][0].value == pytest.approx(800 * 0.0025)
    stage_time = {x.attributes[sc.STAGE_NAME]: x.value for x in p[sc.METRIC_STAGE_TIME]}
    assert stage_time["update"] == pytest.approx(n * 0.0005)
    (h,) = p[sc.METRIC_STEP_DURATION]
    assert h.count == n and list(h.explicit_bounds)[:4] == [0.0005, 0.001, 0.0015, 0.002]
    assert sum(h.bucket_counts[:4]) == 334 and max(h.bucket_counts) < n  # 2 ms steps in the <= 2 ms bucket
    assert {x.count for x in p[sc.METRIC_STAGE_DURATION]} == {n // 8}
    assert p[sc.METRIC_LATENCY_RATIO][0].count == 800
    assert p[sc.METRIC_TTFT][0].count == 1 and p[sc.METRIC_TTFT][0].sum == pytest.approx(0.05)
    assert p[sc.METRIC_TPOT][0].sum == pytest.approx(0.085)


def test_exporters_from_the_standard_variable(monkeypatch):
    for k in (sc.OTEL_METRICS_EXPORTER, sc.OTEL_TRACES_EXPORTER, sc.OTEL_EXPORTER_OTLP_ENDPOINT,
              sc.OTEL_EXPORTER_OTLP_METRICS_ENDPOINT):
        monkeypatch.delenv(k, raising=False)
    assert pm._exporter_names() == []  # the embedded default: no metrics exporter
    monkeypatch.setenv(sc.OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4317")
    assert pm._exporter_names() == ["otlp"]
    monkeypatch.setenv(sc.OTEL_METRICS_EXPORTER, "console, none")
    assert pm._exporter_names() == ["console"]
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    r = pm._reader("console")
    assert isinstance(r, PeriodicExportingMetricReader)
    r.shutdown()
    with pytest.raises(ValueError, match="unknown exporter"):
        pm._reader("nope")
