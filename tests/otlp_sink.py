"""A real OTLP gRPC trace server for tests (grpcio + opentelemetry-proto), on 127.0.0.1.

    with OTLPSink() as sink:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        ... run something that exports ...
        spans = sink.wait_for(lambda s: len(s) >= 10)

``spans()`` flattens every received request into :class:`SinkSpan` s (hex ids, plain attributes).
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def attrs_of(kvs) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class SinkSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start: int
    end: int
    attributes: dict[str, object]
    links: list[tuple]  # (trace_id, span_id)
    events: list[tuple]  # (name, attributes)
    resource: dict[str, object] = field(default_factory=dict)
    kind: int = 0


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OTLPSink) -> None:
        self.sink = sink

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        with self.sink._lock:
            self.sink.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPSink:
    def __init__(self, port: int = 0) -> None:
        self.requests: list = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OTLPSink:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)

    def stop(self) -> None:
        self._server.stop(grace=None)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def spans(self) -> list[SinkSpan]:
        with self._lock:
            reqs = list(self.requests)
        out = []
        for req in reqs:
            for rs in req.resource_spans:
                res = attrs_of(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(SinkSpan(
                            name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(), start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano, attributes=attrs_of(s.attributes),
                            links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                            events=[(e.name, attrs_of(e.attributes)) for e in s.events], resource=res,
                            kind=s.kind))
        return out

    def wait_for(self, pred: Callable[[list[SinkSpan]], bool], timeout: float = 30.0) -> list[SinkSpan]:
        deadline = time.monotonic() + timeout
        spans = self.spans()
        while not pred(spans) and time.monotonic() < deadline:
            time.sleep(0.1)
            spans = self.spans()
        return spans
