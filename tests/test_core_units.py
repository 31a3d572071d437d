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
from prism_otel.record import STEP, Recorder, StepFeatures, classify_phase, clock_ns


def make_pipeline(cap=1024, **kw):
    exp = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exp))
    rec = Recorder(cap)
    return rec, Pipeline(rec, tp, "test", [], **kw), exp


def step(rec, key, reqs, t=None):
    t = t or clock_ns()
    rec.emit((STEP, key, t, t + 2_000_000, StepFeatures("decode", len(reqs), 0, len(reqs), 10, 10), reqs, None,
              (("schedule", t, t + 100), ("forward", t + 100, t + 1_900_000))))


def test_ring_overwrites_oldest_and_counts():
    rec = Recorder(16)
    for i in range(20):
        rec.emit((99, i))
    assert rec.dropped == 4 and len(rec) == 16
    assert rec.drain()[0] == (99, 4)
    with pytest.raises(ValueError):
        Recorder(4)


def test_phase_classification():
    assert classify_phase(5, 0) == "prefill" and classify_phase(0, 3) == "decode"
    assert classify_phase(5, 3) == "mixed" and classify_phase(0, 0) == "idle"


def test_pipeline_counts_ring_drops_and_survives_bad_records():
    rec, p, exp = make_pipeline(cap=16)
    for i in range(40):
        step(rec, i, (("r1", 1, True),))
    rec.emit((STEP, "bad"))  # malformed: counted, the rest goes on
    step(rec, 1000, (("r1", 1, True),))
    p.process_pending()
    assert p.dropped["ring_full"] == 26  # 42 records into 16 slots
    assert p.dropped["bad_record"] == 1
    assert p.steps_seen == 15
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


def test_forwarder_holds_steps_whose_device_events_still_run_and_keeps_order(monkeypatch):
    """An async engine's newest step may still be on the device when the forwarder wakes: it and
    what follows wait for the next wake-up (no polling sleeps), in order; after the hold limit, or
    at stop, the step is resolved (or marked unavailable) and sent."""
    import os
    import time

    from prism_otel import companion
    from prism_otel._child import read_frame

    class Dev:
        def __init__(self, pending):
            self.pending = pending

        def resolve(self):
            if self.pending > 0:
                self.pending -= 1
                return None, "pending"
            return 1234, "event"

    rec = Recorder(64)
    fw = companion.Forwarder(rec, "test")
    r, w = os.pipe()
    fw._wfd = w
    try:
        t = clock_ns()
        feat = StepFeatures("decode", 1, 0, 1, 10, 10)
        rec.emit((STEP, 1, t, t + 10, feat, (("a", 1, True),), Dev(0), ()))
        rec.emit((STEP, 2, t + 10, t + 20, feat, (("a", 1, True),), Dev(1), ()))
        rec.request("a", "finish", t + 25, None)
        assert fw._send_pending() == 3
        first = read_frame(r)
        assert [x[1] for x in first] == [1] and first[0][6].ns == 1234
        assert len(fw._carry) == 2 and not fw.flush(timeout=0.01)
        rec.emit((STEP, 3, t + 20, t + 30, feat, (), Dev(0), ()))
        assert fw._send_pending() == 1  # step 2 is done now: 2, the finish, then 3, in order
        second = read_frame(r)
        assert [x[1] for x in second] == [2, "a", 3] and second[0][6].ns == 1234 and not fw._carry
        rec.emit((STEP, 4, t + 30, t + 40, feat, (), Dev(10**6), ()))  # never completes
        fw._send_pending()
        assert fw._carry
        monkeypatch.setattr(companion, "HOLD_PENDING_S", 0.0)
        time.sleep(0.01)
        fw._send_pending()
        third = read_frame(r)
        assert third[0][1] == 4 and third[0][6].timing == "unavailable" and not fw._carry
    finally:
        os.close(r)
        os.close(w)
