"""Spans back into records: the inverse of :mod:`prism_otel.spans`, on OTLP protobuf spans.

A ``prism.step`` span and its ``prism.stage.<name>`` / ``prism.kernels.<group>`` children become
one :class:`~prism_otel.record.StepRecord` again (same names, from :mod:`prism_otel.semconv`); a
request span (one carrying ``prism.request.id``) becomes a :class:`~prism_otel.record.RequestRecord`.
After the processors ran, :func:`tag_step` / :func:`tag_request` write what they concluded back
onto the original protobuf span (verdict attributes, new extras, the alert event), so the spans the
collector forwards are the ones it received plus the verdict.

The attribute types are not trusted: OTLP lets any sender put any value under any key. A known
prism attribute with a value of the wrong type (``prism.kv_cache.usage = "abc"``, a bool for a count,
a non-finite number) makes :func:`step_from_span` / :func:`request_from_span` raise :class:`BadSpan`;
the assembler then leaves that one span out of the processors, counts it and forwards it as received.

Pure functions; the stateful part (waiting for children) is :mod:`processors.assembler`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from prism_otel import semconv as sc
from prism_otel.record import BatchChange, RequestRecord, StepRecord, Verdict
from prism_otel.spans import verdict_attributes

STAGE = 0
KERNEL = 1
ChildInfo = tuple[int, str, int, int]  # (STAGE|KERNEL, name, start_ns, end_ns)

_STEP_KEYS = frozenset((
    sc.STEP_INDEX, sc.STEP_PHASE, sc.STEP_INSTANCE, sc.STEP_DURATION_MS, sc.STEP_LINKS_DROPPED, sc.STEP_CHILDREN,
    sc.BATCH_SIZE, sc.BATCH_PREFILL_TOKENS, sc.BATCH_DECODE_TOKENS, sc.BATCH_CONTEXT_TOKENS,
    sc.BATCH_MAX_CONTEXT_TOKENS, sc.BATCH_REQUEST_IDS, sc.KV_CACHE_USAGE, sc.DEVICE_TIME_MS,
    sc.BATCH_REQUESTS_JOINED, sc.BATCH_REQUESTS_LEFT, sc.BATCH_TOKENS_JOINED, sc.BATCH_SIZE_BEFORE,
    sc.BATCH_STEPS_SINCE_CHANGE))
_CHANGE_KEYS = (sc.BATCH_REQUESTS_JOINED, sc.BATCH_REQUESTS_LEFT, sc.BATCH_TOKENS_JOINED, sc.BATCH_SIZE_BEFORE,
                sc.BATCH_STEPS_SINCE_CHANGE)
_SIGNAL_PREFIX_LEN = len(sc.SIGNAL_PREFIX)
VERDICT_KEYS = (sc.ANOMALY, sc.ANOMALY_SCORE, sc.LATENCY_EXPECTED_MS, sc.ANOMALY_ROOT_CAUSE, sc.SLO_VIOLATED)
_KNOWN = _STEP_KEYS | frozenset(VERDICT_KEYS)
_STAGE_PREFIX_LEN = len(sc.STAGE_SPAN_PREFIX)
_KERNEL_PREFIX_LEN = len(sc.KERNEL_SPAN_PREFIX)


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attrs_of(kvs: Iterable) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "int_value":
            out[kv.key] = v.int_value
        elif kind == "string_value":
            out[kv.key] = v.string_value
        elif kind == "double_value":
            out[kv.key] = v.double_value
        elif kind == "bool_value":
            out[kv.key] = v.bool_value
        else:
            out[kv.key] = any_value(v)
    return out


def is_step(span) -> bool:
    return span.name == sc.STEP_SPAN


def child_info(span) -> Optional[ChildInfo]:
    """(kind, name, start, end) for a stage or kernel-group span that has a parent; else None."""
    name = span.name
    if not span.parent_span_id:
        return None
    if name.startswith(sc.STAGE_SPAN_PREFIX):
        return (STAGE, name[_STAGE_PREFIX_LEN:], span.start_time_unix_nano, span.end_time_unix_nano)
    if name.startswith(sc.KERNEL_SPAN_PREFIX):
        return (KERNEL, name[_KERNEL_PREFIX_LEN:], span.start_time_unix_nano, span.end_time_unix_nano)
    return None


def children_by_step(spans) -> dict[bytes, list]:
    """The :func:`child_info` of the stage and kernel-group spans among ``spans`` (one scope's), keyed by
    their step's trace id + span id (what a whole request gives at once, with no step held back)."""
    kids: dict[bytes, list] = {}
    for s in spans:
        info = child_info(s)
        if info is not None:
            kids.setdefault(s.trace_id + s.parent_span_id, []).append(info)
    return kids


def expected_children(span) -> Optional[int]:
    for kv in span.attributes:
        if kv.key == sc.STEP_CHILDREN:
            return kv.value.int_value
    return None


class BadSpan(ValueError):
    """A known prism attribute has a value of the wrong type; ``key`` names it."""

    def __init__(self, key: str, value: Any) -> None:
        super().__init__(f"attribute {key}: unexpected value {value!r:.80}")
        self.key = key


def _num(a: Mapping[str, Any], key: str) -> Optional[float]:
    """A finite number, or None when absent."""
    v = a.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadSpan(key, v)
    return v


def _int(a: Mapping[str, Any], key: str) -> int:
    v = _num(a, key)
    return 0 if v is None else int(v)


def _str(a: Mapping[str, Any], key: str) -> Optional[str]:
    v = a.get(key)
    if v is not None and not isinstance(v, str):
        raise BadSpan(key, v)
    return v


def _strs(a: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = a.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v):
        raise BadSpan(key, v)
    return tuple(str(x) for x in v)


# how step_from_span reads each known attribute: (kind, field); one dict lookup per attribute
_NUM, _INT, _STR, _STRS, _BOOL, _SKIP = range(6)
_STEP_FIELDS: dict[str, tuple[int, str]] = {
    sc.STEP_INDEX: (_INT, "index"), sc.STEP_PHASE: (_STR, "phase"), sc.STEP_INSTANCE: (_STR, "instance"),
    sc.BATCH_SIZE: (_INT, "batch_size"), sc.BATCH_PREFILL_TOKENS: (_INT, "prefill_tokens"),
    sc.BATCH_DECODE_TOKENS: (_INT, "decode_tokens"), sc.BATCH_CONTEXT_TOKENS: (_INT, "context_tokens"),
    sc.BATCH_MAX_CONTEXT_TOKENS: (_INT, "max_context_tokens"), sc.KV_CACHE_USAGE: (_NUM, "kv"),
    sc.DEVICE_TIME_MS: (_NUM, "dev"), sc.BATCH_REQUEST_IDS: (_STRS, "request_ids"),
    sc.BATCH_REQUESTS_JOINED: (_INT, "c0"), sc.BATCH_REQUESTS_LEFT: (_INT, "c1"),
    sc.BATCH_TOKENS_JOINED: (_INT, "c2"), sc.BATCH_SIZE_BEFORE: (_INT, "c3"),
    sc.BATCH_STEPS_SINCE_CHANGE: (_INT, "c4"),
    sc.ANOMALY: (_BOOL, "anomaly"), sc.ANOMALY_SCORE: (_NUM, "score"), sc.LATENCY_EXPECTED_MS: (_NUM, "expected"),
    sc.ANOMALY_ROOT_CAUSE: (_STR, "root"), sc.SLO_VIOLATED: (_STRS, "slo"),
}
for _k in _KNOWN:  # known, not read back (derived when the span is rendered)
    _STEP_FIELDS.setdefault(_k, (_SKIP, ""))
_PRISM_PREFIX = "prism."
_ABSENT = object()


def _typed(key: str, kind: int, v: AnyValue):
    """One known attribute's value, type-checked as :func:`_num` / :func:`_str` / :func:`_strs` do."""
    which = v.WhichOneof("value")
    if which is None and kind != _BOOL:  # an empty value reads as absent, as before
        return _ABSENT
    if kind == _NUM or kind == _INT:
        if which == "int_value":
            x = v.int_value
            return x if kind == _NUM else int(x)
        if which == "double_value":
            x = v.double_value
            if math.isfinite(x):
                return x if kind == _NUM else int(x)
        raise BadSpan(key, any_value(v))
    if kind == _STR:
        if which == "string_value":
            return v.string_value
        raise BadSpan(key, any_value(v))
    if kind == _BOOL:
        if which == "bool_value":
            return v.bool_value
        raise BadSpan(key, any_value(v))
    # _STRS: an array of strings (ints accepted, as ids)
    if which != "array_value":
        raise BadSpan(key, any_value(v))
    out = []
    for x in v.array_value.values:
        w = x.WhichOneof("value")
        if w == "string_value":
            out.append(x.string_value)
        elif w == "int_value":
            out.append(str(x.int_value))
        else:
            raise BadSpan(key, any_value(v))
    return tuple(out)


def step_from_span(span, resource: Mapping[str, Any], children: Iterable[ChildInfo] = ()) -> StepRecord:
    """One pass over the span's attributes: known ones are type-checked into their fields, signals into
    ``signals``, anything else kept as an engine extra (the collector's per-step hot path)."""
    return step_from_entries(span, read_step(span), resource, children)


# -- the attributes of a step span, read from their wire bytes -------------------------------------------------
# Reading a step span's ~15 attributes through the protobuf objects costs ~20 us (a wrapper object per
# KeyValue and per AnyValue). Here the span is serialized (~2 us, in C) and parsed again as a message whose
# attributes are plain ``bytes`` (in C); each KeyValue's bytes are decoded once into an *entry* and cached by
# those bytes, so what a fleet repeats on every step (phase, instance, batch size, child count) is one dict
# lookup, and what changes (durations, token counts) a short decode of a few bytes. A KeyValue in any shape the
# short decode does not know (arrays, maps, out-of-order or long fields) is decoded by protobuf itself and goes
# through the same type checks as before (:func:`_typed`), so the entries are exactly what the loop over the
# protobuf objects gave.
_SET, _POP, _SKIPPED, _SIGNAL, _EXTRA, _BAD, _CHILDREN, _SET_V, _POP_V = range(9)
_VERDICT_FIELDS = frozenset(("anomaly", "score", "expected", "root", "slo"))
_ENTRY_CACHE: dict[bytes, tuple] = {}
_ENTRY_CACHE_MAX = 8192  # entries (a few hundred bytes each): cleared when full


def _attrs_view():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fd = descriptor_pb2.FileDescriptorProto(name="prism_span_attributes_view.proto", package="prism_view",
                                            syntax="proto3")
    m = fd.message_type.add(name="SpanAttributes")  # opentelemetry.proto.trace.v1.Span's field 9, as bytes
    m.field.add(name="attributes", number=9, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prism_view.SpanAttributes"))


_AttrsView = _attrs_view()
_unpack_double = struct.Struct("<d").unpack_from


def _short_kv(b: bytes):
    """(key, which, value) of a KeyValue's bytes in the shape every OTLP encoder writes (key first, short
    lengths, a scalar value); None for anything else."""
    n = len(b)
    if n < 4 or b[0] != 0x0A:
        return None
    kl = b[1]
    if kl >= 0x80 or 4 + kl > n or b[2 + kl] != 0x12 or b[3 + kl] >= 0x80 or 4 + kl + b[3 + kl] != n:
        return None
    try:
        key = b[2:2 + kl].decode()
    except UnicodeDecodeError:
        return None
    i = 4 + kl
    if i == n:
        return None  # an empty AnyValue
    tag = b[i]
    if tag == 0x18:  # int_value: a varint to the end
        x = shift = 0
        for j in range(i + 1, n):
            c = b[j]
            x |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                if j != n - 1 or shift > 70:
                    return None
                if x >= 1 << 63:
                    if x >= 1 << 64:
                        return None
                    x -= 1 << 64
                return key, "int_value", x
        return None
    if tag == 0x21:  # double_value
        return (key, "double_value", _unpack_double(b, i + 1)[0]) if n - i == 9 else None
    if tag == 0x0A:  # string_value
        if i + 1 >= n or b[i + 1] >= 0x80 or i + 2 + b[i + 1] != n:
            return None
        try:
            return key, "string_value", b[i + 2:].decode()
        except UnicodeDecodeError:
            return None
    if tag == 0x10:  # bool_value
        return (key, "bool_value", b[i + 1] == 1) if n - i == 2 and b[i + 1] <= 1 else None
    return None


def _entry_of(key: str, v: AnyValue) -> tuple:
    """What one attribute means for the step (as :func:`step_from_span` always read it); may be BadSpan."""
    spec = _STEP_FIELDS.get(key)
    if spec is not None:
        kind = spec[0]
        if key == sc.STEP_CHILDREN:
            return (_CHILDREN, v.int_value)
        if kind == _SKIP:
            return (_SKIPPED,)
        try:
            x = _typed(key, kind, v)
        except BadSpan as exc:
            return (_BAD, exc)
        vk = spec[1] in _VERDICT_FIELDS
        if x is _ABSENT:
            return (_POP_V if vk else _POP, spec[1])
        return (_SET_V if vk else _SET, spec[1], x)
    if key.startswith(_PRISM_PREFIX):
        if key.startswith(sc.SIGNAL_PREFIX):
            try:
                x = _typed(key, _NUM, v)
            except BadSpan as exc:
                return (_BAD, exc)
            if x is _ABSENT:
                return (_BAD, BadSpan(key, None))
            return (_SIGNAL, key[_SIGNAL_PREFIX_LEN:], x)
        if key.startswith(sc.FPM_PREFIX):  # derived from the fields when the span is rendered (ecosystem)
            return (_SKIPPED,)
    which = v.WhichOneof("value")
    return (_EXTRA, key, getattr(v, which) if which in _SCALARS else any_value(v))


def _entry_short(key: str, which: str, x) -> Optional[tuple]:
    """:func:`_entry_of` for a scalar read by :func:`_short_kv`, where no type error and no copy is involved;
    None where :func:`_entry_of` must decide."""
    spec = _STEP_FIELDS.get(key)
    if spec is not None:
        kind = spec[0]
        if key == sc.STEP_CHILDREN:
            return (_CHILDREN, x if which == "int_value" else 0)
        if kind == _SKIP:
            return (_SKIPPED,)
        if kind == _INT or kind == _NUM:
            if which == "int_value":
                pass
            elif which == "double_value" and math.isfinite(x):
                x = x if kind == _NUM else int(x)
            else:
                return None
        elif (kind == _STR and which != "string_value") or (kind == _BOOL and which != "bool_value") or kind == _STRS:
            return None
        return (_SET_V if spec[1] in _VERDICT_FIELDS else _SET, spec[1], x)
    if key.startswith(_PRISM_PREFIX):
        if key.startswith(sc.SIGNAL_PREFIX):
            if which == "int_value" or (which == "double_value" and math.isfinite(x)):
                return (_SIGNAL, key[_SIGNAL_PREFIX_LEN:], x)
            return None
        if key.startswith(sc.FPM_PREFIX):
            return (_SKIPPED,)
    return (_EXTRA, key, x)


def _decode_entry(b: bytes) -> tuple:
    short = _short_kv(b)
    e = _entry_short(*short) if short is not None else None
    if e is not None:
        if len(_ENTRY_CACHE) >= _ENTRY_CACHE_MAX:
            _ENTRY_CACHE.clear()
        _ENTRY_CACHE[b] = e
        return e
    kv = KeyValue.FromString(b)
    return _entry_of(kv.key, kv.value)  # not cached: it may hold a list, or an exception


class StepAttributes:
    """A step span's attributes, read in one pass (:func:`read_step`): its fields, extras and signals as
    :func:`step_from_span` takes them, the child count (:func:`expected_children`), whether any verdict
    attribute is there, and the first attribute of a wrong type (raised when the record is built)."""

    __slots__ = ("fields", "extras", "signals", "expected", "has_verdict", "bad")

    def __init__(self, fields, extras, signals, expected, has_verdict, bad) -> None:
        self.fields = fields
        self.extras = extras
        self.signals = signals
        self.expected = expected
        self.has_verdict = has_verdict
        self.bad = bad


def read_step(span) -> StepAttributes:
    f: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    signals: dict[str, float] = {}
    expected = bad = None
    has_verdict = False
    cache = _ENTRY_CACHE
    # _AttrsView is built at run time from a descriptor: its fields are unknown to the checker
    for b in _AttrsView.FromString(span.SerializeToString()).attributes:  # pyright: ignore[reportAttributeAccessIssue]
        e = cache.get(b)
        if e is None:
            e = _decode_entry(b)
        code = e[0]
        if code == _SET:
            f[e[1]] = e[2]
        elif code == _SKIPPED:
            continue
        elif code == _CHILDREN:
            if expected is None:  # the first one (expected_children)
                expected = e[1]
        elif code == _EXTRA:
            extras[e[1]] = e[2]
        elif code == _SIGNAL:
            signals[e[1]] = e[2]
        elif code == _SET_V:
            f[e[1]] = e[2]
            has_verdict = True
        elif code == _BAD:
            if bad is None:
                bad = e[1]
        else:  # _POP, _POP_V: an empty value reads as absent
            f.pop(e[1], None)
            has_verdict = has_verdict or code == _POP_V
    return StepAttributes(f, extras, signals, expected, has_verdict, bad)


def step_from_entries(span, attrs: StepAttributes, resource: Mapping[str, Any],
                      children: Iterable[ChildInfo] = ()) -> StepRecord:
    """:func:`step_from_span` from the span's attributes read by :func:`read_step`."""
    if attrs.bad is not None:
        raise attrs.bad
    f, extras, signals = attrs.fields, attrs.extras, attrs.signals
    stages: dict[str, tuple[int, int]] = {}
    kernels: dict[str, int] = {}
    if children:
        for kind, name, t0, t1 in sorted(children, key=_BY_START):
            if kind == STAGE:
                stages[name] = (t0, t1)
            else:
                kernels[name] = t1 - t0
    verdict = None
    if "anomaly" in f:
        verdict = Verdict(expected_ms=f.get("expected"), score=f.get("score"), anomaly=f["anomaly"],
                          root_cause=f.get("root"), alert=any(e.name == sc.ALERT_EVENT for e in span.events),
                          slo_violations=f.get("slo", ()))
    change = None
    if "c4" in f and "c0" in f and "c1" in f and "c2" in f and "c3" in f:
        change = BatchChange(f["c0"], f["c1"], f["c2"], f["c3"], f["c4"])
    kv = f.get("kv")
    dev = f.get("dev")
    instance = f.get("instance") or resource.get(sc.RES_SERVICE_INSTANCE_ID) or ""
    values = (str(instance), f.get("index", 0), span.start_time_unix_nano, span.end_time_unix_nano,
              f.get("phase") or "idle", f.get("batch_size", 0), f.get("prefill_tokens", 0), f.get("decode_tokens", 0),
              f.get("context_tokens", 0), f.get("max_context_tokens", 0), float(kv) if kv is not None else None,
              stages, kernels, int(round(dev * 1e6)) if dev is not None else None, f.get("request_ids", ()), verdict,
              extras, (), change, signals)
    if _RECORD_FAST:  # the dataclass's __init__ would only store these (a fifth of this function's cost)
        rec = object.__new__(StepRecord)
        rec.__dict__.update(zip(_RECORD_FIELDS, values))
        return rec
    return StepRecord(*values)


_RECORD_FIELDS = ("instance", "index", "start_ns", "end_ns", "phase", "batch_size", "prefill_tokens", "decode_tokens",
                  "context_tokens", "max_context_tokens", "kv_usage", "stages", "kernel_groups", "device_ns",
                  "request_ids", "verdict", "attributes", "ranks", "change", "signals")
# the record built without its constructor only while the constructor does nothing else (fields in this order, no
# __post_init__, no slots)
_RECORD_FAST = (tuple(fl.name for fl in dataclasses.fields(StepRecord)) == _RECORD_FIELDS
                and not hasattr(StepRecord, "__post_init__") and not hasattr(StepRecord, "__slots__"))


_BY_START = operator.itemgetter(2)
_SCALARS = frozenset(("string_value", "int_value", "double_value", "bool_value"))


def request_id_of(span) -> Optional[str]:
    for kv in span.attributes:
        if kv.key == sc.REQUEST_ID:
            return kv.value.string_value
    return None


def request_from_span(span, resource: Mapping[str, Any]) -> RequestRecord:
    a = attrs_of(span.attributes)
    t0 = span.start_time_unix_nano

    def at(key: str) -> Optional[int]:
        v = _num(a, key)
        return None if v is None else t0 + int(round(v * 1e6))

    n_out = _int(a, sc.GEN_AI_USAGE_OUTPUT_TOKENS)
    first = at(sc.REQUEST_TTFT_MS)
    tpot = _num(a, sc.REQUEST_TPOT_MS)
    last = first + int(round(tpot * 1e6 * (n_out - 1))) if first is not None and tpot is not None else first
    return RequestRecord(
        instance=str(resource.get(sc.RES_SERVICE_INSTANCE_ID) or ""), request_id=str(_str(a, sc.REQUEST_ID)),
        arrival_ns=t0, end_ns=span.end_time_unix_nano, first_scheduled_ns=at(sc.REQUEST_QUEUE_MS),
        first_token_ns=first, last_token_ns=last, prompt_tokens=_int(a, sc.GEN_AI_USAGE_INPUT_TOKENS),
        output_tokens=n_out, steps=_int(a, sc.REQUEST_STEPS), status=_str(a, sc.REQUEST_STATUS) or "finished",
        slo_violations=_strs(a, sc.SLO_VIOLATED))


# -- writing back ---------------------------------------------------------------------------------
def _fill(target: AnyValue, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, (list, tuple)):
        arr = target.array_value
        del arr.values[:]
        for v in value:
            _fill(arr.values.add(), v)
    else:
        target.string_value = str(value)


def set_attribute(span, key: str, value: Any, index: Optional[dict[str, Any]] = None) -> None:
    kv = index.get(key) if index is not None else next((k for k in span.attributes if k.key == key), None)
    if kv is not None:
        kv.value.Clear()
        _fill(kv.value, value)
        return
    kv = span.attributes.add()
    kv.key = key
    _fill(kv.value, value)
    if index is not None:
        index[key] = kv


def remove_attribute(span, key: str) -> None:
    for i, kv in enumerate(span.attributes):
        if kv.key == key:
            del span.attributes[i]
            return


def tag_step(span, before: StepRecord, after: StepRecord) -> bool:
    """Write ``after``'s verdict and new/changed extras onto ``span``. True if anything changed."""
    verdict_changed = after.verdict != before.verdict
    extras_changed = after.attributes is not before.attributes
    if not verdict_changed and not extras_changed:
        return False
    index = {kv.key: kv for kv in span.attributes}
    changed = False
    if verdict_changed:
        changed = True
        new = verdict_attributes(after.verdict) if after.verdict is not None else {}
        for key in VERDICT_KEYS:
            if key in new:
                set_attribute(span, key, new[key], index)
            elif key in index:
                remove_attribute(span, key)
                index = {kv.key: kv for kv in span.attributes}
        v = after.verdict
        if v is not None and v.alert and not any(e.name == sc.ALERT_EVENT for e in span.events):
            ev = span.events.add()
            ev.name = sc.ALERT_EVENT
            ev.time_unix_nano = after.end_ns
            for k, val in ((sc.ANOMALY_SCORE, float(v.score or 0.0)),
                           (sc.LATENCY_EXPECTED_MS, float(v.expected_ms or 0.0)),
                           (sc.STEP_DURATION_MS, after.duration_ms)):
                kv = ev.attributes.add()
                kv.key = k
                _fill(kv.value, val)
    if extras_changed:
        old = before.attributes
        for key, val in after.attributes.items():
            if old.get(key, _MISSING) != val:
                set_attribute(span, key, val, index)
                changed = True
    return changed


_pack_double = struct.Struct("<d").pack


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        c = n & 0x7F
        n >>= 7
        if n:
            out.append(c | 0x80)
        else:
            out.append(c)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return bytes((number << 3 | 2,)) + _varint(len(payload)) + payload


def _kv_bytes(key: str, any_value: bytes) -> bytes:
    """A Span's attribute (field 9) as wire bytes."""
    return _field(9, _field(1, key.encode()) + _field(2, any_value))


_ANOMALY_BYTES = {flag: _kv_bytes(sc.ANOMALY, bytes((0x10, int(flag)))) for flag in (False, True)}
_SCORE_HEAD = _kv_bytes(sc.ANOMALY_SCORE, b"\x21" + bytes(8))[:-8]
_EXPECTED_HEAD = _kv_bytes(sc.LATENCY_EXPECTED_MS, b"\x21" + bytes(8))[:-8]


def tag_new_verdict(span, before: StepRecord, after: StepRecord) -> bool:
    """:func:`tag_step` for a span that carried no verdict attribute (``has_verdict`` false, :func:`read_step`): the verdict's
    attributes are appended as wire bytes built from cached pieces (the same attributes, in the same order,
    as :func:`tag_step` adds them); anything else (an alert, new extras, SLO violations) takes
    :func:`tag_step`."""
    v = after.verdict
    if (v is None or before.verdict is not None or v.alert or v.slo_violations
            or after.attributes is not before.attributes or (v.root_cause and not isinstance(v.root_cause, str))):
        return tag_step(span, before, after)
    buf = _ANOMALY_BYTES[bool(v.anomaly)]
    if v.score is not None:
        buf += _SCORE_HEAD + _pack_double(float(v.score))
    if v.expected_ms is not None:
        buf += _EXPECTED_HEAD + _pack_double(float(v.expected_ms))
    if v.root_cause:
        buf += _kv_bytes(sc.ANOMALY_ROOT_CAUSE, _field(1, v.root_cause.encode()))
    span.MergeFromString(buf)
    return True


def tag_request(span, before: RequestRecord, after: RequestRecord) -> bool:
    if after.slo_violations == before.slo_violations:
        return False
    if after.slo_violations:
        set_attribute(span, sc.SLO_VIOLATED, list(after.slo_violations))
    else:
        remove_attribute(span, sc.SLO_VIOLATED)
    return True


_MISSING = object()
