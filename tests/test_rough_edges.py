"""The rough edges of issue 25: CLI, service name, rotation, the vLLM plugin's opt-in, DeepDive steps,
Dynamo forward-pass fields, gen_ai.latency.* keys, ERROR status on anomalous step spans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel import ecosystem
from prism_otel import semconv as sc
from prism_otel.export import OTLPJSONFileExporter
from prism_otel.record import RequestRecord, StepRecord, Verdict
from prism_otel.spans import SpanMaterializer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "prism_otel", *args], capture_output=True, text=True, env=e,
                          timeout=120)


def test_version_and_run_help():
    from prism_otel import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"prism-otel {__version__}"
    r = _cli("run", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: prism-otel run") and "OTEL_METRICS_EXPORTER" in r.stdout
    # after `--`, --help is the command's own
    r = _cli("run", "--", sys.executable, "-c", "import sys; print(sys.argv[1:])", "--help", env={"PRISM_OTEL_DISABLED": "1"})
    assert r.returncode == 0 and r.stdout.strip() == "['--help']"


def test_service_name_defaults_to_the_engine(monkeypatch):
    from prism_otel import config

    monkeypatch.delenv(sc.OTEL_SERVICE_NAME, raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert config.resource(fw={"transformers": "5.25.0"}).attributes["service.name"] == "transformers"
    assert config.resource(fw={"vllm": "0.32.0"}).attributes["service.name"] == "vllm"
    monkeypatch.setenv(sc.OTEL_SERVICE_NAME, "my-llm")
    assert config.resource(fw={"vllm": "0.32.0"}).attributes["service.name"] == "my-llm"
    monkeypatch.delenv(sc.OTEL_SERVICE_NAME)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs")
    assert config.resource(fw={"vllm": "0.32.0"}).attributes["service.name"] == "from-attrs"


def _mat():
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    return SpanMaterializer(tp, model_name="tiny"), exp


def test_embedded_default_rotates_and_caps(tmp_path):
    from prism_otel.otlp_encode import OTLPSink

    # the embedded default as the companion builds it: the OTLP encoder handing request bytes to the
    # rotating file exporter, one span per request here
    exp = OTLPJSONFileExporter(str(tmp_path), "traces-7.jsonl", max_bytes=20_000, keep=3)
    m = OTLPSink({"service.name": "t"}, [exp], batch_spans=1)
    for i in range(400):
        m.step(StepRecord(instance="h:7", index=i, start_ns=10**18 + i * 10**6, end_ns=10**18 + i * 10**6 + 5 * 10**5,
                          phase="decode", batch_size=2, prefill_tokens=0, decode_tokens=2))
    m.shutdown()
    files = sorted(os.listdir(tmp_path))
    assert files == ["traces-7.1.jsonl", "traces-7.2.jsonl", "traces-7.jsonl"] and exp.rotations > 3
    assert all(os.path.getsize(tmp_path / f) <= 20_000 for f in files)
    for f in files:  # every kept line is a whole export request
        for line in open(tmp_path / f):
            assert json.loads(line)["resourceSpans"]


def test_vllm_plugin_starts_only_when_asked(monkeypatch):
    from prism_otel.instrumentation.vllm import plugin

    for k in (sc.ENV_BOOTSTRAP_ACTIVE, sc.OTEL_TRACES_EXPORTER, sc.OTEL_EXPORTER_OTLP_ENDPOINT,
              sc.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, sc.ENV_OUT_DIR, sc.ENV_VLLM_PLUGIN):
        monkeypatch.delenv(k, raising=False)
    assert not plugin.asked()
    for k, v in ((sc.ENV_BOOTSTRAP_ACTIVE, "1"), (sc.OTEL_EXPORTER_OTLP_ENDPOINT, "http://127.0.0.1:4317"),
                 (sc.ENV_OUT_DIR, "/tmp/x"), (sc.ENV_VLLM_PLUGIN, "1")):
        monkeypatch.setenv(k, v)
        assert plugin.asked(), k
        monkeypatch.delenv(k)


def test_deepdive_steps_are_not_judged():
    from processors.anomaly import AnomalyProcessor

    p = AnomalyProcessor({"background": False, "alert_file": "none", "alert_log": False, "min_train": 50})
    t = 10**18
    out = None
    for i in range(300):
        deep = i == 299
        s = StepRecord(instance="h:1", index=i, start_ns=t, end_ns=t + (30 if deep else 3) * 10**6, phase="decode",
                       batch_size=4, prefill_tokens=0, decode_tokens=4, context_tokens=400 + i,
                       attributes={sc.DEEPDIVE: True} if deep else {})
        out = p.process(s)
        t += 4 * 10**6
    assert out.verdict is None and p.bad.get("deepdive") == 1


def test_ecosystem_fields_on_spans(monkeypatch):
    monkeypatch.setattr(ecosystem, "_ERROR", True)
    mat, exp = _mat()
    t = 10**18
    dec = StepRecord(instance="h:1", index=1, start_ns=t, end_ns=t + 3 * 10**6, phase="decode", batch_size=3,
                     prefill_tokens=0, decode_tokens=3, context_tokens=300, attributes={sc.BATCH_WAITING: 2},
                     verdict=Verdict(expected_ms=1.0, anomaly=True, root_cause="stage.update", test="window"))
    pre = StepRecord(instance="h:1", index=2, start_ns=t, end_ns=t + 10**6, phase="prefill", batch_size=2,
                     prefill_tokens=50, decode_tokens=0, context_tokens=70, verdict=Verdict(expected_ms=1.0))
    mat.step(dec)
    mat.step(pre)
    h = mat.open_request("r1", t, prompt_tokens=10)
    mat.close_request(h, RequestRecord(instance="h:1", request_id="r1", arrival_ns=t, end_ns=t + 5 * 10**8,
                                       first_scheduled_ns=t + 10**8, first_token_ns=t + 2 * 10**8,
                                       last_token_ns=t + 4 * 10**8, output_tokens=5), [], 3)
    spans = {s.name + str(s.attributes.get(sc.STEP_INDEX, "")): s for s in exp.get_finished_spans()}
    S, Q = sc.FPM_PREFIX + sc.FPM_SCHEDULED, sc.FPM_PREFIX + sc.FPM_QUEUED
    d = spans["prism.step1"]
    assert d.attributes[S + "num_decode_requests"] == 3 and d.attributes[S + "sum_decode_kv_tokens"] == 300
    assert d.attributes[S + "num_prefill_requests"] == 0 and d.attributes[Q + "num_prefill_requests"] == 2
    assert d.status.status_code.name == "ERROR" and "3.0x" in d.status.description and "stage.update" in d.status.description
    p = spans["prism.step2"]
    assert p.attributes[S + "num_prefill_requests"] == 2 and p.attributes[S + "sum_prefill_tokens"] == 50
    assert p.attributes[S + "sum_prefill_kv_tokens"] == 20 and p.status.status_code.name == "UNSET"
    r = spans["text_completion tiny"]
    assert r.attributes[sc.GEN_AI_REQUEST_MODEL] == "tiny"
    assert r.attributes["gen_ai.latency.time_in_queue"] == pytest.approx(0.1)
    assert r.attributes["gen_ai.latency.time_to_first_token"] == pytest.approx(0.2)
    assert r.attributes["gen_ai.latency.e2e"] == pytest.approx(0.5)
    assert r.attributes["gen_ai.latency.time_in_model_prefill"] == pytest.approx(0.1)
    assert r.attributes["gen_ai.latency.time_in_model_decode"] == pytest.approx(0.2)
    assert r.attributes["gen_ai.latency.time_in_model_inference"] == pytest.approx(0.3)


def test_no_error_status_by_default(monkeypatch):
    monkeypatch.setattr(ecosystem, "_ERROR", False)
    mat, exp = _mat()
    mat.step(StepRecord(instance="h:1", index=1, start_ns=10**18, end_ns=10**18 + 3 * 10**6, phase="decode",
                        batch_size=1, prefill_tokens=0, decode_tokens=1, verdict=Verdict(expected_ms=1.0, anomaly=True)))
    assert exp.get_finished_spans()[0].status.status_code.name == "UNSET"
