"""Fuzzing the collector's untrusted-input paths with hypothesis (issue 16).

* span -> StepRecord conversion and the assembler: prism spans with attributes of any type and value
  (nested arrays and kvlists, NaN, infinities, huge ints, bools where numbers belong), any times and
  child counts. ``StepAssembler.process`` never raises and forwards every span exactly once;
  ``step_from_span`` / ``request_from_span`` either build a record or raise ``BadSpan``.
* the receivers' decoders: arbitrary bytes and mutated valid requests (protobuf), arbitrary JSON
  trees (OTLP/JSON): a request or ``Malformed``, nothing else; invalid ids are dropped span by span.
* the HTTP front end on a real socket: arbitrary request heads and bodies always get an HTTP answer
  (or a closed connection) and the receiver keeps serving.

Brief in ``make test`` (a few seconds). At length::

    PRISM_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/fuzz --hypothesis-show-statistics

docs/collector.md records the runs and what they found.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the dev environment needs hypothesis (see pyproject dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.proto.common.v1.common_pb2 import AnyValue  # noqa: E402

from prism_otel import semconv as sc  # noqa: E402
from processors import assembly as asm  # noqa: E402
from processors.assembler import StepAssembler  # noqa: E402
from processors.fleet import FleetProcessor  # noqa: E402
from processors.slo import SLOProcessor  # noqa: E402
from receivers.otlp.decode import Malformed, decode_json, decode_protobuf, drop_invalid_spans  # noqa: E402
from tests.collector.spans_util import make_step, render, to_request  # noqa: E402

EXAMPLES = int(os.environ.get("PRISM_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
pytestmark = pytest.mark.timeout(max(900, EXAMPLES // 4))  # a long run takes ~0.1 s per assembler example

KEYS = [sc.STEP_INDEX, sc.STEP_PHASE, sc.STEP_INSTANCE, sc.STEP_CHILDREN, sc.BATCH_SIZE, sc.BATCH_PREFILL_TOKENS,
        sc.BATCH_DECODE_TOKENS, sc.BATCH_CONTEXT_TOKENS, sc.BATCH_MAX_CONTEXT_TOKENS, sc.BATCH_REQUEST_IDS,
        sc.KV_CACHE_USAGE, sc.DEVICE_TIME_MS, sc.ANOMALY, sc.ANOMALY_SCORE, sc.LATENCY_EXPECTED_MS,
        sc.ANOMALY_ROOT_CAUSE, sc.SLO_VIOLATED, sc.REQUEST_ID, sc.REQUEST_TTFT_MS, sc.REQUEST_TPOT_MS,
        sc.REQUEST_QUEUE_MS, sc.REQUEST_STEPS, sc.REQUEST_STATUS, sc.GEN_AI_USAGE_OUTPUT_TOKENS, "engine.extra"]
U64 = st.integers(min_value=0, max_value=2**64 - 1)

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=12)


_SETTER = {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value", bytes: "bytes_value"}


def fill(target: AnyValue, v) -> None:
    """Any generated value into an OTLP AnyValue (arrays and kvlists recursively)."""
    if isinstance(v, list):
        for x in v:
            fill(target.array_value.values.add(), x)
    elif isinstance(v, dict):
        for k, x in v.items():
            kv = target.kvlist_value.values.add()
            kv.key = k
            fill(kv.value, x)
    elif v is not None:
        setattr(target, _SETTER[type(v)], v)


@st.composite
def span_specs(draw):
    name = draw(st.sampled_from([sc.STEP_SPAN, sc.STEP_SPAN, "prism.stage.forward", "prism.stage.schedule",
                                 "prism.kernels.gemm", "llm.request", "other"]))
    attrs = draw(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=8))
    return name, attrs, draw(U64), draw(U64), draw(st.integers(0, 3)), draw(st.integers(0, 3))


def build_request(specs) -> ExportTraceServiceRequest:
    """Spans share a few trace/parent ids so children find their steps."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    kv = rs.resource.attributes.add()
    kv.key, kv.value.string_value = sc.RES_SERVICE_INSTANCE_ID, "fuzz"
    ss = rs.scope_spans.add()
    for i, (name, attrs, t0, t1, tid, parent) in enumerate(specs):
        s = ss.spans.add()
        s.name = name
        s.trace_id = bytes([tid + 1]) * 16
        s.span_id = (i + 1).to_bytes(8, "big")
        if name != sc.STEP_SPAN and parent:
            s.parent_span_id = parent.to_bytes(8, "big")
        s.start_time_unix_nano, s.end_time_unix_nano = t0, t1
        for key, v in attrs:
            a = s.attributes.add()
            a.key = key
            fill(a.value, v)
    return req


