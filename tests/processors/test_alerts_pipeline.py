"""Verdicts and alerts through the real in-process pipeline, and the alert sinks (file, webhook)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel import semconv as sc
from prism_otel.pipeline import Pipeline
from prism_otel.record import StepFeatures, clock_ns
from prism_otel.recorder import Recorder
from processors.alerts import AlertSink
from processors.anomaly import AnomalyProcessor
from tests.processors.streams import EPISODES, shapes_stream


def _feed(rec: Recorder, steps, t_base: int) -> None:
    s0 = steps[0].start_ns
    for i, s in enumerate(steps):
        t0 = t_base + (s.start_ns - s0)
        t1 = t0 + (s.end_ns - s.start_ns)
        stages = tuple((n, t0 + (a - s.start_ns), t0 + (b - s.start_ns)) for n, (a, b) in s.stages.items())
        feat = StepFeatures(s.phase, s.batch_size, s.prefill_tokens, s.decode_tokens, s.context_tokens,
                            s.max_context_tokens)
        rec.step(i, t0, t1, feat, (), None, stages)


def test_verdicts_and_alerts_on_step_spans(tmp_path):
    s = shapes_stream()
    alerts_file = tmp_path / "alerts.jsonl"
    proc = AnomalyProcessor({"background": False, "alert_file": str(alerts_file), "alert_log": True})
    proc.train(s.train)
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    rec = Recorder(1 << 16)
    pipe = Pipeline(rec, tp, "inproc", [proc])
    window = s.steps[:1400]  # spike, 10% slowdown, 100% slowdown and the stall
    _feed(rec, window, clock_ns() - 10**12)
    pipe.process_pending()
    pipe.stop()
    steps = [sp for sp in exp.get_finished_spans() if sp.name == sc.STEP_SPAN]
    assert len(steps) == len(window)
    for sp in steps:
        assert sc.ANOMALY in sp.attributes and sc.LATENCY_EXPECTED_MS in sp.attributes
        assert sc.ANOMALY_SCORE in sp.attributes
    flagged = [sp for sp in steps if sp.attributes[sc.ANOMALY]]
    with_alert = [sp for sp in steps if any(e.name == sc.ALERT_EVENT for e in sp.events)]
    assert len(with_alert) == 4 == proc.alerts  # one per episode in the window
    assert len(flagged) > 150
    stall = EPISODES[3]
    causes = [sp.attributes.get(sc.ANOMALY_ROOT_CAUSE) for sp in steps
              if stall.start <= sp.attributes[sc.STEP_INDEX] - 1 < stall.start + stall.length
              and sp.attributes[sc.ANOMALY]]
    assert causes.count("stage." + stall.stage) >= 0.9 * len(causes)
    lines = [json.loads(x) for x in alerts_file.read_text().splitlines()]
    assert len(lines) == 4
    assert {line["event"] for line in lines} == {sc.ALERT_EVENT}
    first = lines[0]
    assert first[sc.STEP_INSTANCE] == "inproc" and first[sc.ANOMALY_SCORE] >= 1.0
    assert first[sc.STEP_DURATION_MS] > first[sc.LATENCY_EXPECTED_MS]


class _Hook(BaseHTTPRequestHandler):
    got: list = []
    gate: threading.Event = threading.Event()

    def do_POST(self):  # noqa: N802 - http.server's name
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        self.gate.wait(10)
        type(self).got.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def _server():
    srv = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_webhook_receives_alerts():
    _Hook.got = []
    _Hook.gate.set()
    srv = _server()
    try:
        sink = AlertSink(log=False, file="none", webhook=f"http://127.0.0.1:{srv.server_port}/hook")
        sink.emit({"event": sc.ALERT_EVENT, "n": 1})
        sink.emit({"event": sc.ALERT_EVENT, "n": 2})
        sink.close(5.0)
        assert [g["n"] for g in _Hook.got] == [1, 2]
        assert sink.sent == 2 and sink.failed == 0
    finally:
        srv.shutdown()


def test_stuck_webhook_never_blocks_and_drops_are_counted():
    _Hook.got = []
    _Hook.gate.clear()  # the receiver hangs on every request
    srv = _server()
    try:
        sink = AlertSink(log=False, file="none", webhook=f"http://127.0.0.1:{srv.server_port}/hook", queue_size=4,
                         timeout_s=5.0)
        done = threading.Event()

        def burst():
            for i in range(50):
                sink.emit({"event": sc.ALERT_EVENT, "n": i})
            done.set()

        threading.Thread(target=burst, daemon=True).start()
        assert done.wait(5.0), "emit blocked on a stuck webhook"
        assert sink.dropped >= 40
        _Hook.gate.set()
        sink.close(5.0)
    finally:
        srv.shutdown()


def test_unreachable_webhook_counts_failures():
    sink = AlertSink(log=False, file="none", webhook="http://127.0.0.1:9/nothing", timeout_s=1.0)
    sink.emit({"event": sc.ALERT_EVENT})
    deadline = time.monotonic() + 10
    while sink.failed == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sink.close(1.0)
    assert sink.failed == 1 and sink.sent == 1
