"""The OTLP exporters against real servers that answer with chosen statuses: only what OTLP calls
retryable is retried, server retry hints are honoured, permanent errors drop (counted)."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from prism_otel.collector.component import ComponentID, Host, Settings
from prism_otel.collector.decode import decode
from prism_otel.collector.exporters import otlp_grpc, otlp_http
from prism_otel.collector.exporters.base import OutItem
from prism_otel.collector.telemetry import Telemetry
from tests.collector.spans_util import make_step, render, to_request

RETRY_FAST = {"initial_interval": "50ms", "max_interval": "100ms", "max_elapsed_time": "5s"}


class ScriptedGRPC:
    """Answers each Export with the next scripted (code, retry_delay_s or None); OK after the script."""

    def __init__(self, script):
        self.script = list(script)
        self.times = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler("opentelemetry.proto.collector.trace.v1.TraceService", {
            "Export": grpc.unary_unary_rpc_method_handler(
                self.export, request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString)})
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def export(self, raw, context):
        self.times.append(time.monotonic())
        if self.script:
            code, delay = self.script.pop(0)
            if delay is not None:
                d = Duration()
                d.FromNanoseconds(int(delay * 1e9))
                context.set_trailing_metadata((("google.rpc.retryinfo-bin", RetryInfo(retry_delay=d).SerializeToString()),))
            context.abort(code, "scripted")
        return ExportTraceServiceResponse()


class ScriptedHTTP:
    def __init__(self, script):
        outer = self
        self.script = list(script)
        self.times = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.times.append(time.monotonic())
                code, retry_after = outer.script.pop(0) if outer.script else (200, None)
                body = ExportTraceServiceResponse().SerializeToString() if code == 200 else b"no"
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                if retry_after is not None:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _send(factory, body):
    tel = Telemetry()
    cfg = decode(factory.config_class, body, "exporters::x")
    exp = factory.create(Settings(ComponentID(factory.type), tel), cfg)
    exp.start(Host())
    req = to_request(render([make_step(0)]))
    result = []
    done = threading.Event()
    exp.enqueue(OutItem(req, req.SerializeToString(), 4, {1: 4}), lambda ok: (result.append(ok), done.set()))
    assert done.wait(20)
    exp.shutdown()
    return result[0], tel


@pytest.mark.parametrize("script,ok,calls", [
    ([(grpc.StatusCode.UNAVAILABLE, None)] * 2, True, 3),
    ([(grpc.StatusCode.INVALID_ARGUMENT, None)], False, 1),
    ([(grpc.StatusCode.RESOURCE_EXHAUSTED, None)], False, 1),  # no RetryInfo: not retryable (OTLP spec)
    ([(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.3)], True, 2),
    ([(grpc.StatusCode.PERMISSION_DENIED, None)], False, 1),
])
def test_grpc_exporter_retries_only_what_otlp_calls_retryable(script, ok, calls):
    srv = ScriptedGRPC(script)
    try:
        got, tel = _send(otlp_grpc.factory(), {"endpoint": f"127.0.0.1:{srv.port}", "tls": {"insecure": True},
                                               "retry_on_failure": RETRY_FAST})
    finally:
        srv.server.stop(None)
    assert got is ok and len(srv.times) == calls
    assert tel.get(sc.COLLECTOR_EXPORT_RETRIES) == calls - 1
    assert tel.get(sc.COLLECTOR_EXPORTED_SPANS if ok else sc.COLLECTOR_EXPORT_FAILED_SPANS) == 4
    if script[0][1]:  # RetryInfo's 300 ms beat the 50 ms backoff
        assert srv.times[1] - srv.times[0] >= 0.28


@pytest.mark.parametrize("script,ok,calls", [
    ([(503, None), (502, None)], True, 3),
    ([(429, 1)], True, 2),
    ([(400, None)], False, 1),
    ([(500, None)], False, 1),
    ([(413, None)], False, 1),
])
def test_http_exporter_retries_only_what_otlp_calls_retryable(script, ok, calls):
    srv = ScriptedHTTP(script)
    try:
        got, tel = _send(otlp_http.factory(), {"endpoint": f"http://127.0.0.1:{srv.port}", "compression": "none",
                                               "retry_on_failure": RETRY_FAST})
    finally:
        srv.server.shutdown()
    assert got is ok and len(srv.times) == calls
    if script[0][1]:  # Retry-After: 1 beat the 50 ms backoff
        assert srv.times[1] - srv.times[0] >= 0.95


def test_retries_give_up_after_max_elapsed_time():
    srv = ScriptedGRPC([(grpc.StatusCode.UNAVAILABLE, None)] * 100)
    try:
        t0 = time.monotonic()
        got, tel = _send(otlp_grpc.factory(), {"endpoint": f"127.0.0.1:{srv.port}", "tls": {"insecure": True},
                                               "retry_on_failure": {"initial_interval": "50ms",
                                                                    "max_interval": "100ms",
                                                                    "max_elapsed_time": "600ms"}})
    finally:
        srv.server.stop(None)
    assert got is False and time.monotonic() - t0 < 3
    assert tel.get(sc.COLLECTOR_EXPORT_FAILED_SPANS, reason="retries_exhausted") == 4
