"""SLO targets, tags, attainment and burn rate; the in-process defaults built from the environment."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord, StepRecord
from processors.anomaly import AnomalyProcessor
from processors.defaults import in_process_processors
from processors.incidents import IncidentProcessor
from processors.slo import SLOConfig, SLOProcessor

MS = 1_000_000


def _req(i, ttft_ms, tpot_ms, n_out=11):
    t0 = 10**18 + i * 1000 * MS
    first = t0 + int(ttft_ms * MS)
    last = first + int(tpot_ms * (n_out - 1) * MS)
    return RequestRecord(instance="a", request_id=f"r{i}", arrival_ns=t0, end_ns=last, first_token_ns=first,
                         last_token_ns=last, prompt_tokens=100, output_tokens=n_out)


def _step(i, ms, phase="decode"):
    t0 = 10**18 + i * 100 * MS
    return StepRecord(instance="a", index=i, start_ns=t0, end_ns=t0 + int(ms * MS), phase=phase, batch_size=8,
                      prefill_tokens=0, decode_tokens=8)


def _gauges(reader):
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    out[(m.name, p.attributes.get(sc.SLO_TARGET))] = p.value
    return out


def test_requests_and_steps_are_tagged_and_attainment_reported():
    reader = InMemoryMetricReader()
    slo = SLOProcessor({"ttft_ms": 200, "tpot_ms": 50, "step_ms": 40, "objective": 0.9},
                       meter_provider=MeterProvider(metric_readers=[reader]))
    tagged = [slo.process_request(_req(i, ttft, tpot)) for i, (ttft, tpot) in
              enumerate([(100, 20)] * 7 + [(300, 20), (100, 80), (400, 90)])]
    assert [r.slo_violations for r in tagged[-3:]] == [("ttft",), ("tpot",), ("ttft", "tpot")]
    assert all(r.slo_violations == () for r in tagged[:7])
    steps = [slo.process(_step(i, 45 if i % 5 == 0 else 30)) for i in range(20)]
    assert [s.verdict.slo_violations for s in steps if s.verdict] == [("step",)] * 4
    assert slo.process(_step(99, 500, phase="prefill")).verdict is None  # prefill is not under the step target
    assert slo.attainment("request") == pytest.approx(0.7)
    assert slo.attainment("step") == pytest.approx(0.8)
    assert slo.burn_rate("request") == pytest.approx(3.0)  # 30% bad against a 10% budget
    g = _gauges(reader)
    assert g[(sc.METRIC_SLO_ATTAINMENT, "ttft")] == pytest.approx(0.8)
    assert g[(sc.METRIC_SLO_BURN_RATE, "step")] == pytest.approx(2.0)
    assert g[(sc.METRIC_SLO_VIOLATIONS, "tpot")] == 2


def test_attainment_window_rolls():
    slo = SLOProcessor({"step_ms": 10, "window_s": 1, "metrics": False})
    for i in range(10):
        slo.process(_step(i, 50))  # all bad, 100 ms apart
    late = [_step(100 + i, 5) for i in range(10)]  # 10 s later: all good
    for s in late:
        slo.process(s)
    assert slo.attainment("step") == 1.0
    assert slo.stats()["step"]["violations"] == 10


def test_slo_keeps_the_anomaly_verdict():
    slo = SLOProcessor({"step_ms": 10, "metrics": False})
    from prism_otel.pipeline import replace_verdict

    s = replace_verdict(_step(1, 50), anomaly=True, score=3.0, expected_ms=20.0)
    v = slo.process(s).verdict
    assert v.anomaly and v.expected_ms == 20.0 and v.slo_violations == ("step",)


@pytest.mark.parametrize("bad, key", [({"ttft_ms": -5}, "ttft_ms"), ({"objective": 1.5}, "objective"),
                                      ({"step_phases": "decode,warm"}, "step_phases"), ({"ttft": 5}, "ttft")])
def test_slo_config_errors_name_the_key(bad, key):
    with pytest.raises(ValueError) as e:
        SLOConfig.from_dict(bad)
    assert str(e.value).startswith(key + ":")


def test_defaults_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(sc.ENV_BASELINE_DIR, str(tmp_path))
    monkeypatch.setenv(sc.ENV_BASELINE_KEY, "model=tiny-llama,parallelism=tp1")
    monkeypatch.setenv(sc.ENV_ALERT_FILE, "none")
    monkeypatch.setenv(sc.ENV_DETECT_CONFIG, "alpha=0.001,min_train=300")
    monkeypatch.setenv(sc.ENV_SLO_TTFT_MS, "250")
    monkeypatch.delenv(sc.OTEL_METRICS_EXPORTER, raising=False)
    procs = in_process_processors()
    assert [type(p) for p in procs] == [AnomalyProcessor, SLOProcessor, IncidentProcessor]
    a, s, inc = procs
    # the detector's per-step alerts are off; PRISM_OTEL_ALERT_FILE configures the incidents
    assert (a.cfg.alpha, a.cfg.min_train, a.cfg.baseline_dir, a.cfg.alert_file) == (0.001, 300, str(tmp_path), "none")
    assert inc.cfg.stderr is False and not inc.cfg.file
    assert s.cfg.ttft_ms == 250.0 and s.cfg.tpot_ms is None
    # the key resolves on the first step (model given by the environment), the rest is detected
    a.process(_step(1, 10))
    assert a.baseline_key["model"] == "tiny-llama" and a.baseline_key["parallelism"] == "tp1"
    assert a.baseline_key["hardware"]


def test_no_fit_on_the_engines_interpreter(monkeypatch):
    """In an engine's own process every fit, the first one too, goes to the fit worker (fit_inline off); a
    companion, a process of its own, fits its first model inline so that it judges every later step."""
    monkeypatch.delenv(sc.ENV_ROLE, raising=False)
    a = in_process_processors()[0]
    try:
        assert a.cfg.fit_process and not a.cfg.fit_inline
    finally:
        a.shutdown()
    monkeypatch.setenv(sc.ENV_ROLE, sc.ROLE_COMPANION)
    a = in_process_processors()[0]
    try:
        assert a.cfg.fit_inline and not a.cfg.fit_process
    finally:
        a.shutdown()
    monkeypatch.setenv(sc.ENV_DETECT_CONFIG, "fit_inline=true")  # a user may still ask for it
    monkeypatch.delenv(sc.ENV_ROLE)
    a = in_process_processors()[0]
    try:
        assert a.cfg.fit_inline
    finally:
        a.shutdown()


def test_defaults_without_slo_targets_run_detection_only(monkeypatch):
    for v in (sc.ENV_SLO_TTFT_MS, sc.ENV_SLO_TPOT_MS, sc.ENV_SLO_STEP_MS):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.delenv(sc.OTEL_METRICS_EXPORTER, raising=False)
    assert [type(p) for p in in_process_processors()] == [AnomalyProcessor, IncidentProcessor]


@pytest.mark.parametrize("var, value", [(sc.ENV_DETECT_CONFIG, "alpha=-2"), (sc.ENV_DETECT_CONFIG, "oops"),
                                        (sc.ENV_BASELINE_KEY, "gpu=x"), (sc.ENV_SLO_STEP_MS, "fast")])
def test_bad_environment_names_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as e:
        in_process_processors()
    assert var in str(e.value) or "PRISM_OTEL_SLO_" in str(e.value)
