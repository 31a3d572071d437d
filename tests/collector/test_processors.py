"""The collector-side processors on real OTLP requests: prism_slo tags request and step spans,
prism_fleet catches an instance that is slow from its first step, all in one assembler."""

from __future__ import annotations

import random

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism_otel import semconv as sc
from prism_otel.record import RequestRecord
from prism_otel.spans import SpanMaterializer
from processors import assembly as asm
from processors.assembler import StepAssembler
from processors.fleet import FleetProcessor
from processors.slo import SLOProcessor
from tests.collector.spans_util import make_step, render, to_request


def _spans(out):
    return [s for req, _ in out for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


def test_prism_slo_tags_request_and_step_spans():
    exp = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.instance.id": "i-0"}))
    tp.add_span_processor(SimpleSpanProcessor(exp))
    m = SpanMaterializer(tp)
    t0 = 1_700_000_000_000_000_000
    for rid, ttft_ms in (("fast", 20), ("slow", 120)):
        h = m.open_request(rid, t0, prompt_tokens=10)
        rec = RequestRecord(instance="i-0", request_id=rid, arrival_ns=t0, end_ns=t0 + 400_000_000,
                            first_scheduled_ns=t0 + 1_000_000, first_token_ns=t0 + ttft_ms * 1_000_000,
                            last_token_ns=t0 + 300_000_000, prompt_tokens=10, output_tokens=20, steps=20)
        m.close_request(h, rec, [], 20)
    m.step(make_step(0, dur_ms=10))
    m.step(make_step(1, dur_ms=30))
    req = to_request(exp.get_finished_spans())
    a = StepAssembler([SLOProcessor({"ttft_ms": 50, "step_ms": 15, "metrics": False})], wait_s=5)
    spans = _spans(a.process(req, 1))
    by_req = {asm.request_id_of(s): asm.attrs_of(s.attributes) for s in spans if asm.request_id_of(s)}
    assert by_req["slow"][sc.SLO_VIOLATED] == [sc.SLO_TARGET_TTFT]
    assert sc.SLO_VIOLATED not in by_req["fast"]
    steps = {asm.attrs_of(s.attributes)[sc.STEP_INDEX]: asm.attrs_of(s.attributes) for s in spans if asm.is_step(s)}
    assert steps[1][sc.SLO_VIOLATED] == [sc.SLO_TARGET_STEP] and sc.SLO_VIOLATED not in steps[0]


def test_request_round_trip_from_span():
    exp = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.instance.id": "i-9"}))
    tp.add_span_processor(SimpleSpanProcessor(exp))
    m = SpanMaterializer(tp)
    t0 = 1_700_000_000_000_000_000
    rec = RequestRecord(instance="i-9", request_id="r", arrival_ns=t0, end_ns=t0 + 900_000_000,
                        first_scheduled_ns=t0 + 2_000_000, first_token_ns=t0 + 50_000_000,
                        last_token_ns=t0 + 850_000_000, prompt_tokens=33, output_tokens=41, steps=41)
    m.close_request(m.open_request("r", t0, prompt_tokens=33), rec, [], 41)
    req = to_request(exp.get_finished_spans())
    span = req.resource_spans[0].scope_spans[0].spans[0]
    back = asm.request_from_span(span, asm.attrs_of(req.resource_spans[0].resource.attributes))
    assert back == rec


def test_prism_fleet_catches_an_instance_slow_from_its_first_step():
    rng = random.Random(3)
    fleet = FleetProcessor(min_steps=16, window=64)
    a = StepAssembler([fleet], wait_s=5)
    res = {"service.name": "llm", sc.RES_FRAMEWORK: "transformers", sc.RES_DEVICE_KIND: "cpu"}
    tagged = {}
    for k in range(0, 120, 20):
        for inst, factor in (("a", 1.0), ("b", 1.0), ("c", 1.0), ("slow", 1.6)):
            steps = []
            for i in range(k, k + 20):
                b = rng.randint(1, 32)
                steps.append(make_step(i, instance=inst, batch=b, dur_ms=(1.5 + 0.4 * b) * factor * rng.uniform(0.95, 1.05),
                                       context_tokens=b * rng.randint(100, 900)))
            for s in _spans(a.process(to_request(render(steps, dict(res, **{"service.instance.id": inst}))), k)):
                if asm.is_step(s):
                    at = asm.attrs_of(s.attributes)
                    tagged[(inst, at[sc.STEP_INDEX])] = at
    late = {inst: [tagged[(inst, i)] for i in range(60, 120)] for inst in ("a", "b", "c", "slow")}
    assert all(t[sc.FLEET_SLOW] is True and t[sc.ANOMALY] is True for t in late["slow"])
    assert all(1.4 < t[sc.FLEET_RATIO] < 1.9 for t in late["slow"])
    assert not any(t[sc.FLEET_SLOW] for inst in "abc" for t in late[inst])
    assert all(t[sc.FLEET_PEERS] == 3 for t in late["slow"])


def test_fleet_keys_keep_different_hardware_apart():
    fleet = FleetProcessor(min_steps=8, window=32)
    a = StepAssembler([fleet], wait_s=5)
    for inst, dev, factor in (("cpu-1", "cpu", 1.0), ("gpu-1", "cuda", 0.2)):
        steps = [make_step(i, instance=inst, dur_ms=10 * factor) for i in range(40)]
        out = a.process(to_request(render(steps, {"service.instance.id": inst, sc.RES_DEVICE_KIND: dev})), 1)
        assert not any(asm.attrs_of(s.attributes).get(sc.FLEET_SLOW) for s in _spans(out))
    assert fleet.instances() == {}  # one instance per key: nobody to compare with
