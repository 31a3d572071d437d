"""Unit tests of the core's own logic: the ring, the pipeline's bookkeeping, OTLP/JSON ids."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel import semconv as sc
from prism_otel.otlp_json import OTLPJSONError, request_from_json, request_to_json
from prism_otel.pipeline import Pipeline
from prism_otel.record import GC, StepFeatures, classify_phase, clock_ns
from prism_otel.recorder import Recorder
from prism_otel.ring import H_HEAD


def make_pipeline(cap=1024, **kw):
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    rec = Recorder(cap)
    return rec, Pipeline(rec, tp, "test", [], **kw), exp


def step(rec, key, reqs, t=None, device=None):
    t = t or clock_ns()
    rec.step(key, t, t + 2_000_000, StepFeatures("decode", len(reqs), 0, len(reqs), 10, 10), reqs, device,
             (("schedule", t, t + 100), ("forward", t + 100, t + 1_900_000)))


def test_ring_overwrites_oldest_and_counts():
    """A full ring overwrites its oldest records; the reader gets the newest ones, in order, and counts
    exactly the ones it lost (from the gap in their sequence numbers). The writer never waits."""
    rec = Recorder(16)  # the smallest ring: 4 KiB of records, about 80 GC records of 48 bytes
    reader = rec.reader()
    for i in range(200):
        rec.gc_pause(i, i + 1, 0, i)
    rec.flush()
    got = reader.read()
    assert got and all(kind == GC for kind, _ in got)
    collected = [r.collected for _, r in got]
    assert collected == list(range(200 - len(got), 200)), "the newest records, in order"
    assert reader.dropped == 200 - len(got) and len(got) < 100
    rec.gc_pause(500, 501, 0, 500)
    rec.flush()
    assert [r.collected for _, r in reader.read()] == [500] and reader.dropped == 200 - len(got)
    with pytest.raises(ValueError):
        Recorder(4)


def test_phase_classification():
    assert classify_phase(5, 0) == "prefill" and classify_phase(0, 3) == "decode"
    assert classify_phase(5, 3) == "mixed" and classify_phase(0, 0) == "idle"


def test_pipeline_counts_ring_drops_and_survives_bad_records():
    rec, p, exp = make_pipeline(cap=16)
    for i in range(40):
        step(rec, i, (("r1", 1, True),))
    step(rec, 40, (("r1", 1, True),))
    rec.flush()
    ring = rec.ring  # garble that last record's header (a torn write): counted, the rest goes on
    start = (ring.words[H_HEAD] - 9) % ring.rec_units  # a step with 1 request and 2 stages: 9 units
    ring.view[ring.rec_off + 16 * start + 4] ^= 0xFF
    step(rec, 1000, (("r1", 1, True),))
    p.process_pending()
    assert p.dropped["bad_record"] == 1
    # 42 records into a ring of 4 KiB (about 15 of these steps): what was not seen was counted
    assert p.dropped["ring_full"] + p.steps_seen + p.dropped["bad_record"] == 42
    assert p.dropped["ring_full"] >= 10 and p.steps_seen >= 1
    p.stop()


def test_request_links_are_bounded_first_and_last():
    rec, p, exp = make_pipeline(max_request_links=4)
    rec.request("r1", "arrive", clock_ns(), {"prompt_tokens": 3})
    for i in range(10):
        step(rec, i, (("r1", 1, True),))
    rec.request("r1", "finish", clock_ns(), None)
    p.process_pending()
    p.stop()
    spans = exp.get_finished_spans()
    steps = [s for s in spans if s.name == sc.STEP_SPAN]
    req = next(s for s in spans if s.attributes.get(sc.REQUEST_ID) == "r1")
    linked = [ln.context.span_id for ln in req.links]
    order = [s.context.span_id for s in sorted(steps, key=lambda s: s.start_time)]
    assert linked == order[:3] + [order[-1]]
    assert req.attributes[sc.REQUEST_STEPS] == 10 and req.attributes[sc.REQUEST_LINKS_DROPPED] == 6
    assert req.attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 10


def test_request_parent_through_the_ring_keeps_remote_and_front_end_ids():
    """A caller's context stays the parent (remote); ids vLLM's front end made for a request (tracestate
    prism=root, instrumentation/vllm/_join.py) come through the ring as the request span's own."""
    from opentelemetry import trace
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    from prism_otel.instrumentation.vllm._join import new_root_headers
    from prism_otel.otlp_encode import OTLPSink

    own = new_root_headers()
    _, tid, sid, _ = own["traceparent"].split("-")
    own_ctx = trace.set_span_in_context(NonRecordingSpan(SpanContext(
        int(tid, 16), int(sid, 16), True, TraceFlags(1), TraceState([("prism", "root")]))))
    caller = trace.set_span_in_context(NonRecordingSpan(SpanContext(0xABC, 0xDEF, True, TraceFlags(1))))
    for sdk in (True, False):
        if sdk:
            rec, p, exp = make_pipeline()
        else:
            class Keep:
                payloads = []

                def export(self, payload, n):
                    self.payloads.append(payload)

                def shutdown(self, timeout=None):
                    pass

            keep = Keep()
            rec = Recorder(1024)
            p = Pipeline(rec, None, "test", [], sink=OTLPSink({"service.name": "t"}, [keep], batch_spans=100))
        t = clock_ns()
        rec.request("own", "arrive", t, parent=own_ctx)
        rec.request("child", "arrive", t, parent=caller)
        step(rec, 1, (("own", 1, True), ("child", 1, True)), t + 10)
        rec.request("own", "finish", t + 3_000_000)
        rec.request("child", "finish", t + 3_000_000)
        p.process_pending()
        p.stop()
        if sdk:
            got = {s.attributes[sc.REQUEST_ID]: (s.context.trace_id, s.context.span_id,
                                                 s.parent.span_id if s.parent else None)
                   for s in exp.get_finished_spans() if sc.REQUEST_ID in s.attributes}
        else:
            p.sink.flush()
            got = {}
            for pl in keep.payloads:
                for rs in ExportTraceServiceRequest.FromString(pl).resource_spans:
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            ids = {a.key: a.value.string_value for a in s.attributes}
                            if sc.REQUEST_ID in ids:
                                got[ids[sc.REQUEST_ID]] = (int.from_bytes(s.trace_id, "big"),
                                                           int.from_bytes(s.span_id, "big"),
                                                           int.from_bytes(s.parent_span_id, "big") or None)
        assert got["own"] == (int(tid, 16), int(sid, 16), None), sdk
        assert got["child"][0] == 0xABC and got["child"][2] == 0xDEF and got["child"][1] != 0xDEF, sdk


