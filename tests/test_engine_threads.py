"""The engine process runs our hooks and no thread of ours, and no model is fitted in it.

A real transformers continuous-batching engine (tests/engines/cb_workload.py) counts its threads while
it serves, and names the detector modules it imported. Loaded by ``prism-otel run`` (OTLP to a real
sink, detection on with a first model due early), by the embedded default, and by
``opentelemetry-instrument``, it has exactly as many threads as the same engine without prism-otel;
the detector is never imported there, while the exported steps carry the detector's expectation: the
model was fitted, in the companion. (vLLM: tests/test_vllm.py; attach: tests/attach.)"""

from __future__ import annotations

import os

import pytest

from prism_otel import semconv as sc
from tests.otlp_sink import OTLPSink
from tests.test_core_transformers import BIN, run_workload

PRISM = (os.path.join(BIN, "prism-otel"), "run", "--")
OTEL = (os.path.join(BIN, "opentelemetry-instrument"),)
OTEL_ENV = dict(OTEL_TRACES_EXPORTER="otlp", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    report, _ = run_workload(tmp_path_factory.mktemp("plain"), "plain")
    return report


def test_prism_run_adds_no_thread_and_fits_nowhere_in_the_engine(tmp_path, plain):
    with OTLPSink() as sink:
        report, _ = run_workload(tmp_path, "run", prefix=PRISM, sink=sink,
                                 **{sc.ENV_DETECT_CONFIG: "min_train=20,refit_every=20"})
        spans = sink.wait_for(lambda s: any(sc.LATENCY_EXPECTED_MS in x.attributes for x in s), timeout=20)
    assert report["threads"] == plain["threads"], (report["thread_names"], plain["thread_names"])
    assert report["detector_modules"] == [], "the engine process imported the detector"
    judged = [s for s in spans if s.name == sc.STEP_SPAN and sc.LATENCY_EXPECTED_MS in s.attributes]
    assert judged, "no step was judged: the companion fitted no model"
    assert {s.resource.get("process.pid") for s in judged} == {report["pid"]}


def test_embedded_default_adds_no_thread(tmp_path, plain):
    report, _ = run_workload(tmp_path, "default", prefix=PRISM)
    assert list((tmp_path / "prism-out").glob("traces-*.jsonl"))
    assert report["threads"] == plain["threads"] and report["detector_modules"] == []


def test_opentelemetry_instrument_adds_no_thread(tmp_path):
    """Against opentelemetry-instrument without prism-otel (the SDK's own exporter thread is in both)."""
    with OTLPSink() as sink:
        without, _ = run_workload(tmp_path, "oi-off", prefix=OTEL, sink=sink, PRISM_OTEL_DISABLED="1", **OTEL_ENV)
        report, _ = run_workload(tmp_path, "oi", prefix=OTEL, sink=sink, **OTEL_ENV)
        sink.wait_for(lambda s: any(x.name == sc.STEP_SPAN for x in s), timeout=20)
    assert report["threads"] == without["threads"], (report["thread_names"], without["thread_names"])
    assert report["detector_modules"] == []
