"""Helpers for collector tests: render StepRecords into real OTLP requests with the real materializer."""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel.record import StepRecord
from prism_otel.spans import SpanMaterializer


def render(steps: Sequence[StepRecord], resource: dict = None) -> list:
    """StepRecords -> finished SDK spans (children first, as the pipeline emits them)."""
    exp = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create(resource or {"service.instance.id": "i-0"}))
    tp.add_span_processor(SimpleSpanProcessor(exp))
    mat = SpanMaterializer(tp)
    for s in steps:
        mat.step(s)
    return list(exp.get_finished_spans())


def to_request(spans) -> ExportTraceServiceRequest:
    """Encode with the OTel exporters' own encoder, then through the wire format."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(encode_spans(spans).SerializeToString())
    return req


def make_step(i: int = 0, instance: str = "i-0", dur_ms: float = 10.0, batch: int = 4, **kw) -> StepRecord:
    t0 = 1_700_000_000_000_000_000 + i * 50_000_000
    t1 = t0 + int(dur_ms * 1e6)
    stages = kw.pop("stages", {"schedule": (t0, t0 + 100_000), "forward": (t0 + 100_000, t1 - 200_000),
                               "sample": (t1 - 200_000, t1)})
    return StepRecord(instance=instance, index=i, start_ns=t0, end_ns=t1, phase=kw.pop("phase", "decode"),
                      batch_size=batch, prefill_tokens=kw.pop("prefill_tokens", 0),
                      decode_tokens=kw.pop("decode_tokens", batch), context_tokens=kw.pop("context_tokens", 100 * batch),
                      max_context_tokens=kw.pop("max_context_tokens", 120), stages=stages, **kw)