def test_finish_before_its_last_step_keeps_the_last_token():
    """transformers finishes a request inside the step's update stage, so the finish reaches the ring
    just before that step; a poll in between must not close the span one token short. A finish that
    no step covers (an abort while idle) still closes, after the grace period."""
    import prism_otel.pipeline as pl
    rec, p, exp = make_pipeline()
    t = clock_ns() - 100_000_000  # steps in the past: the later finish of r2 is after all of them
    rec.request("r1", "arrive", t, {"prompt_tokens": 3})
    rec.request("r2", "arrive", t, {"prompt_tokens": 3})
    step(rec, 1, (("r1", 3, True), ("r2", 3, True)), t)
    rec.request("r1", "finish", t + 3_000_000, None)  # inside step 2, which ends at t + 4 ms
    p.process_pending()
    p.process_pending()  # an empty poll between the finish and its step
    step(rec, 2, (("r1", 1, True), ("r2", 1, True)), t + 2_000_000)
    p.process_pending()
    req = {s.attributes[sc.REQUEST_ID]: s for s in exp.get_finished_spans() if s.attributes.get(sc.REQUEST_ID)}
    assert req["r1"].attributes[sc.GEN_AI_USAGE_OUTPUT_TOKENS] == 2
    rec.request("r2", "finish", clock_ns(), None)  # no step follows
    p.process_pending()
    p.process_pending()
    assert "r2" in p._open, "closed before the grace period"
    old, pl.FINISH_GRACE_NS = pl.FINISH_GRACE_NS, 0
    try:
        p.process_pending()
    finally:
        pl.FINISH_GRACE_NS = old
    assert "r2" not in p._open
    p.stop()


def test_open_requests_are_bounded():
    rec, p, exp = make_pipeline(max_open_requests=5)
    for i in range(12):
        rec.request(f"r{i}", "arrive", clock_ns(), None)
    p.process_pending()
    assert len(p._open) == 5 and p.dropped["open_requests_full"] == 7
    evicted = [s for s in exp.get_finished_spans() if s.attributes.get(sc.REQUEST_STATUS) == "evicted"]
    assert len(evicted) == 7
    p.stop()


