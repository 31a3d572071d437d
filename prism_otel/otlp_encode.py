"""OTLP protobuf straight from `StepRecord` / `RequestRecord`: the companion's span sink.

No SDK span object exists per step: each span is written as the bytes of one ``Span`` message of
``opentelemetry/proto/trace/v1/trace.proto`` (field numbers below), with what the SDK path
(:class:`prism_otel.spans.SpanMaterializer` + the SDK's OTLP encoder) puts on the wire: the same
names, kinds (INTERNAL), attributes (``spans.step_attributes`` decides a step's), links (with the
SDK's link flags), parent ids, span flags (``SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK``, and ``_IS_REMOTE``
under a remote parent), status and events. tests/test_otlp_encode.py decodes both and compares them.

Spans are appended to a batch; a full batch (``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``) or one older than
``OTEL_BSP_SCHEDULE_DELAY`` becomes one ``ExportTraceServiceRequest`` (this process's resource and
scope, encoded once) handed, as bytes, to the exporters (:mod:`prism_otel.export`). Link policy as in
:mod:`prism_otel.spans`.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from prism_otel import semconv as sc
from prism_otel.ecosystem import error_description
from prism_otel.record import ParentIds, RequestRecord, StepRecord
from prism_otel.spans import request_end_attributes, request_start, step_attributes

_D = struct.Struct("<d").pack
_Q = struct.Struct("<Q").pack
_I = struct.Struct("<I").pack
_TIMES = struct.Struct("<BQBQ").pack  # start (field 7, fixed64) and end (field 8, fixed64)
SPAN_FLAGS_HAS_IS_REMOTE = 0x100
SPAN_FLAGS_IS_REMOTE = 0x200
_KIND_INTERNAL = b"\x30\x01"  # field 6 (kind) = SPAN_KIND_INTERNAL
_STATUS_UNSET = b"\x7a\x00"  # field 15: an empty Status (code UNSET), as the SDK encoder writes it
_STATUS_ERROR = b"\x7a\x02\x18\x02"  # code = STATUS_CODE_ERROR
_FLAGS_LOCAL = b"\x85\x01" + _I(SPAN_FLAGS_HAS_IS_REMOTE)  # field 16 (fixed32)
_FLAGS_REMOTE = b"\x85\x01" + _I(SPAN_FLAGS_HAS_IS_REMOTE | SPAN_FLAGS_IS_REMOTE)
_LINK_FLAGS = b"\x35" + _I(SPAN_FLAGS_HAS_IS_REMOTE)  # Link field 6 (fixed32)


def varint(n: int) -> bytes:
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_V = [varint(i) for i in range(1 << 14)]


def _vlen(n: int) -> bytes:
    return _V[n] if n < 16384 else varint(n)


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + _vlen(len(body)) + body


class AttrEncoder:
    """KeyValue encoding with the caches a steady stream of steps needs: key prefixes, short strings
    (request ids repeat on every step of their request), fixed-size values."""

    def __init__(self, max_strings: int = 1 << 16) -> None:
        self._keys: dict[str, bytes] = {}
        self._strs: dict[str, bytes] = {}
        self._max = max_strings
        self._last_list: list = []  # the last list value and its encoding: a batch's request ids
        self._last_list_enc = b""  # repeat on every step while its membership does not change
        self._prev_list: list = []  # the one before (a step's ids and its front end's, in another order)
        self._prev_list_enc = b""
        # per field tag: (key, value) -> the KeyValue's bytes, for values that repeat; key -> the bytes
        # of a double-valued KeyValue up to its 8 value bytes
        self._kv: dict[bytes, dict[tuple, bytes]] = {}
        self._floats: dict[bytes, dict[str, bytes]] = {}

    def key(self, k: str) -> bytes:
        p = self._keys.get(k)
        if p is None:
            kb = k.encode("utf-8", "replace")
            p = self._keys[k] = b"\x0a" + _vlen(len(kb)) + kb
        return p

    def string(self, s: str) -> bytes:
        """AnyValue{string_value}."""
        b = self._strs.get(s)
        if b is None:
            e = s.encode("utf-8", "replace")
            b = b"\x0a" + _vlen(len(e)) + e
            if len(self._strs) >= self._max:
                self._strs.clear()
            self._strs[s] = b
        return b

    def value(self, v: Any) -> bytes:
        t = type(v)
        if t is int:
            return b"\x18" + (_V[v] if 0 <= v < 16384 else varint(v))
        if t is str:
            return self.string(v)
        if t is float:
            return b"\x21" + _D(v)
        if t is bool:
            return b"\x10\x01" if v else b"\x10\x00"
        if t is list or t is tuple:
            if v == self._last_list and type(v) is type(self._last_list):
                return self._last_list_enc
            if v == self._prev_list and type(v) is type(self._prev_list):
                return self._prev_list_enc
            inner = b"".join([b"\x0a" + _vlen(len(x)) + x for x in map(self.value, v)])
            enc = b"\x2a" + _vlen(len(inner)) + inner
            if len(v) >= 4:
                self._prev_list, self._prev_list_enc = self._last_list, self._last_list_enc
                self._last_list, self._last_list_enc = v, enc
            return enc
        if t is bytes:
            return b"\x3a" + _vlen(len(v)) + v
        if v is None:
            return b""
        return self.string(str(v))

    def attributes(self, attrs: Mapping[str, Any], tag: bytes = b"\x4a") -> bytes:
        """Repeated KeyValue under ``tag`` (a Span's field 9 by default). Whole KeyValues are cached for
        values that repeat from step to step (strings, ints, bools); a double is 8 bytes after a fixed
        prefix per key."""
        out = []
        ap = out.append
        kv = self._kv.get(tag)
        if kv is None:
            kv = self._kv[tag] = {}
            self._floats[tag] = {}
        floats = self._floats[tag]
        for item in attrs.items():
            v = item[1]
            t = type(v)
            if t is float:
                pre = floats.get(item[0])
                if pre is None:
                    pre = floats[item[0]] = self._kv_bytes(item[0], b"\x21" + _D(0.0), tag)[:-8]
                ap(pre + _D(v))
            elif t is str or t is int or t is bool:
                b = kv.get(item)
                if b is None:
                    if len(kv) >= 1 << 16:
                        kv.clear()
                    b = kv[item] = self._kv_bytes(item[0], self.value(v), tag)
                ap(b)
            elif v is not None:
                ap(self._kv_bytes(item[0], self.value(v), tag))
        return b"".join(out)

    def _kv_bytes(self, k: str, val: bytes, tag: bytes) -> bytes:
        kk = self._keys.get(k) or self.key(k)
        n = len(val)
        return tag + _vlen(len(kk) + n + 1 + len(_vlen(n))) + kk + b"\x12" + _vlen(n) + val


class _Request:
    """A request span in flight: ids fixed at arrival, the span written when it closes."""

    __slots__ = ("tid", "sid", "parent", "remote", "name", "attributes", "start", "sampled", "link")

    def __init__(self, tid, sid, parent, remote, name, attributes, start, sampled) -> None:
        self.tid = tid
        self.sid = sid
        self.parent = parent
        self.remote = remote
        self.name = name
        self.attributes = attributes
        self.start = start
        self.sampled = sampled
        body = b"\x0a\x10" + tid + b"\x12\x08" + sid + _LINK_FLAGS
        self.link = b"\x6a" + _vlen(len(body)) + body  # this span as a Link entry (Span field 13)

    def get_span_context(self) -> bytes:
        return self.link


class OTLPSink:
    """The pipeline's span sink in the companion: OTLP bytes, batched, handed to ``exporters``.

    ``exporters``: objects with ``export(payload: bytes, n_spans: int)`` (:mod:`prism_otel.export`).
    ``sampler``: an SDK ``Sampler`` consulted per step and request unless it samples every root
    (the default); ``policy``: the anomaly-aware export policy (:mod:`prism_otel.sampling`) or None."""

    def __init__(self, resource_attrs: Mapping[str, Any], exporters: Sequence, scope_name: str = sc.SCOPE,
                 scope_version: str = "", max_step_links: int = 128, max_request_links: int = 16,
                 model_name: Optional[str] = None, provider_name: str = "prism", sampler=None, policy=None,
                 batch_spans: int = 512, delay_s: float = 5.0, max_queue_spans: int = 2048,
                 on_drop: Optional[Callable[[str, int], None]] = None, seed: Optional[int] = None,
                 batch_bytes: int = 1 << 20) -> None:
        self.enc = AttrEncoder()
        self.exporters = list(exporters)
        self.max_step_links = max(0, max_step_links)
        self.max_request_links = max(1, max_request_links)
        self.model_name = model_name
        self.provider_name = provider_name
        self.sampler = sampler if sampler is not None and not _samples_every_root(sampler) else None
        from opentelemetry.sdk.trace import sampling

        self._parent_based = sampler is None or isinstance(sampler, sampling.ParentBased)
        self.policy = policy
        self.batch_spans = max(1, batch_spans)
        self.delay_s = delay_s
        self.max_queue_spans = max(self.batch_spans, max_queue_spans)
        self.on_drop = on_drop or (lambda reason, n: None)
        self._bits = random.Random(seed).getrandbits
        self.batch_bytes = max(1, batch_bytes)  # a request's spans stay below this many bytes (one span may not)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._first_at = 0.0
        self.spans_out = 0
        self.steps_out = 0
        self.steps_held = 0  # offered to the policy and not exported (normal steps outside every window)
        self.requests_out = 0
        res = self.enc.attributes(resource_attrs, b"\x0a")  # Resource field 1: attributes
        self._resource = b"\x0a" + _vlen(len(res)) + res  # ResourceSpans field 1
        scope = _field(b"\x0a", scope_name.encode())
        if scope_version:
            scope += _field(b"\x12", scope_version.encode())
        self._scope = b"\x0a" + _vlen(len(scope)) + scope  # ScopeSpans field 1
        self._stage_parts: dict[str, tuple] = {}
        self._names: dict[str, bytes] = {}
        self._span_names: dict[str, str] = {}  # stage name -> its span name
        self._step_name = self._name(sc.STEP_SPAN)

    # -- names and fixed parts ----------------------------------------------------------------
    def _name(self, name: str) -> bytes:
        b = self._names.get(name)
        if b is None:
            b = _field(b"\x2a", name.encode("utf-8", "replace")) + _KIND_INTERNAL
            if len(self._names) < 4096:  # span names are a small set (stages, kernel groups, models)
                self._names[name] = b
        return b

    def _stage(self, name: str) -> tuple:
        """(the bytes before the trace id, name and kind, the bytes after the times) of a stage span:
        every part of it but ids and times is the same from step to step."""
        p = self._stage_parts.get(name)
        if p is None:
            nm = self._name(sc.stage_span_name(name))
            tail = self.enc.attributes({sc.STAGE_NAME: name}) + _STATUS_UNSET + _FLAGS_LOCAL
            body_len = 18 + 10 + 10 + len(nm) + 18 + len(tail)
            p = self._stage_parts[name] = (b"\x12" + _vlen(body_len) + b"\x0a\x10", nm, tail)
        return p

    # -- the sink interface (prism_otel.pipeline) ---------------------------------------------
    def step(self, step: StepRecord, request_contexts: Sequence = ()) -> bytes:
        """Encode the step and its children; returns the step as a Link entry (for its requests)."""
        ns = len(step.stages)
        nk = len(step.kernel_groups)
        nr = len(step.ranks)
        nch = ns + nk + nr * (1 + 16)
        ids = self._bits(64 * (3 + nch)).to_bytes(8 * (3 + nch), "little")
        tid, sid = ids[:16], ids[16:24]
        attrs = step_attributes(step)
        if self.sampler is not None and not self._sample(int.from_bytes(tid, "big"), sc.STEP_SPAN, attrs):
            return _link(tid, sid)
        head = b"\x0a\x10" + tid
        par = b"\x22\x08" + sid
        out = []
        o = 24
        join = b"".join
        stage = self._stage_parts.get
        for name, (t0, t1) in step.stages.items():
            pre, nm, tail = stage(name) or self._stage(name)
            out.append(join((pre, tid, b"\x12\x08", ids[o:o + 8], par, nm, _TIMES(0x39, t0, 0x41, t1), tail)))
            o += 8
        if nk:
            t = step.stages.get(sc.STAGE_FORWARD, (step.start_ns, step.end_ns))[0]
            for group, dev_ns in step.kernel_groups.items():
                out.append(self._span(head, ids[o:o + 8], par, sc.kernel_span_name(group),
                                      {sc.KERNEL_GROUP: group, sc.DEVICE_TIME_MS: dev_ns / 1e6}, t, t + dev_ns))
                t += dev_ns
                o += 8
        for r in step.ranks:
            o = self._rank(head, ids, o, par, r, out)
        links = request_contexts
        if len(links) > self.max_step_links:
            attrs[sc.STEP_LINKS_DROPPED] = len(links) - self.max_step_links
            links = links[:self.max_step_links]
        events = b""
        v = step.verdict
        if v is not None and v.alert:
            ev = (b"\x09" + _Q(step.end_ns) + _field(b"\x12", sc.ALERT_EVENT.encode())
                  + self.enc.attributes({sc.ANOMALY_SCORE: float(v.score or 0.0),
                                         sc.LATENCY_EXPECTED_MS: float(v.expected_ms or 0.0),
                                         sc.STEP_DURATION_MS: step.duration_ms}, b"\x1a"))
            events = b"\x5a" + _vlen(len(ev)) + ev  # Span field 11
        err = error_description(step)  # PRISM_OTEL_SPAN_ERROR=1: anomalous steps light up APM error views
        body = (head + b"\x12\x08" + sid + self._step_name + _TIMES(0x39, step.start_ns, 0x41, step.end_ns)
                + self.enc.attributes(attrs) + events + b"".join(links)
                + (_status_error(err) if err else _STATUS_UNSET) + _FLAGS_LOCAL)
        out.append(b"\x12" + _vlen(len(body)) + body)
        policy = self.policy
        if policy is None:
            self.steps_out += 1
            self._add(out)
        else:
            for item in policy.offer(bool(v is not None and v.anomaly), out):
                self.steps_out += 1
                self._add(item)
            self.steps_held = policy.held_out
        return _link(tid, sid)

    def _rank(self, head, ids, o, par, r: StepRecord, out) -> int:
        rank = r.attributes.get(sc.RANK, 0)
        attrs = dict(r.attributes)
        attrs[sc.STEP_DURATION_MS] = round(r.duration_ms, 4)
        if r.device_ns is not None:
            attrs[sc.DEVICE_TIME_MS] = r.device_ns / 1e6
        rsid = ids[o:o + 8]
        o += 8
        out.append(self._span(head, rsid, par, f"{sc.RANK_SPAN_PREFIX}{rank}", attrs, r.start_ns, r.end_ns))
        rpar = b"\x22\x08" + rsid
        t = r.stages.get(sc.STAGE_FORWARD, (r.start_ns, r.end_ns))[0]
        for group, dev_ns in list(r.kernel_groups.items())[:16]:
            out.append(self._span(head, ids[o:o + 8], rpar, sc.kernel_span_name(group),
                                  {sc.KERNEL_GROUP: group, sc.DEVICE_TIME_MS: dev_ns / 1e6}, t, t + dev_ns))
            t += dev_ns
            o += 8
        return o

    def _span(self, head: bytes, sid: bytes, par: bytes, name: str, attrs: Mapping[str, Any], t0: int, t1: int,
              tail: bytes = _STATUS_UNSET + _FLAGS_LOCAL) -> bytes:
        body = (head + b"\x12\x08" + sid + par + self._name(name) + _TIMES(0x39, t0, 0x41, t1)
                + self.enc.attributes(attrs) + tail)
        return b"\x12" + _vlen(len(body)) + body

    def detached_stage(self, name: str, start_ns: int, end_ns: int, attributes: Optional[dict] = None) -> None:
        attrs = {sc.STAGE_NAME: name}
        if attributes:
            attrs.update(attributes)
        ids = self._bits(192).to_bytes(24, "little")
        span_name = self._span_names.get(name)
        if span_name is None:
            span_name = sc.stage_span_name(name)
            if len(self._span_names) < 4096:
                self._span_names[name] = span_name
        if self.sampler is not None and not self._sample(int.from_bytes(ids[:16], "big"), span_name, attrs):
            return
        self._add([self._span(b"\x0a\x10" + ids[:16], ids[16:], b"", span_name, attrs, start_ns, end_ns)])

    def open_request(self, request_id: str, arrival_ns: int, parent: Optional[ParentIds] = None, prompt_tokens: int = 0,
                     max_tokens: Optional[int] = None) -> _Request:
        name, attrs = request_start(self.model_name, self.provider_name, request_id, prompt_tokens, max_tokens)
        bits = self._bits(192).to_bytes(24, "little")
        sid = bits[16:]
        ptid = None
        if isinstance(parent, tuple) and parent[0] and parent[1]:
            if len(parent) > 4 and parent[4]:
                # ids made for this request in vLLM's front end (instrumentation/vllm/_join.py): they are
                # this span's own (a root), and vLLM's llm_request span is its child
                tid, sid, remote, parent = parent[0].to_bytes(16, "big"), parent[1].to_bytes(8, "big"), False, None
            else:
                tid, ptid, remote = parent[0].to_bytes(16, "big"), parent[1].to_bytes(8, "big"), bool(parent[3])
        else:
            tid, remote = bits[:16], False
        sampled = True
        if self.sampler is not None:
            sampled = self._sample(int.from_bytes(tid, "big"), name, attrs, parent if ptid else None)
        elif ptid is not None and self._parent_based and parent is not None and not parent[2] & 1:
            sampled = False  # the default sampler is parent-based: an unsampled caller's request is not exported
        return _Request(tid, sid, ptid, remote, name, attrs, arrival_ns, sampled)

    def close_request(self, handle: _Request, rec: RequestRecord, step_contexts: Sequence, total_steps: int) -> None:
        if not handle.sampled:
            return
        attrs = handle.attributes
        attrs.update(request_end_attributes(rec, total_steps, len(step_contexts)))
        status = _STATUS_ERROR if rec.status == "error" else _STATUS_UNSET
        flags = _FLAGS_REMOTE if handle.parent is not None and handle.remote else _FLAGS_LOCAL
        par = b"\x22\x08" + handle.parent if handle.parent is not None else b""
        body = (b"\x0a\x10" + handle.tid + b"\x12\x08" + handle.sid + par + self._name(handle.name)
                + _TIMES(0x39, handle.start, 0x41, rec.end_ns) + self.enc.attributes(attrs)
                + b"".join(step_contexts) + status + flags)
        self.requests_out += 1
        self._add([b"\x12" + _vlen(len(body)) + body])

    # -- sampling ------------------------------------------------------------------------------
    def _sample(self, trace_id: int, name: str, attrs, parent=None) -> bool:
        from opentelemetry.trace import SpanKind

        ctx = None
        if parent is not None:
            from opentelemetry import trace
            from opentelemetry.trace import SpanContext, TraceFlags

            ctx = trace.set_span_in_context(trace.NonRecordingSpan(
                SpanContext(parent[0], parent[1], bool(parent[3]), TraceFlags(parent[2]))))
        sampler = self.sampler
        if sampler is None:  # never called without one; as a broken sampler would, sample
            return True
        try:
            return sampler.should_sample(ctx, trace_id, name, SpanKind.INTERNAL, attrs).decision.is_sampled()
        except Exception:  # noqa: BLE001 - a broken sampler samples everything
            return True

    # -- batching ------------------------------------------------------------------------------
    def _add(self, spans: list[bytes]) -> None:
        pend = self._pending
        size = sum(map(len, spans))
        if pend and self._pending_bytes + size > self.batch_bytes:
            self._ship()  # what is pending stays under the byte cap: a request of its own
            pend = self._pending
        if not pend:
            self._first_at = time.monotonic()
        pend.extend(spans)
        self._pending_bytes += size
        if len(pend) >= self.batch_spans:
            self._ship(full_only=True)

    def _ship(self, full_only: bool = False) -> None:
        """Pending spans into requests of at most ``batch_spans`` spans (``full_only``: full ones only).
        Each request is one ``join`` of its pieces (a request is up to ``batch_bytes``: one copy of it,
        not one per level of nesting)."""
        pend = self._pending
        size = self.batch_spans
        while pend and (len(pend) >= size or not full_only):
            if len(pend) > size:
                chunk, pend = pend[:size], pend[size:]
                nbytes = sum(map(len, chunk))
            else:
                chunk, pend, nbytes = pend, [], self._pending_bytes
            self._pending = pend
            self._pending_bytes -= nbytes
            n = len(chunk)
            ss_len = len(self._scope) + nbytes
            ss_head = b"\x12" + _vlen(ss_len)
            rs_len = len(self._resource) + len(ss_head) + ss_len
            payload = b"".join([b"\x0a" + _vlen(rs_len), self._resource, ss_head, self._scope, *chunk])
            self.spans_out += n
            for e in self.exporters:
                try:
                    e.export(payload, n)
                except Exception:  # noqa: BLE001 - an exporter that breaks loses its batch, counted
                    self.on_drop("export_error", n)
        self._first_at = time.monotonic() if pend else 0.0

    def tick(self, now: Optional[float] = None) -> None:
        """Ship a batch that has waited ``delay_s``."""
        if self._pending and (now or time.monotonic()) - self._first_at >= self.delay_s:
            self._ship()

    def flush(self) -> None:
        if self._pending:
            self._ship()
        for e in self.exporters:
            f = getattr(e, "force_flush", None)
            if f is not None:
                try:
                    f()
                except Exception:  # noqa: BLE001
                    pass

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._pending:
            self._ship()
        deadline = time.monotonic() + timeout
        for e in self.exporters:
            try:
                e.shutdown(max(0.5, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001
                pass


def _status_error(description: str) -> bytes:
    """Span field 15: Status with a message (field 2) and code ERROR (field 3), in field order."""
    body = _field(b"\x12", description.encode("utf-8", "replace")) + b"\x18\x02"
    return b"\x7a" + _vlen(len(body)) + body


def _link(tid: bytes, sid: bytes) -> bytes:
    body = b"\x0a\x10" + tid + b"\x12\x08" + sid + _LINK_FLAGS
    return b"\x6a" + _vlen(len(body)) + body


def _samples_every_root(sampler) -> bool:
    """The SDK default (parent-based, always on) and ALWAYS_ON sample every root span: no need to ask."""
    from opentelemetry.sdk.trace import sampling

    if sampler is sampling.ALWAYS_ON or isinstance(sampler, sampling.StaticSampler) and \
            sampler._decision == sampling.Decision.RECORD_AND_SAMPLE:
        return True
    if isinstance(sampler, sampling.ParentBased):
        root = getattr(sampler, "_root", None)
        return root is sampling.ALWAYS_ON or (isinstance(root, sampling.StaticSampler)
                                             and root._decision == sampling.Decision.RECORD_AND_SAMPLE)
    return False
