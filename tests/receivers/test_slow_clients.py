"""Issue 16, finding 4 (and 6: RetryInfo): slow clients must not lock anyone out.

HTTP: 100 connections that trickle their request head one byte at a time, without credentials; an
authenticated client is still served. gRPC: 100 half-open calls (headers sent, the message never)
without credentials, then with none required; real calls still go through, and every refusal the
server gives carries RetryInfo. The official clients (requests, grpcio) and real sockets throughout."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from prism_otel import semconv as sc
from tests.collector.harness import base_config, service
from tests.collector.spans_util import make_step, render, to_request

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
TOKEN = "s3cret"


def _cfg(tmp_path, auth: bool):
    cfg = base_config(exporters={"file": {"path": str(tmp_path / "out.jsonl"), "flush_interval": "0s"}})
    if auth:
        for proto in ("grpc", "http"):
            cfg["receivers"]["otlp"]["protocols"][proto]["auth"] = {"authenticator": "bearertokenauth"}
        cfg["extensions"] = {"bearertokenauth": {"token": TOKEN}}
        cfg["service"]["extensions"] = ["bearertokenauth"]
    return cfg


def _good():
    return to_request(render([make_step(i) for i in range(2)])).SerializeToString()


class Trickle:
    """``n`` connections sending a request head one byte per ``every`` seconds, never finishing it."""

    HEAD = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n" + b"X-Pad: " + b"a" * 4000

    def __init__(self, port: int, n: int, every: float = 1.0) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(self.HEAD[:1])
            self.socks.append(s)
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 1
        while not self.stop.wait(self.every):
            for s in self.socks:
                try:
                    s.sendall(self.HEAD[i:i + 1])
                except OSError:
                    pass
            i += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def test_http_slow_unauthenticated_connections_do_not_hold_off_an_authenticated_client(tmp_path):
    good = _good()
    with service(_cfg(tmp_path, auth=True)) as svc:
        port = svc.receivers["otlp"].http_port
        slow = Trickle(port, 100)
        try:
            time.sleep(1.5)  # every slow connection is open and has sent part of its head
            url = f"http://127.0.0.1:{port}/v1/traces"
            hdr = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"}
            waits = []
            for _ in range(5):
                t0 = time.monotonic()
                r = requests.post(url, data=good, headers=hdr, timeout=20)
                waits.append(time.monotonic() - t0)
                assert r.status_code == 200, r.status_code
            print(f"authenticated requests served in {max(waits):.3f}s at most, 100 slow connections open")
            assert r.headers.get("Server", "").lower().startswith("prism-otel")
        finally:
            slow.close()
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS, transport="http") == 5 * 8


class HalfOpen:
    """``n`` gRPC calls that send their headers and never their message."""

    def __init__(self, port: int, n: int, metadata=()) -> None:
        self.release = threading.Event()
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
        self.calls = []
        for i in range(n):
            call = self.channels[i % 4].stream_unary(EXPORT, request_serializer=None,
                                                     response_deserializer=ExportTraceServiceResponse.FromString)
            self.calls.append(call.future(self._never(), timeout=60, metadata=metadata))

    def _never(self):
        self.release.wait(60)
        return
        yield  # unreachable - a generator that never produces a message

    def close(self) -> None:
        self.release.set()
        for c in self.calls:
            c.cancel()
        for ch in self.channels:
            ch.close()


def _retry_info(exc: grpc.RpcError) -> bool:
    return any(k == "google.rpc.retryinfo-bin" for k, _ in (exc.trailing_metadata() or ()))


@pytest.mark.parametrize("auth", [True, False], ids=["unauthenticated-half-open", "no-auth-configured"])
def test_grpc_half_open_calls_do_not_exhaust_the_server(tmp_path, auth):
    good = _good()
    md = (("authorization", f"Bearer {TOKEN}"),) if auth else ()
    with service(_cfg(tmp_path, auth=auth)) as svc:
        port = svc.receivers["otlp"].grpc_port
        half = HalfOpen(port, 100)
        refusals_without_hint = []
        try:
            time.sleep(1.5)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.unary_unary(EXPORT, request_serializer=None,
                                      response_deserializer=ExportTraceServiceResponse.FromString)
                results = []

                def one():
                    try:
                        call(good, timeout=20, metadata=md)
                        results.append("ok")
                    except grpc.RpcError as exc:
                        results.append(exc.code())
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not _retry_info(exc):
                            refusals_without_hint.append(exc.details())

                threads = [threading.Thread(target=one) for _ in range(20)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            assert not refusals_without_hint, refusals_without_hint[:3]
            assert results == ["ok"] * 20, results
            if auth:  # rejected on their headers, without waiting for a message
                deadline = time.monotonic() + 10
                while not all(c.done() for c in half.calls) and time.monotonic() < deadline:
                    time.sleep(0.1)
                codes = {c.exception().code() for c in half.calls if c.done() and c.exception() is not None}
                assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        finally:
            half.close()
        assert svc.telemetry.get(sc.COLLECTOR_RECEIVED_SPANS, transport="grpc") == 20 * 8