def test_otlp_json_ids_are_hex_both_ways():
    rec, p, exp = make_pipeline()
    step(rec, 1, ())
    p.process_pending()
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    req = encode_spans(exp.get_finished_spans())
    text = request_to_json(req)
    span = json.loads(text)["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(span["traceId"]) == 32 and int(span["traceId"], 16) >= 0
    assert request_from_json(text) == req
    with pytest.raises(OTLPJSONError):
        request_from_json('{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abc"}]}]}]}')
    with pytest.raises(OTLPJSONError):
        request_from_json(b"\xff not json")
    p.stop()


def test_pacer_wakes_about_once_per_step_within_bounds_and_backs_off_when_idle():
    from prism_otel.record import Pacer

    p = Pacer(busy_min_s=0.005, busy_max_s=0.02, idle_s=0.05, idle_after_s=1.0)
    assert p.wait_s(0, 100.0) == 0.05  # nothing seen yet: idle
    t = 0
    for _ in range(60):  # steps ending every 12 ms
        t += 12_000_000
        p.saw_step(t)
    assert abs(p.wait_s(3, 200.0) - 0.012) < 1e-4
    for _ in range(60):  # 2 ms steps: never below the floor
        t += 2_000_000
        p.saw_step(t)
    assert p.wait_s(1, 200.1) == 0.005
    for _ in range(60):  # 90 ms steps: never above the ceiling
        t += 90_000_000
        p.saw_step(t)
    assert p.wait_s(1, 200.2) == 0.02
    assert p.wait_s(0, 200.9) == 0.02  # still busy within a second of the last record
    assert p.wait_s(0, 201.3) == 0.05  # then idle
    p.saw_step(t - 5)  # an earlier end (another engine thread's key) does not move the mean
    assert p.wait_s(1, 202.0) == 0.02
    f = Pacer(busy_min_s=0.02, busy_max_s=0.05, idle_s=0.25, steps_per_wake=2.0)  # the forwarder's
    t = 0
    for _ in range(60):
        t += 12_000_000
        f.saw_step(t)
    assert abs(f.wait_s(3, 300.0) - 0.024) < 1e-4  # two steps per wake-up
    for _ in range(60):
        t += 40_000_000
        f.saw_step(t)
    assert f.wait_s(1, 300.1) == 0.05


def test_steps_whose_device_events_still_run_wait_for_a_later_hook_and_keep_order(monkeypatch):
    """An async engine's newest step may still be on the device when it is recorded: the recorder asks
    its events with a non-blocking query each time it writes (here: at each pipeline pass, which flushes
    it) and writes their time when they completed; the pipeline holds the step (and what follows, in
    order) until then. A step whose events never complete goes out after the hold, its device time
    unavailable."""
    import prism_otel.pipeline as pl

    class Dev:
        def __init__(self, pending):
            self.pending = pending
            self.queries = 0

        def resolve(self):
            self.queries += 1
            if self.pending > 0:
                self.pending -= 1
                return None, "pending"
            return 1234, "event"

    rec, p, exp = make_pipeline()
    seen = []
    p.on_step = seen.append
    t = clock_ns()
    d1, d2 = Dev(0), Dev(2)
    step(rec, 1, (("a", 1, True),), t, d1)  # completed when recorded
    step(rec, 2, (("a", 1, True),), t + 10, d2)  # still running
    rec.request("a", "finish", t + 5_000_000)
    p.process_pending()
    assert [s.device_ns for s in seen] == [1234]
    assert d2.queries == 1, "asked once per flush, never waited on"
    step(rec, 3, (("a", 1, True),), t + 20)  # the next hook asks again: still running
    p.process_pending()
    assert len(seen) == 1, "held, and what follows waits with it"
    step(rec, 4, (), t + 30)  # ... and again: done now
    p.process_pending()
    assert [s.device_ns for s in seen] == [1234, 1234, 1_900_000 - 100, 1_900_000 - 100]
    assert seen[1].attributes[sc.DEVICE_TIMING] == "event" and seen[2].attributes[sc.DEVICE_TIMING] == "host"
    step(rec, 5, (), t + 40, Dev(10 ** 6))  # never completes
    p.process_pending()
    assert len(seen) == 4
    monkeypatch.setattr(pl, "HOLD_DEVICE_NS", 0)
    p.process_pending()
    assert len(seen) == 5 and seen[4].device_ns is None and seen[4].attributes[sc.DEVICE_TIMING] == "unavailable"
    p.stop()
