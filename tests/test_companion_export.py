"""The companion builds its exporters from the standard OTEL_* variables, as the SDK would: OTLP over
HTTP/protobuf to a real HTTP server (path, content type, headers, a decodable request), and the console
exporter (one JSON document per span on stdout). Steps come from a plain torch-free loop
(prism_otel.device.manual), through the ring and a real companion process."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from prism_otel import semconv as sc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = ("import sys, time\n"
       "import prism_otel\n"
       "from prism_otel.device import manual\n"
       "prism_otel.start(instrument=False)\n"
       "for i in range(int(sys.argv[1])):\n"
       "    with manual.step(None, batch_size=1, decode_tokens=1, request_ids=['r1']):\n"
       "        pass\n"
       "    time.sleep(float(sys.argv[2]))\n"
       "prism_otel.stop()\n")


def _run(env_extra: dict, steps: int = 3, gap_s: float = 0.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PRISM_OTEL_"))}
    env.update(PYTHONPATH=ROOT, PRISM_OTEL_DETECT="0", OTEL_BSP_SCHEDULE_DELAY="100", **env_extra)
    return subprocess.run([sys.executable, "-c", APP, str(steps), str(gap_s)], env=env, capture_output=True,
                          text=True, timeout=120)


def _otlp_http_server(delay_s: float = 0.0):
    """A real HTTP server taking OTLP/protobuf posts (answering each after ``delay_s``): (server, got)."""
    got = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            got.append((self.path, self.headers.get("Content-Type"), self.headers.get("x-team"),
                        ExportTraceServiceRequest.FromString(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, got


def _names(got) -> list[str]:
    return [s.name for *_, req in got for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_otlp_http_protobuf_with_headers():
    srv, got = _otlp_http_server()
    try:
        p = _run({sc.OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf",
                  sc.OTEL_EXPORTER_OTLP_ENDPOINT: f"http://127.0.0.1:{srv.server_port}",
                  sc.OTEL_EXPORTER_OTLP_HEADERS: "x-team=prism%20otel"})
    finally:
        srv.shutdown()
    assert p.returncode == 0, p.stderr[-3000:]
    assert got, p.stderr[-3000:]
    assert {(path, ctype, team) for path, ctype, team, _ in got} == {("/v1/traces", "application/x-protobuf",
                                                                    "prism otel")}
    names = _names(got)
    assert names.count(sc.STEP_SPAN) == 3 and names.count(sc.stage_span_name(sc.STAGE_FORWARD)) == 3


def test_console_exporter_prints_each_span():
    p = _run({sc.OTEL_TRACES_EXPORTER: "console"})
    assert p.returncode == 0, p.stderr[-3000:]
    docs = [json.loads(chunk) for chunk in p.stdout.replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert [d["name"] for d in docs].count(sc.STEP_SPAN) == 3
    step = next(d for d in docs if d["name"] == sc.STEP_SPAN)
    assert len(step["traceId"]) == 32 and step["scope"]["name"] == sc.SCOPE


def test_small_batches_to_a_slow_backend_are_all_delivered():
    """Steps 40 ms apart and a 100 ms batch delay ship many small requests; the backend takes 300 ms
    each. The exporter queue holds OTEL_BSP_MAX_QUEUE_SIZE spans (2048), not that many requests over the
    batch size (one, by default): nothing is dropped while a send is in flight."""
    srv, got = _otlp_http_server(delay_s=0.3)
    try:
        p = _run({sc.OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf",
                  sc.OTEL_EXPORTER_OTLP_ENDPOINT: f"http://127.0.0.1:{srv.server_port}"}, steps=40, gap_s=0.04)
    finally:
        srv.shutdown()
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(got) >= 3, f"{len(got)} requests: the batches were not small (the test proves nothing)"
    assert _names(got).count(sc.STEP_SPAN) == 40, p.stderr[-3000:]

