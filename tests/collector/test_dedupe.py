"""Issue 16, finding 2: the persistent queue's duplicate filter must not mistake distinct spans for one.
Root spans with 64-bit trace ids (zero-padded to 128 bits) whose span id equals the trace id's low half
are how Jaeger and Zipkin/B3 ids look once converted to OTLP; 1,000 of them are 1,000 spans."""

from __future__ import annotations

import os

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from prism_otel import semconv as sc
from tests.collector.harness import CountingSink, base_config, service
from tests.collector.test_poison import export


def b3_style_request(n: int, seed: int = 0) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "zipkin-app"
    ss = rs.scope_spans.add()
    rnd = __import__("random").Random(seed)
    for i in range(n):
        low = rnd.getrandbits(64).to_bytes(8, "big")
        s = ss.spans.add()
        s.name = f"GET /item/{i}"
        s.trace_id = b"\0" * 8 + low
        s.span_id = low
        s.start_time_unix_nano = 1_700_000_000_000_000_000 + i
        s.end_time_unix_nano = s.start_time_unix_nano + 1000
    return req


def test_b3_style_ids_are_not_duplicates_in_the_persistent_queue(tmp_path):
    sink = CountingSink().start()
    cfg = base_config(exporters={"otlp_grpc": {
        "endpoint": f"127.0.0.1:{sink.port}", "tls": {"insecure": True},
        "sending_queue": {"storage": "file_storage"},
        "retry_on_failure": {"initial_interval": "100ms", "max_elapsed_time": 0}}},
        extensions={"file_storage": {"directory": str(tmp_path / "q"), "create_directory": True}})
    try:
        with service(cfg) as svc:
            req = b3_style_request(1000)
            for k in range(0, 1000, 100):  # ten requests of 100
                part = ExportTraceServiceRequest()
                part.CopyFrom(req)
                spans = part.resource_spans[0].scope_spans[0].spans
                del spans[k + 100:]
                del spans[:k]
                export(svc.receivers["otlp"].grpc_port, part)
            ids = [s.span_id.hex() for s in req.resource_spans[0].scope_spans[0].spans]
            got = sink.wait_for(ids, timeout=60)
            assert len(set(ids) & set(got)) == 1000
            assert svc.telemetry.get(sc.COLLECTOR_DUPLICATE_SPANS) == 0
            # ... and a real re-send of the same spans is still recognised as one
            export(svc.receivers["otlp"].grpc_port, part)
            deadline = __import__("time").monotonic() + 30
            while svc.telemetry.get(sc.COLLECTOR_DUPLICATE_SPANS) < 100 and __import__("time").monotonic() < deadline:
                __import__("time").sleep(0.05)
            assert svc.telemetry.get(sc.COLLECTOR_DUPLICATE_SPANS) == 100
            assert all(v == 1 for v in sink.snapshot().values())
    finally:
        sink.stop()
    assert os.listdir(tmp_path / "q")
