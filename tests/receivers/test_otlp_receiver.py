"""The OTLP receiver on real sockets: the official OTel exporters as clients, raw gRPC/HTTP for the
bad cases. Garbage, truncated and oversized requests get the protocol's status, are counted, and
the receiver keeps serving; a full intake answers with the backpressure statuses."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess

import grpc
import pytest
import requests
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from prism_otel.otlp_json import request_to_json
from tests.collector.harness import base_config, client_provider, free_port, send_steps, service, span_ids
from tests.collector.spans_util import make_step, render, to_request

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _file_spans(path):
    out = []
    with open(path) as fh:
        for line in fh:
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    out.extend(ss["spans"])
    return out


def _cfg(tmp_path, **grpc_extra):
    cfg = base_config(exporters={"file": {"path": str(tmp_path / "out.jsonl"), "flush_interval": "0s"}})
    cfg["receivers"]["otlp"]["protocols"]["grpc"].update(grpc_extra)
    return cfg


def _raw_grpc(port, payload: bytes, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        return call(payload, timeout=10, metadata=metadata)


def _payload(n_steps=3, instance="i-0"):
    return to_request(render([make_step(i, instance=instance) for i in range(n_steps)]))


def test_official_exporters_grpc_and_http_reach_the_pipeline(tmp_path):
    with service(_cfg(tmp_path)) as svc:
        r = svc.receivers["otlp"]
        sent = []
        for proto, port, inst in (("grpc", r.grpc_port, "g"), ("http", r.http_port, "h")):
            tp, rec = client_provider(proto, port, inst)
            send_steps(tp, [make_step(i, instance=inst) for i in range(10)])
            tp.force_flush()
            tp.shutdown()
            sent += span_ids(rec.get_finished_spans())
        t = svc.telemetry
        assert t.get(sc.COLLECTOR_RECEIVED_SPANS, transport="grpc") == 40
        assert t.get(sc.COLLECTOR_RECEIVED_SPANS, transport="http") == 40
    got = [s["spanId"] for s in _file_spans(tmp_path / "out.jsonl")]
    assert sorted(got) == sorted(sent)


def test_http_json_with_hex_ids(tmp_path):
    req = _payload(2)
    body = request_to_json(req)
    ids = sorted(s.span_id.hex() for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans)
    with service(_cfg(tmp_path)) as svc:
        resp = requests.post(f"http://127.0.0.1:{svc.receivers['otlp'].http_port}/v1/traces", data=body,
                             headers={"Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
        assert json.loads(resp.content) == {}
    got = sorted(s["spanId"] for s in _file_spans(tmp_path / "out.jsonl"))
    assert got == ids and all(len(i) == 16 for i in got)


def test_grpc_garbage_truncated_oversized_then_still_serving(tmp_path):
    good = _payload(3).SerializeToString()
    with service(_cfg(tmp_path, max_recv_msg_size_mib=1)) as svc:
        port = svc.receivers["otlp"].grpc_port
        for bad in (b"\xff\xff\xff\xff\xff", good[: len(good) // 2]):
            with pytest.raises(grpc.RpcError) as ei:
                _raw_grpc(port, bad)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as ei:
            _raw_grpc(port, b"\x0a" + b"\xff\xff\x7f" + b"x" * (2 << 20))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the oversized one too: its call ends without a message reaching the handler
        assert svc.telemetry.get(sc.COLLECTOR_MALFORMED_REQUESTS, transport="grpc") == 3
        resp = _raw_grpc(port, good)
        assert not resp.HasField("partial_success")
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS, transport="grpc") == 12


def _raw_http(port, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_http_bad_requests_get_the_right_status_then_still_serving(tmp_path):
    good = _payload(3).SerializeToString()
    cfg = _cfg(tmp_path)
    cfg["receivers"]["otlp"]["protocols"]["http"]["max_request_body_size"] = 100_000
    with service(cfg) as svc:
        port = svc.receivers["otlp"].http_port
        url = f"http://127.0.0.1:{port}/v1/traces"
        pb = {"Content-Type": "application/x-protobuf"}
        r = requests.post(url, data=b"\xff\xff\xff\xff", headers=pb, timeout=10)
        assert r.status_code == 400 and "decode" in Status.FromString(r.content).message
        r = requests.post(url, data=good[: len(good) // 2], headers=pb, timeout=10)
        assert r.status_code == 400
        r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 400 and "message" in r.json()
        # a span with bad ids is dropped as a partial success, as in protobuf (issue 16, finding 8)
        r = requests.post(url, data=json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
            {"traceId": "zz", "spanId": "00"}]}]}]}), headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 200 and r.json()["partialSuccess"]["rejectedSpans"] == "1"
        r = requests.post(url, data=good, headers={"Content-Type": "text/plain"}, timeout=10)
        assert r.status_code == 415
        r = requests.post(url, data=b"x" * 200_000, headers=pb, timeout=10)
        assert r.status_code == 413
        bomb = gzip.compress(b"\0" * 5_000_000)
        r = requests.post(url, data=bomb, headers=dict(pb, **{"Content-Encoding": "gzip"}), timeout=10)
        assert r.status_code == 413
        r = requests.post(f"http://127.0.0.1:{port}/v1/metrics", data=good, headers=pb, timeout=10)
        assert r.status_code == 404
        assert requests.get(url, timeout=10).status_code == 405
        # Content-Length promises more than arrives.
        head = (f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                f"Content-Length: {len(good)}\r\n\r\n").encode()
        assert _raw_http(port, head + good[:10]).startswith(b"HTTP/1.1 400")
        assert svc.telemetry.get(sc.COLLECTOR_MALFORMED_REQUESTS, transport="http") == 7
        r = requests.post(url, data=gzip.compress(good), headers=dict(pb, **{"Content-Encoding": "gzip"}),
                          timeout=10)
        assert r.status_code == 200
        r = requests.post(url, data=good, headers=pb, timeout=10)
        assert r.status_code == 200 and not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS, transport="http") == 24


def test_spans_with_invalid_ids_are_a_partial_success(tmp_path):
    req = _payload(1)
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[0].span_id = b"\x01\x02"  # 2 bytes: invalid
    spans[1].trace_id = b"\0" * 16  # all zero: invalid
    with service(_cfg(tmp_path)) as svc:
        resp = _raw_grpc(svc.receivers["otlp"].grpc_port, req.SerializeToString())
        assert resp.partial_success.rejected_spans == 2 and "span_id" in resp.partial_success.error_message
        r = requests.post(f"http://127.0.0.1:{svc.receivers['otlp'].http_port}/v1/traces",
                          data=req.SerializeToString(), headers={"Content-Type": "application/x-protobuf"}, timeout=10)
        assert ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans == 2
        assert svc.telemetry.get(sc.COLLECTOR_REJECTED_SPANS) == 4
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS) == 4


def test_full_intake_answers_with_backpressure_statuses(tmp_path):
    """A persistent pipeline whose backend is down and whose queue holds 2 requests: the third is refused
    with RESOURCE_EXHAUSTED + RetryInfo (gRPC) / 429 + Retry-After (HTTP)."""
    from google.rpc.error_details_pb2 import RetryInfo

    cfg = base_config(
        exporters={"otlp_grpc": {"endpoint": f"127.0.0.1:{free_port()}", "tls": {"insecure": True},
                                 "sending_queue": {"storage": "file_storage", "queue_size": 2},
                                 "retry_on_failure": {"initial_interval": "1s"}}},
        extensions={"file_storage": {"directory": str(tmp_path / "q"), "create_directory": True}})
    good = _payload(1).SerializeToString()
    with service(cfg) as svc:
        r = svc.receivers["otlp"]
        _raw_grpc(r.grpc_port, good)
        _raw_grpc(r.grpc_port, good)
        with pytest.raises(grpc.RpcError) as ei:
            _raw_grpc(r.grpc_port, good)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = dict(ei.value.trailing_metadata())["google.rpc.retryinfo-bin"]
        assert RetryInfo.FromString(info).retry_delay.seconds >= 1
        resp = requests.post(f"http://127.0.0.1:{r.http_port}/v1/traces", data=good,
                             headers={"Content-Type": "application/x-protobuf"}, timeout=10)
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
        assert Status.FromString(resp.content).code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert svc.telemetry.get(sc.COLLECTOR_REFUSED_REQUESTS) == 2  # refused before decoding


def test_bearer_token_auth(tmp_path):
    cfg = _cfg(tmp_path)
    for proto in ("grpc", "http"):
        cfg["receivers"]["otlp"]["protocols"][proto]["auth"] = {"authenticator": "bearertokenauth"}
    cfg["extensions"] = {"bearertokenauth": {"token": "s3cret"}}
    cfg["service"]["extensions"] = ["bearertokenauth"]
    good = _payload(1).SerializeToString()
    with service(cfg) as svc:
        r = svc.receivers["otlp"]
        with pytest.raises(grpc.RpcError) as ei:
            _raw_grpc(r.grpc_port, good, metadata=(("authorization", "Bearer nope"),))
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        _raw_grpc(r.grpc_port, good, metadata=(("authorization", "Bearer s3cret"),))
        url = f"http://127.0.0.1:{r.http_port}/v1/traces"
        pb = {"Content-Type": "application/x-protobuf"}
        assert requests.post(url, data=good, headers=pb, timeout=10).status_code == 401
        assert requests.post(url, data=good, headers=dict(pb, Authorization="Bearer s3cret"),
                             timeout=10).status_code == 200
        assert svc.telemetry.get(sc.COLLECTOR_UNAUTHENTICATED) == 2
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS) == 8


def _certs(d):
    cnf = d / "san.cnf"
    cnf.write_text("[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
                   "basicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=prism-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "2", "-extfile", "san.cnf", "-extensions", "ext")
    return str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key")


def test_tls_with_the_official_exporters(tmp_path, monkeypatch):
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # they would override the exporter's CA file
        monkeypatch.delenv(var, raising=False)
    ca, crt, key = _certs(tmp_path)
    cfg = _cfg(tmp_path)
    for proto in ("grpc", "http"):
        cfg["receivers"]["otlp"]["protocols"][proto]["tls"] = {"cert_file": crt, "key_file": key}
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    spans = render([make_step(0)])
    with open(ca, "rb") as fh:
        ca_pem = fh.read()
    with service(cfg) as svc:
        r = svc.receivers["otlp"]
        g = GRPCExporter(endpoint=f"localhost:{r.grpc_port}", credentials=grpc.ssl_channel_credentials(ca_pem))
        assert g.export(spans) == SpanExportResult.SUCCESS
        h = HTTPExporter(endpoint=f"https://localhost:{r.http_port}/v1/traces", certificate_file=ca)
        assert h.export(spans) == SpanExportResult.SUCCESS
        with pytest.raises(requests.exceptions.SSLError):
            requests.post(f"https://localhost:{r.http_port}/v1/traces", data=b"", timeout=5)
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS) == 8
        g.shutdown()
        h.shutdown()


def test_loopback_by_default():
    from prism_otel.collector.decode import defaults
    from receivers.otlp.config import GRPCServerConfig, HTTPServerConfig, parse_endpoint

    assert parse_endpoint(defaults(GRPCServerConfig).endpoint) == ("127.0.0.1", 4317)
    assert parse_endpoint(defaults(HTTPServerConfig).endpoint) == ("127.0.0.1", 4318)
    assert os.environ.get("PRISM_TEST_NOTHING") is None


def test_unavailable_when_the_pipeline_cannot_take_data(tmp_path):
    """Shutting down / storage failing: UNAVAILABLE + RetryInfo (gRPC), 503 + Retry-After (HTTP)."""
    from google.rpc.error_details_pb2 import RetryInfo

    from prism_otel.collector.component import ComponentID, Host, Settings
    from prism_otel.collector.decode import decode
    from prism_otel.collector.errors import Refused
    from prism_otel.collector.telemetry import Telemetry
    from receivers.otlp import OTLPReceiverConfig, factory

    class Closed:
        def admit(self, wire_bytes=0):
            raise Refused("persistent queue cannot write: No space left on device", 2.0, overloaded=False)

        def __call__(self, req, raw, n):  # pragma: no cover - admit refuses first
            raise AssertionError("not reached")

    cfg = decode(OTLPReceiverConfig, {"protocols": {"grpc": {"endpoint": "127.0.0.1:0"},
                                                    "http": {"endpoint": "127.0.0.1:0"}}})
    tel = Telemetry()
    r = factory().create(Settings(ComponentID("otlp"), tel), cfg, Closed())
    r.start(Host())
    try:
        good = _payload(1).SerializeToString()
        with pytest.raises(grpc.RpcError) as ei:
            _raw_grpc(r.grpc_port, good)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        info = RetryInfo.FromString(dict(ei.value.trailing_metadata())["google.rpc.retryinfo-bin"])
        assert info.retry_delay.seconds == 2
        resp = requests.post(f"http://127.0.0.1:{r.http_port}/v1/traces", data=good,
                             headers={"Content-Type": "application/x-protobuf"}, timeout=10)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
        assert tel.get(sc.COLLECTOR_REFUSED_REQUESTS) == 2
    finally:
        r.shutdown()
        r.shutdown()
