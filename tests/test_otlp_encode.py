"""The OTLP encoder (prism_otel.otlp_encode) puts on the wire what the SDK path does: the same spans,
names, kinds, times, attributes, events, links, parents, flags and status, under the same resource and
scope. Both are fed the same records; their requests are decoded and compared span by span (ids are
random on both sides, so they are compared as a structure: who is whose parent, who links to whom)."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel import semconv as sc
from prism_otel.otlp_encode import OTLPSink
from prism_otel.record import BatchChange, RequestRecord, StepRecord, Verdict
from prism_otel.sampling import AnomalyWindow, parse_arg
from prism_otel.spans import SpanMaterializer
from tests.otlp_sink import attrs_of

T = 1_700_000_000_000_000_000
MS = 1_000_000


class _Keep:
    def __init__(self) -> None:
        self.payloads = []

    def export(self, payload: bytes, n: int) -> None:
        self.payloads.append(payload)

    def shutdown(self, timeout=None) -> None:
        pass


def _steps():
    base = dict(instance="i-1", phase="decode", batch_size=2, prefill_tokens=0, decode_tokens=2, context_tokens=40,
                max_context_tokens=21, kv_usage=0.25, request_ids=("r1", "r2"),
                change=BatchChange(1, 0, 1, 1, 0), signals={sc.SIGNAL_GC_MS: 0.5, sc.SIGNAL_GC_COUNT: 1})
    plain = StepRecord(index=1, start_ns=T, end_ns=T + 3 * MS, device_ns=2 * MS,
                       stages={"schedule": (T, T + MS // 2), "forward": (T + MS // 2, T + 5 * MS // 2)},
                       attributes={sc.DEVICE_TIMING: "host", sc.STEP_OVERLAP: 0, "x.list": ["a", "b"], "x.f": [1.5]},
                       **base)
    alert = StepRecord(index=2, start_ns=T + 3 * MS, end_ns=T + 9 * MS, device_ns=5 * MS,
                       stages={"forward": (T + 3 * MS, T + 8 * MS)},
                       kernel_groups={"gemm": 3 * MS, "attention": 2 * MS},
                       verdict=Verdict(expected_ms=3.0, score=2.5, anomaly=True, root_cause="stage.forward",
                                       alert=True, slo_violations=("step",), test="point"),
                       attributes={sc.DEVICE_TIMING: "event", sc.DEEPDIVE: True}, **base)
    rank = StepRecord(instance="i-1", index=3, start_ns=T + 9 * MS, end_ns=T + 12 * MS, phase="decode", batch_size=2,
                      prefill_tokens=0, decode_tokens=2, kernel_groups={"collective": MS},
                      attributes={sc.RANK: 1, sc.RANK_COLLECTIVE_MS: 1.0}, device_ns=2 * MS)
    joined = StepRecord(index=3, start_ns=T + 9 * MS, end_ns=T + 12 * MS, kernel_groups={"gemm": MS},
                        attributes={sc.RANK_COUNT: 2}, ranks=(rank,), **base)
    return [plain, alert, joined]


OWN = (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1, True, True)


def _run(sink):
    """Requests r1 (a root), r2 (child of a remote caller) and r3 (ids made for it in vLLM's front end,
    tracestate prism=root: its own), three steps, a detached stage."""
    r1 = sink.open_request("r1", T - MS, None, 5, 32)
    r2 = sink.open_request("r2", T - MS, (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1, True), 7, None)
    r3 = sink.open_request("r3", T - MS, OWN, 2, None)
    links = []
    for st in _steps():
        links.append(sink.step(st, [r1.get_span_context(), r2.get_span_context()]))
    sink.detached_stage("detokenize", T + 13 * MS, T + 14 * MS, {sc.BATCH_SIZE: 2, sc.BATCH_REQUEST_IDS: ["r1", "r2"]})
    rec1 = RequestRecord("i-1", "r1", T - MS, T + 12 * MS, T, T + 3 * MS, T + 12 * MS, 5, 3, 3)
    rec2 = RequestRecord("i-1", "r2", T - MS, T + 12 * MS, T, T + 3 * MS, T + 12 * MS, 7, 3, 3, status="error",
                         slo_violations=("ttft",))
    sink.close_request(r1, rec1, links[:2], 3)
    sink.close_request(r2, rec2, links, 3)
    sink.close_request(r3, RequestRecord("i-1", "r3", T - MS, T + 2 * MS, status="aborted"), [], 0)


def _flat(req: ExportTraceServiceRequest):
    out = []
    for rs in req.resource_spans:
        res = attrs_of(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append((s, res, (ss.scope.name, ss.scope.version)))
    return out


def _canon(spans):
    """Spans as comparable structures: ids replaced by the position of the span they name."""
    by_id = {s.span_id: i for i, (s, _, _) in enumerate(spans)}
    ext = {}

    def ref(sid: bytes):
        if sid in by_id:
            return by_id[sid]
        return ("external", ext.setdefault(sid, len(ext)))

    out = []
    for s, res, scope in spans:
        out.append(dict(
            name=s.name, kind=s.kind, start=s.start_time_unix_nano, end=s.end_time_unix_nano,
            attributes=attrs_of(s.attributes), parent=ref(s.parent_span_id) if s.parent_span_id else None,
            links=[(ref(ln.span_id), ln.flags, ln.trace_state, len(ln.attributes)) for ln in s.links],
            events=[(e.name, e.time_unix_nano, attrs_of(e.attributes)) for e in s.events],
            status=(s.status.code, s.status.message, s.HasField("status")), flags=s.flags,
            trace_state=s.trace_state, dropped=(s.dropped_attributes_count, s.dropped_events_count,
                                                s.dropped_links_count),
            resource=res, scope=scope))
    return out


def _same_trace_structure(spans):
    """Children share their parent's trace id; the remote caller's trace id is kept."""
    ids = {s.span_id: s for s, _, _ in spans}
    for s, _, _ in spans:
        if s.parent_span_id in ids:
            assert s.trace_id == ids[s.parent_span_id].trace_id
    r2 = next(s for s, _, _ in spans if attrs_of(s.attributes).get(sc.REQUEST_ID) == "r2")
    assert r2.trace_id.hex() == "4bf92f3577b34da6a3ce929d0e0e4736" and r2.parent_span_id.hex() == "00f067aa0ba902b7"
    r3 = next(s for s, _, _ in spans if attrs_of(s.attributes).get(sc.REQUEST_ID) == "r3")
    assert r3.trace_id.hex() == f"{OWN[0]:032x}" and r3.span_id.hex() == f"{OWN[1]:016x}" and not r3.parent_span_id


import pytest  # noqa: E402


@pytest.fixture(params=[False, True], ids=["status_unset", "span_error"])
def span_error(request, monkeypatch):
    from prism_otel import ecosystem

    monkeypatch.setattr(ecosystem, "_ERROR", request.param)  # PRISM_OTEL_SPAN_ERROR=1: anomalous steps ERROR
    return request.param


def test_encoder_matches_the_sdk_path(span_error):
    resource = Resource.create({"service.name": "t", "process.pid": 1})
    exp = InMemorySpanExporter()
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(SimpleSpanProcessor(exp))
    mat = SpanMaterializer(tp, model_name="tiny", provider_name="vllm")
    _run(mat)
    sdk = _flat(encode_spans(exp.get_finished_spans()))

    keep = _Keep()
    from prism_otel import __version__

    sink = OTLPSink(dict(resource.attributes), [keep], sc.SCOPE, __version__, model_name="tiny", provider_name="vllm",
                    batch_spans=1000)
    _run(sink)
    sink.flush()
    assert len(keep.payloads) == 1
    ours = _flat(ExportTraceServiceRequest.FromString(keep.payloads[0]))

    # 3 steps, 3 stages, 3 kernel groups, a rank and its kernel group, a detached stage, 3 requests
    assert len(ours) == len(sdk) == 15
    alert = next(s for s, _, _ in ours if attrs_of(s.attributes).get(sc.STEP_INDEX) == 2)
    assert (alert.status.code == 2 and "root cause stage.forward" in alert.status.message) if span_error else \
        alert.status.code == 0
    r1 = next(s for s, _, _ in ours if attrs_of(s.attributes).get(sc.REQUEST_ID) == "r1")
    assert attrs_of(r1.attributes)["gen_ai.latency.e2e"] == 0.013
    _same_trace_structure(ours)
    _same_trace_structure(sdk)
    a, b = _canon(ours), _canon(sdk)
    for x, y in zip(a, b):
        assert x == y, (x["name"], {k: (x[k], y[k]) for k in x if x[k] != y[k]})


def test_step_links_are_capped_and_counted():
    keep = _Keep()
    sink = OTLPSink({"service.name": "t"}, [keep], max_step_links=1, batch_spans=1000)
    r = [sink.open_request(f"r{i}", T, None, 1, None) for i in range(3)]
    sink.step(_steps()[0], [x.get_span_context() for x in r])
    sink.flush()
    spans = _flat(ExportTraceServiceRequest.FromString(keep.payloads[0]))
    step = next(s for s, _, _ in spans if s.name == sc.STEP_SPAN)
    assert len(step.links) == 1 and attrs_of(step.attributes)[sc.STEP_LINKS_DROPPED] == 2


def test_batches_by_size_and_by_age():
    keep = _Keep()
    sink = OTLPSink({"service.name": "t"}, [keep], batch_spans=4, delay_s=0.05)
    sink.step(_steps()[0], [])  # 3 spans: under the batch size
    assert not keep.payloads
    sink.step(_steps()[0], [])  # 6: one request of 4 now
    assert len(keep.payloads) == 1
    import time

    sink.tick(time.monotonic() + 1)  # the rest once it is old enough
    assert len(keep.payloads) == 2
    n = [len(_flat(ExportTraceServiceRequest.FromString(p))) for p in keep.payloads]
    assert n == [4, 2]


def test_requests_stay_under_the_byte_cap_and_lose_nothing():
    from prism_otel.export import BatchSettings

    assert BatchSettings.from_env().batch_spans == 2048  # no OTEL_BSP_MAX_EXPORT_BATCH_SIZE: the queue's size
    keep = _Keep()
    sink = OTLPSink({"service.name": "t"}, [keep], batch_spans=10_000, batch_bytes=2000)
    for _ in range(20):
        sink.step(_steps()[0], [])  # 3 spans a step, about 1.2 KB
    assert keep.payloads  # cut by bytes long before 10,000 spans
    sink.flush()
    n = [len(_flat(ExportTraceServiceRequest.FromString(p))) for p in keep.payloads]
    assert sum(n) == 60 and len(n) > 10
    req = [ExportTraceServiceRequest.FromString(p) for p in keep.payloads]
    assert all(sum(s.ByteSize() for ss in r.resource_spans[0].scope_spans for s in ss.spans) <= 2000 for r in req)


def test_anomaly_window_exports_context_and_one_in_k():
    w = AnomalyWindow(context=2, keep_one_in=5)
    out = []
    verdicts = [False] * 12 + [True] + [False] * 12
    for i, bad in enumerate(verdicts):
        out += w.offer(bad, i)
    # one in five normal steps (the 5th, 10th, ... normal one), the 2 steps before the anomaly and 2 after
    assert out == [4, 9, 10, 11, 12, 13, 14, 17, 22]
    assert w.held_out + len(out) + len(w._before) == len(verdicts)  # each step exported, counted, or still pending
    assert parse_arg("3,7") == (3, 7) and parse_arg("context=4,keep_one_in=9") == (4, 9)
    assert parse_arg("nonsense") == (8, 100) and parse_arg(None) == (8, 100)


def test_anomaly_policy_selected_by_otel_traces_sampler_in_the_pipeline(monkeypatch):
    """OTEL_TRACES_SAMPLER=prism_anomaly: every step judged, the anomalous one exported with its
    context, one in K of the others; the request span always."""
    from prism_otel import sampling
    from prism_otel.pipeline import Pipeline, replace_verdict
    from prism_otel.record import StepFeatures, clock_ns
    from prism_otel.recorder import Recorder

    monkeypatch.setenv(sc.OTEL_TRACES_SAMPLER, sc.SAMPLER_ANOMALY)
    monkeypatch.setenv(sc.OTEL_TRACES_SAMPLER_ARG, "1,4")
    sampler, window = sampling.from_env()
    assert sampler is None and (window.context, window.keep_one_in) == (1, 4)

    class Flag:
        name = "flag"
        judged = 0

        def process(self, step):
            Flag.judged += 1
            return replace_verdict(step, anomaly=step.index == 6, score=1.0)

        def process_request(self, r):
            return r

        def shutdown(self):
            pass

    keep = _Keep()
    sink = OTLPSink({"service.name": "t"}, [keep], policy=window, batch_spans=10000)
    rec = Recorder(4096)
    p = Pipeline(rec, None, "i", [Flag()], sink=sink)
    t = clock_ns()
    rec.request("r1", "arrive", t, prompt_tokens=3)
    for k in range(12):
        rec.step(k, t + k * 1000, t + k * 1000 + 900, StepFeatures("decode", 1, 0, 1, 10, 10), (("r1", 1, True),))
    rec.request("r1", "finish", t + 20_000)
    p.process_pending()
    p.stop()
    sink.flush()
    spans = [s for pl in keep.payloads for s, _, _ in _flat(ExportTraceServiceRequest.FromString(pl))]
    steps = sorted(attrs_of(s.attributes)[sc.STEP_INDEX] for s in spans if s.name == sc.STEP_SPAN)
    assert Flag.judged == 12 and steps == [4, 5, 6, 7, 10]
    assert [attrs_of(s.attributes)[sc.REQUEST_ID] for s in spans if sc.REQUEST_ID in attrs_of(s.attributes)] == ["r1"]
