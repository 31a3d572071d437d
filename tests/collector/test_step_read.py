"""The collector's fast step path gives exactly what the per-object path gives.

* ``read_step`` (a step span's attributes read from their wire bytes, entries cached by those bytes) builds
  the same StepRecord, or raises the same BadSpan, as the loop over the protobuf objects it replaced
  (kept here as the reference), on well-formed and on malformed attributes;
* ``tag_new_verdict`` (the verdict appended as wire bytes) leaves the span byte-for-byte as ``tag_step``;
* a recorded corpus (vLLM CPU steps, four instances sharing one model) through the assembler comes out
  byte-for-byte as through the reference reader, the detector's batched path on the same batches and
  ``tag_step``: the same verdicts on every step, and enough anomalies among them that the comparison means
  something. (Judging a batch gives the verdicts of judging step by step: tests/processors/
  test_detector_state.py.)
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from prism_eval.simulate import corpus
from prism_eval.simulate.stepcsv import parse_row
from prism_otel import semconv as sc
from prism_otel.record import BatchChange, StepRecord, Verdict
from processors import anomaly as anomaly_mod
from processors import assembly as asm
from processors.anomaly import AnomalyProcessor
from processors.assembler import StepAssembler
from tests.collector.spans_util import make_step, render, to_request


def reference_step(span, resource, children=()) -> StepRecord:
    """The per-object reader (processors.assembly before it read wire bytes)."""
    f, extras, signals = {}, {}, {}
    for kv in span.attributes:
        key = kv.key
        spec = asm._STEP_FIELDS.get(key)
        if spec is not None:
            if spec[0] != asm._SKIP:
                x = asm._typed(key, spec[0], kv.value)
                if x is asm._ABSENT:
                    f.pop(spec[1], None)
                else:
                    f[spec[1]] = x
            continue
        if key.startswith("prism."):
            if key.startswith(sc.SIGNAL_PREFIX):
                x = asm._typed(key, asm._NUM, kv.value)
                if x is asm._ABSENT:
                    raise asm.BadSpan(key, None)
                signals[key[len(sc.SIGNAL_PREFIX):]] = x
                continue
            if key.startswith(sc.FPM_PREFIX):
                continue
        v = kv.value
        which = v.WhichOneof("value")
        extras[key] = getattr(v, which) if which in asm._SCALARS else asm.any_value(v)
    stages, kernels = {}, {}
    for kind, name, t0, t1 in sorted(children, key=lambda c: c[2]):
        if kind == asm.STAGE:
            stages[name] = (t0, t1)
        else:
            kernels[name] = t1 - t0
    verdict = None
    if "anomaly" in f:
        verdict = Verdict(expected_ms=f.get("expected"), score=f.get("score"), anomaly=f["anomaly"],
                          root_cause=f.get("root"), alert=any(e.name == sc.ALERT_EVENT for e in span.events),
                          slo_violations=f.get("slo", ()))
    change = None
    if all(k in f for k in ("c0", "c1", "c2", "c3", "c4")):
        change = BatchChange(f["c0"], f["c1"], f["c2"], f["c3"], f["c4"])
    kv, dev = f.get("kv"), f.get("dev")
    return StepRecord(
        instance=str(f.get("instance") or resource.get(sc.RES_SERVICE_INSTANCE_ID) or ""), index=f.get("index", 0),
        start_ns=span.start_time_unix_nano, end_ns=span.end_time_unix_nano, phase=f.get("phase") or "idle",
        batch_size=f.get("batch_size", 0), prefill_tokens=f.get("prefill_tokens", 0),
        decode_tokens=f.get("decode_tokens", 0), context_tokens=f.get("context_tokens", 0),
        max_context_tokens=f.get("max_context_tokens", 0), kv_usage=float(kv) if kv is not None else None,
        stages=stages, kernel_groups=kernels, device_ns=int(round(dev * 1e6)) if dev is not None else None,
        request_ids=f.get("request_ids", ()), verdict=verdict, change=change, attributes=extras, signals=signals)


def _step_span():
    steps = [make_step(0, batch=3, context_tokens=-5, attributes={"engine.extra": "x", "engine.n": 5})]
    req = to_request(render(steps))
    return next(s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans if s.name == sc.STEP_SPAN)


def _set(span, key, fill) -> None:
    kv = span.attributes.add()
    kv.key = key
    fill(kv.value)


ODD = [
    ("int as double", sc.BATCH_SIZE, lambda v: setattr(v, "double_value", 7.9)),
    ("negative int", sc.BATCH_CONTEXT_TOKENS, lambda v: setattr(v, "int_value", -(1 << 62))),
    ("huge int", sc.STEP_INDEX, lambda v: setattr(v, "int_value", (1 << 63) - 1)),
    ("NaN count", sc.BATCH_SIZE, lambda v: setattr(v, "double_value", math.nan)),
    ("string count", sc.BATCH_DECODE_TOKENS, lambda v: setattr(v, "string_value", "abc")),
    ("bool count", sc.BATCH_SIZE, lambda v: setattr(v, "bool_value", True)),
    ("empty value", sc.BATCH_SIZE, lambda v: None),
    ("int phase", sc.STEP_PHASE, lambda v: setattr(v, "int_value", 3)),
    ("unicode instance", sc.STEP_INSTANCE, lambda v: setattr(v, "string_value", "gpu-é-" + "x" * 300)),
    ("request ids", sc.BATCH_REQUEST_IDS, lambda v: [v.array_value.values.add().__setattr__("string_value", "r1"),
                                                     v.array_value.values.add().__setattr__("int_value", 7)]),
    ("bad request ids", sc.BATCH_REQUEST_IDS, lambda v: setattr(v, "string_value", "r1")),
    ("signal", sc.SIGNAL_PREFIX + "gc.ms", lambda v: setattr(v, "double_value", 1.25)),
    ("int signal", sc.SIGNAL_PREFIX + "gc.count", lambda v: setattr(v, "int_value", 2)),
    ("bad signal", sc.SIGNAL_PREFIX + "gc.ms", lambda v: setattr(v, "string_value", "x")),
    ("empty signal", sc.SIGNAL_PREFIX + "gc.ms", lambda v: None),
    ("verdict", sc.ANOMALY, lambda v: setattr(v, "bool_value", False)),
    ("verdict score", sc.ANOMALY_SCORE, lambda v: setattr(v, "double_value", 0.5)),
    ("child count as double", sc.STEP_CHILDREN, lambda v: setattr(v, "double_value", 3.0)),
    ("extra list", "engine.list", lambda v: v.array_value.values.add().__setattr__("int_value", 1)),
    ("extra map", "engine.map", lambda v: v.kvlist_value.values.add().__setattr__("key", "k")),
    ("extra bytes", "engine.bytes", lambda v: setattr(v, "bytes_value", b"\x00\xff")),
    ("long key", "engine." + "k" * 200, lambda v: setattr(v, "double_value", -0.0)),
    ("change", sc.BATCH_STEPS_SINCE_CHANGE, lambda v: setattr(v, "int_value", 0)),
]


@pytest.mark.parametrize("name,key,fill", ODD, ids=[o[0] for o in ODD])
def test_read_step_is_the_per_object_reader(name, key, fill):
    for twice in (False, True):  # the second time from the entry cache
        span = _step_span()
        _set(span, key, fill)
        if twice:
            _set(span, key, fill)
        kids = [(asm.STAGE, "forward", span.start_time_unix_nano + 5, span.end_time_unix_nano),
                (asm.KERNEL, "gemm", 1, 9), (asm.STAGE, "schedule", span.start_time_unix_nano, span.start_time_unix_nano + 5)]
        res = {sc.RES_SERVICE_INSTANCE_ID: "r-1"}
        try:
            want = reference_step(span, res, kids)
        except asm.BadSpan as exc:
            with pytest.raises(asm.BadSpan) as got:
                asm.step_from_span(span, res, kids)
            assert (got.value.key, str(got.value)) == (exc.key, str(exc))
            continue
        got = asm.step_from_span(span, res, kids)
        assert got == want
        assert {k: type(v) for k, v in dataclasses.asdict(got).items()} == \
            {k: type(v) for k, v in dataclasses.asdict(want).items()}
        attrs = asm.read_step(span)
        assert attrs.expected == asm.expected_children(span)
        assert attrs.has_verdict == any(kv.key in asm.VERDICT_KEYS for kv in span.attributes)


@pytest.mark.parametrize("verdict", [
    Verdict(expected_ms=12.5, score=0.25, anomaly=False),
    Verdict(expected_ms=12.5, score=3.5, anomaly=True, root_cause="stage.forward", test="point"),
    Verdict(expected_ms=None, score=None, anomaly=True),
    Verdict(expected_ms=1e-300, score=-0.0, anomaly=False, root_cause="cpu.contention " * 20),
    Verdict(expected_ms=12.5, score=3.5, anomaly=True, alert=True),
    Verdict(expected_ms=12.5, score=1.0, anomaly=True, slo_violations=("step",)),
])
def test_tag_new_verdict_is_tag_step(verdict):
    a = _step_span()
    b = Span()
    b.CopyFrom(a)
    before = asm.step_from_span(a, {})
    after = before.with_verdict(verdict)
    asm.tag_step(a, before, after)
    asm.tag_new_verdict(b, before, after)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def _corpus_requests(n_inst: int = 4, steps: int = 450, per_request: int = 40):
    rows = corpus.read_steps(os.path.join(corpus.available()["vllm-small"], "steps.csv.gz"))
    reqs = []
    for k in range(n_inst):
        recs = []
        for j in range(steps):
            rec, _ = parse_row(rows[(k * 700 + j) % len(rows)], j)
            if rec is not None:
                recs.append(dataclasses.replace(rec, instance=f"vllm-{k}", index=j))
        res = {sc.RES_SERVICE_INSTANCE_ID: f"vllm-{k}", sc.RES_SERVICE_NAME: "vllm", sc.RES_FRAMEWORK: "vllm"}
        for i in range(0, len(recs), per_request):
            reqs.append((i, k, to_request(render(recs[i:i + per_request], res)).SerializeToString()))
    return [raw for _, _, raw in sorted(reqs)]  # the instances interleaved, request by request


def test_corpus_through_the_assembler_is_the_reference_path(monkeypatch):
    monkeypatch.setattr(anomaly_mod, "FLEET_FIT_SHARE", float("inf"))  # refits spaced by steps only: reproducible
    cfg = {"background": False, "alert_log": False, "alert_file": "none"}
    fast_det, ref_det = AnomalyProcessor(dict(cfg)), AnomalyProcessor(dict(cfg))
    fast = StepAssembler([fast_det])
    judged = anomalous = 0
    for raw in _corpus_requests():
        got = ExportTraceServiceRequest.FromString(raw)
        out = fast.process(got)
        assert len(out) == 1 and out[0][0] is got  # nothing held: every step's children came first
        want = ExportTraceServiceRequest.FromString(raw)
        for rs in want.resource_spans:
            res = asm.attrs_of(rs.resource.attributes)
            ref_det.observe_resource(res[sc.RES_SERVICE_INSTANCE_ID], res)
            for ss in rs.scope_spans:
                kids = asm.children_by_step(ss.spans)
                spans = [s for s in ss.spans if s.name == sc.STEP_SPAN]
                befores = [reference_step(s, res, kids.get(s.trace_id + s.span_id, ())) for s in spans]
                for s, before, after in zip(spans, befores, ref_det.process_many(befores)):
                    asm.tag_step(s, before, after)
                    judged += after.verdict is not None
                    anomalous += bool(after.verdict is not None and after.verdict.anomaly)
        assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    assert judged > 1000 and anomalous > 5
    assert fast_det.stats()["fits"] >= 2