def _ids(outs):
    return [s.span_id for req, _ in outs for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]


_PROCS = []


def _processors():
    """One set for every example: their state carries over, as in a long-running collector."""
    if not _PROCS:
        from processors.anomaly import AnomalyProcessor

        _PROCS.extend([AnomalyProcessor({"background": False, "alert_file": "none"}),
                       FleetProcessor(min_steps=4, window=8), SLOProcessor({"step_ms": 5, "metrics": False})])
    return _PROCS


@FUZZ
@given(st.lists(st.lists(span_specs(), min_size=1, max_size=12), min_size=1, max_size=3))
def test_assembler_never_raises_and_forwards_every_span_once(batches):
    a = StepAssembler(_processors(), wait_s=0.0)
    sent, got = [], []
    for k, specs in enumerate(batches):
        req = build_request(specs)
        sent += [s.span_id + bytes([k]) for s in req.resource_spans[0].scope_spans[0].spans]
        got += [i + bytes([k]) for i in _ids(a.process(req, k))]
        got += [i + bytes([k]) for i in _ids(a.expire())]
    got += [i + bytes([len(batches) - 1]) for i in _ids(a.flush())]  # held steps: tagged with the last batch
    assert len(got) == len(sent)
    assert sorted(i[:8] for i in got) == sorted(i[:8] for i in sent)


@FUZZ
@given(span_specs())
def test_conversion_builds_a_record_or_says_bad_span(spec):
    span = build_request([spec]).resource_spans[0].scope_spans[0].spans[0]
    for convert in (lambda: asm.step_from_span(span, {"service.instance.id": "x"}, [(0, "forward", 1, 2)]),
                    lambda: asm.request_from_span(span, {})):
        try:
            convert()
        except asm.BadSpan:
            pass


def _valid_payload() -> bytes:
    return to_request(render([make_step(i) for i in range(3)])).SerializeToString()


VALID = _valid_payload()


@st.composite
def mutated(draw):
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at:at + draw(st.integers(1, 16))]
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=512), mutated()))
def test_protobuf_decoding_gives_a_request_or_malformed(raw):
    try:
        req = decode_protobuf(raw)
    except Malformed:
        return
    kept, dropped, _ = drop_invalid_spans(req)
    assert kept + dropped >= 0
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            assert all(len(s.trace_id) == 16 and len(s.span_id) == 8 for s in ss.spans)


json_trees = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=16)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["resourceSpans", "scopeSpans", "spans", "traceId",
                                                             "spanId", "parentSpanId", "name", "attributes", "key",
                                                             "value", "intValue", "stringValue", "arrayValue",
                                                             "values", "kvlistValue", "resource", "x"]),
                                            inner, max_size=5)),
    max_leaves=30)


@FUZZ
@given(st.one_of(json_trees.map(lambda t: json.dumps(t).encode()), st.binary(max_size=256)))
def test_json_decoding_gives_a_request_or_malformed(raw):
    try:
        decode_json(raw)
    except Malformed:
        pass


@pytest.fixture(scope="module")
def http_port(tmp_path_factory):
    from tests.collector.harness import base_config, service

    out = tmp_path_factory.mktemp("fuzz") / "out.jsonl"
    with service(base_config(exporters={"file": {"path": str(out)}})) as svc:
        yield svc.receivers["otlp"].http_port


heads = st.lists(st.one_of(
    st.sampled_from(["Content-Type: application/x-protobuf", "Content-Type: application/json",
                     "Content-Encoding: gzip", "Content-Encoding: deflate", "Transfer-Encoding: chunked",
                     "Expect: 100-continue", "Connection: close", "Content-Length: 5", "Content-Length: -1",
                     "Content-Length: 99999999999", "Authorization: Bearer x"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)), max_size=6)


@FUZZ
@given(st.sampled_from(["POST", "GET", "PUT", "X", ""]), st.sampled_from(["/v1/traces", "/", "/v1/traces?x=1", "*"]),
       heads, st.one_of(st.binary(max_size=200), mutated()))
def test_http_front_end_always_answers_and_keeps_serving(http_port, method, path, lines, body):
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{ln}\r\n" for ln in lines)
    if not any(ln.lower().startswith(("content-length", "transfer-encoding")) for ln in lines):
        head += f"Content-Length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", http_port), timeout=20) as s:
        try:
            s.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may have answered and closed before the body went out
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data == b"" or data.startswith(b"HTTP/1.1 "), data[:60]
    assert not data.startswith(b"HTTP/1.1 500"), data[:200]
    with socket.create_connection(("127.0.0.1", http_port), timeout=20) as s:  # still serving
        s.sendall(b"GET /v1/traces HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 405")
