"""StepRecord -> spans (prism_otel.spans) -> OTLP protobuf -> StepRecord (processors.assembly) round trip,
and the assembler's handling of children that come in other requests."""

from __future__ import annotations

import dataclasses

from prism_otel import semconv as sc
from prism_otel.record import BatchChange, StepRecord, Verdict
from processors import assembly as asm
from processors.assembler import StepAssembler
from processors.base import StepProcessor
from tests.collector.spans_util import make_step, render, to_request


class Capture(StepProcessor):
    name = "capture"

    def __init__(self, verdict=None):
        self.seen = []
        self.verdict = verdict

    def process(self, step):
        self.seen.append(step)
        if self.verdict is not None:
            return dataclasses.replace(step, verdict=self.verdict)
        return step


def _full_step() -> StepRecord:
    base = make_step(3, instance="host:42", dur_ms=12.5, batch=3, phase="mixed", prefill_tokens=17,
                     decode_tokens=2, context_tokens=901, max_context_tokens=512)
    fwd = base.stages["forward"]
    return dataclasses.replace(
        base, kv_usage=0.375, kernel_groups={"attention": 1_234_567, "gemm": 5_000_001, "norm": 17},
        device_ns=9_876_543, request_ids=("r1", "r2", "r3"), attributes={"engine.extra": "x", "engine.n": 5},
        verdict=Verdict(expected_ms=7.25, score=0.72, anomaly=True, root_cause="stage.forward", alert=True,
                        slo_violations=("step",)),
        stages={**base.stages, "forward": fwd}, change=BatchChange(1, 2, 17, 4, 0),
        signals={"gc.ms": 1.25, "gc.count": 2})


def test_round_trip_step_record_through_spans_and_otlp():
    step = _full_step()
    req = to_request(render([step]))
    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(spans) == 1 + len(step.stages) + len(step.kernel_groups)
    (parent,) = [s for s in spans if asm.is_step(s)]
    kids = [asm.child_info(s) for s in spans if not asm.is_step(s)]
    assert asm.expected_children(parent) == len(kids)
    back = asm.step_from_span(parent, {}, kids)
    assert back == step


def test_round_trip_minimal_step_and_resource_instance():
    step = StepRecord(instance="", index=0, start_ns=10, end_ns=2_000_010, phase="decode", batch_size=1,
                      prefill_tokens=0, decode_tokens=1)
    req = to_request(render([step], {"service.instance.id": "pod-7"}))
    (span,) = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    res = asm.attrs_of(req.resource_spans[0].resource.attributes)
    back = asm.step_from_span(span, res, ())
    assert back == dataclasses.replace(step, instance="pod-7")  # no step instance: the resource's
    assert asm.step_from_span(span, res, ()).kernel_groups == {}


def test_assembler_tags_step_and_forwards_everything_once():
    steps = [make_step(i) for i in range(5)]
    req = to_request(render(steps))
    n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    cap = Capture(Verdict(expected_ms=5.0, score=0.9, anomaly=True, root_cause="stage.forward"))
    a = StepAssembler([cap], wait_s=10)
    out = a.process(req, source=1)
    assert [src for _, src in out] == [{1: n}]
    assert [s.index for s in cap.seen] == [0, 1, 2, 3, 4]
    assert all(set(s.stages) == {"schedule", "forward", "sample"} for s in cap.seen)
    fwd = [s for rs in out[0][0].resource_spans for ss in rs.scope_spans for s in ss.spans]
    tagged = [asm.attrs_of(s.attributes) for s in fwd if asm.is_step(s)]
    assert len(tagged) == 5 and all(t[sc.ANOMALY] is True and t[sc.ANOMALY_ROOT_CAUSE] == "stage.forward"
                                    for t in tagged)
    assert a.held == 0


def _split(req):
    """(children-only request, steps-only request)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    kids, steps = ExportTraceServiceRequest(), ExportTraceServiceRequest()
    for target, want_step in ((kids, False), (steps, True)):
        target.CopyFrom(req)
        for rs in target.resource_spans:
            for ss in rs.scope_spans:
                for i in reversed(range(len(ss.spans))):
                    if asm.is_step(ss.spans[i]) != want_step:
                        del ss.spans[i]
    return kids, steps


def test_step_before_children_is_held_until_they_arrive():
    req = to_request(render([make_step(0), make_step(1)]))
    kids, steps = _split(req)
    cap = Capture()
    a = StepAssembler([cap], wait_s=10)
    assert a.process(steps, source="s") == []  # both steps held: no children yet
    assert a.held == 2 and cap.seen == []
    out = a.process(kids, source="k")
    assert a.held == 0
    srcs = [src for _, src in out]
    assert srcs == [{"k": 6}, {"s": 2}]
    assert [set(s.stages) for s in cap.seen] == [{"schedule", "forward", "sample"}] * 2


def test_held_step_released_after_wait_and_late_children_counted():
    now = [0.0]
    counts = {}

    def count(name, n=1, **labels):
        counts[name] = counts.get(name, 0) + n

    req = to_request(render([make_step(0)]))
    kids, steps = _split(req)
    cap = Capture()
    a = StepAssembler([cap], wait_s=0.5, count=count, clock=lambda: now[0])
    assert a.process(steps, source=1) == []
    now[0] = 0.4
    assert a.expire() == []
    now[0] = 0.6
    out = a.expire()
    assert len(out) == 1 and out[0][1] == {1: 1}
    assert cap.seen[0].stages == {}  # released with what had arrived: nothing
    out = a.process(kids, source=2)  # late children: forwarded, counted
    assert [src for _, src in out] == [{2: 3}]
    assert counts[sc.COLLECTOR_LATE_CHILDREN] == 3


def test_children_in_an_earlier_request_are_used():
    req = to_request(render([make_step(0)]))
    kids, steps = _split(req)
    cap = Capture()
    a = StepAssembler([cap], wait_s=10)
    assert [src for _, src in a.process(kids, source=1)] == [{1: 3}]
    assert [src for _, src in a.process(steps, source=2)] == [{2: 1}]
    assert set(cap.seen[0].stages) == {"schedule", "forward", "sample"}


def test_held_steps_are_bounded():
    req = to_request(render([make_step(i) for i in range(10)]))
    _, steps = _split(req)
    a = StepAssembler([Capture()], wait_s=100, max_pending_steps=4)
    out = a.process(steps, source=1)
    assert a.held == 4
    assert sum(src[1] for _, src in out) == 6
