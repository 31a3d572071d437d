"""Issue 16, finding 8 (the smaller ones, receiver side), each on real sockets:

* OTLP/JSON nested ~300 levels deep gets 400, not silence (an uncaught RecursionError);
* a JSON request with one bad-length id keeps its other spans (partial success), as protobuf does;
* credentials are checked before anything else: an unknown path with a large declared body gets 401
  at once, without the body being read;
* the ``Server`` header names no Python version;
* bearer auth without TLS logs a warning;
* the persistent queue's files are owner-only."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat

import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from prism_otel.otlp_json import request_to_json
from tests.collector.harness import base_config, service
from tests.collector.spans_util import make_step, render, to_request
from tests.collector.test_poison import export

PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}


def _cfg(tmp_path, auth=False):
    cfg = base_config(exporters={"file": {"path": str(tmp_path / "out.jsonl"), "flush_interval": "0s"}})
    if auth:
        cfg["receivers"]["otlp"]["protocols"]["http"]["auth"] = {"authenticator": "bearertokenauth"}
        cfg["extensions"] = {"bearertokenauth": {"token": "s3cret"}}
        cfg["service"]["extensions"] = ["bearertokenauth"]
    return cfg


def _url(svc):
    return f"http://127.0.0.1:{svc.receivers['otlp'].http_port}/v1/traces"


def test_deeply_nested_json_gets_400_and_the_receiver_keeps_serving(tmp_path):
    value = '{"kvlistValue":{"values":[{"key":"k","value":' * 300 + '{"stringValue":"x"}' + "}]}}" * 300
    body = '{"resourceSpans":[{"resource":{"attributes":[{"key":"k","value":' + value + "}]}}]}"
    with service(_cfg(tmp_path)) as svc:
        r = requests.post(_url(svc), data=body, headers=JS, timeout=10)
        assert r.status_code == 400 and "deep" in r.json()["message"], r.text[:200]
        good = request_to_json(to_request(render([make_step(0)])))
        assert requests.post(_url(svc), data=good, headers=JS, timeout=10).status_code == 200


def test_json_with_one_bad_id_keeps_the_other_spans(tmp_path):
    req = to_request(render([make_step(0)]))  # 4 spans
    d = json.loads(request_to_json(req))
    d["resourceSpans"][0]["scopeSpans"][0]["spans"][1]["spanId"] = "abcd"  # 2 bytes, not 8
    with service(_cfg(tmp_path)) as svc:
        r = requests.post(_url(svc), data=json.dumps(d), headers=JS, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["partialSuccess"]["rejectedSpans"] == "1"
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS) == 3
        assert svc.telemetry.get(sc.COLLECTOR_REJECTED_SPANS) == 1


def test_credentials_are_checked_before_the_path_and_before_any_body(tmp_path):
    with service(_cfg(tmp_path, auth=True)) as svc:
        port = svc.receivers["otlp"].http_port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                      b"Content-Length: 20000000\r\n\r\n")  # and no body: a server reading it would wait
            head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 401"), head[:80]
        assert svc.telemetry.get(sc.COLLECTOR_UNAUTHENTICATED) == 1


def test_server_header_names_no_versions(tmp_path):
    with service(_cfg(tmp_path)) as svc:
        r = requests.get(_url(svc), timeout=10)
        assert r.status_code == 405
        assert r.headers["Server"] == "prism-otel" and "Python" not in r.headers["Server"]


def test_bearer_auth_without_tls_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        with service(_cfg(tmp_path, auth=True)):
            pass
    assert any("without TLS" in rec.getMessage() and rec.levelno == logging.WARNING for rec in caplog.records)


def test_queue_files_are_owner_only(tmp_path):
    cfg = base_config(exporters={"otlp_grpc": {"endpoint": "127.0.0.1:9", "tls": {"insecure": True},
                                               "sending_queue": {"storage": "file_storage"}}},
                      extensions={"file_storage": {"directory": str(tmp_path / "q"), "create_directory": True}})
    with service(cfg) as svc:
        resp = export(svc.receivers["otlp"].grpc_port, to_request(render([make_step(0)])))
        assert isinstance(resp, ExportTraceServiceResponse)
    seen = 0
    for root, dirs, files in os.walk(tmp_path / "q"):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
            seen += 1
    assert stat.S_IMODE(os.stat(tmp_path / "q").st_mode) == 0o700
    assert seen >= 2
